"""Invariant 4 at the API: every bad input is a 4xx JSON error naming the field, and nothing
is stored. Never a 500."""

from __future__ import annotations

import httpx
import pytest

from tests.support.gateway import INVALID_JOBS, assert_error, job_body

IDS = [case[0] for case in INVALID_JOBS]


@pytest.mark.parametrize("name,change,field", INVALID_JOBS, ids=IDS)
async def test_create_refuses_and_stores_nothing(api: httpx.AsyncClient, name: str, change: dict, field: str) -> None:
    body = job_body(**change)
    assert_error(await api.post("/v1/jobs", json=body), 422, field)
    assert_error(await api.put(f"/v1/jobs/{body['slug']}", json=body), 422, field)
    assert (await api.get("/v1/jobs")).json() == []


@pytest.mark.parametrize("name,change,field", INVALID_JOBS, ids=IDS)
async def test_apply_refuses_the_whole_batch(api: httpx.AsyncClient, name: str, change: dict, field: str) -> None:
    jobs = [job_body("good-one"), job_body(**{"slug": "bad-one", **change})]
    response = await api.post("/v1/jobs:apply", json={"jobs": jobs})
    assert_error(response, 422, f"jobs.1.{field}")
    assert (await api.get("/v1/jobs")).json() == []


@pytest.mark.parametrize(
    "name,change,field", [c for c in INVALID_JOBS if c[2] != "slug"], ids=[c[0] for c in INVALID_JOBS if c[2] != "slug"]
)
async def test_patch_refuses_and_leaves_the_job_as_it_was(
    api: httpx.AsyncClient, name: str, change: dict, field: str
) -> None:
    before = (await api.post("/v1/jobs", json=job_body())).json()
    assert_error(await api.patch("/v1/jobs/weekly-audit", json=change), 422, field)
    assert (await api.get("/v1/jobs")).json() == [before]


async def test_malformed_json_is_400_naming_the_body(api: httpx.AsyncClient) -> None:
    response = await api.post("/v1/jobs", content=b'{"slug": "x",', headers={"content-type": "application/json"})
    assert "JSON" in assert_error(response, 400, "body")
    assert (await api.get("/v1/jobs")).json() == []


@pytest.mark.parametrize(
    "body,field",
    [
        ([1, 2], "body"),  # not an object
        ({k: v for k, v in job_body().items() if k != "prompt"}, "prompt"),  # missing
        (job_body(colour="red"), "colour"),  # not a job field
        (job_body(sandbox={"backend": "docker"}), "sandbox.image"),  # docker without an image
        (job_body(retries={"max": -1}), "retries.max"),
    ],
)
async def test_wrong_shapes_name_the_field(api: httpx.AsyncClient, body: object, field: str) -> None:
    assert_error(await api.post("/v1/jobs", json=body), 422, field)
    assert (await api.get("/v1/jobs")).json() == []


async def test_oversized_body_is_413(api: httpx.AsyncClient) -> None:
    body = job_body(description="x" * 300_000)
    assert_error(await api.post("/v1/jobs", json=body), 413, "body")

    async def chunks():  # no Content-Length: the limit counts streamed bytes too
        for _ in range(40):
            yield b"x" * 8192

    assert_error(
        await api.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"}), 413, "body"
    )
    assert (await api.get("/v1/jobs")).json() == []


async def test_unknown_route_is_json_404(api: httpx.AsyncClient) -> None:
    assert "/v1" in assert_error(await api.get("/v2/jobs"), 404, None)
    assert_error(await api.request("PATCH", "/v1/jobs"), 405, None)


async def test_a_note_that_cannot_be_stored_is_refused(api: httpx.AsyncClient) -> None:
    await api.post("/v1/jobs", json=job_body())
    assert_error(await api.post("/v1/jobs/weekly-audit/disable", json={"note": "a\x00b"}), 422, "note")
    assert (await api.get("/v1/jobs/weekly-audit")).json()["enabled"] is True
