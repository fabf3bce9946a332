"""Every /v1 route needs a valid bearer token, and a role high enough for what it does."""

from __future__ import annotations

import httpx
import pytest

from kjob.gateway.state import GatewayState
from tests.gateway.conftest import ClientFor
from tests.support.gateway import assert_error, job_body

V1_ROUTES = [
    ("GET", "/v1/jobs", None),
    ("POST", "/v1/jobs", job_body()),
    ("POST", "/v1/jobs:apply", {"jobs": [job_body()]}),
    ("GET", "/v1/jobs/weekly-audit", None),
    ("PUT", "/v1/jobs/weekly-audit", job_body()),
    ("PATCH", "/v1/jobs/weekly-audit", {"prompt": "other"}),
    ("DELETE", "/v1/jobs/weekly-audit", None),
    ("POST", "/v1/jobs/weekly-audit/enable", None),
    ("POST", "/v1/jobs/weekly-audit/disable", None),
    ("GET", "/v1/schedules/preview?schedule=@daily", None),
]


@pytest.mark.parametrize("token", [None, "kjob_0123456789ab_not-a-real-secret", "garbage"])
async def test_v1_routes_refuse_requests_without_a_valid_token(
    client_for: ClientFor, api: httpx.AsyncClient, token: str | None
) -> None:
    before = (await api.post("/v1/jobs", json=job_body())).json()  # something a leak could reveal or change
    anonymous = await client_for(token=token or "")
    for method, path, body in V1_ROUTES:
        response = await anonymous.request(method, path, json=body)
        message = assert_error(response, 401, None)
        assert response.headers["www-authenticate"] == "Bearer"
        assert "token" in message
    assert (await api.get("/v1/jobs")).json() == [before]


async def test_a_revoked_token_is_refused_at_once(client_for: ClientFor, state: GatewayState) -> None:
    token_id, secret = await state.tokens.create("acme", "admin")
    client = await client_for(token=secret)
    assert (await client.get("/v1/jobs")).status_code == 200
    await state.tokens.revoke("acme", token_id)
    assert_error(await client.get("/v1/jobs"), 401, None)


async def test_probes_need_no_token(client_for: ClientFor) -> None:
    anonymous = await client_for(token="")
    assert (await anonymous.get("/healthz")).json() == {"status": "ok"}
    assert (await anonymous.get("/readyz")).json() == {"status": "ready"}
    openapi = (await anonymous.get("/openapi.json")).json()
    assert "/v1/jobs/{slug}" in openapi["paths"]
    assert "HTTPBearer" in openapi["components"]["securitySchemes"]


async def test_viewer_reads_but_cannot_change(client_for: ClientFor, api: httpx.AsyncClient) -> None:
    await api.post("/v1/jobs", json=job_body())
    viewer = await client_for("acme", "viewer")
    assert [j["slug"] for j in (await viewer.get("/v1/jobs")).json()] == ["weekly-audit"]
    assert (await viewer.get("/v1/jobs/weekly-audit")).status_code == 200
    assert (await viewer.get("/v1/schedules/preview", params={"schedule": "@daily"})).status_code == 200
    for method, path, body in [
        ("POST", "/v1/jobs", job_body("other")),
        ("PATCH", "/v1/jobs/weekly-audit", {"prompt": "changed"}),
        ("DELETE", "/v1/jobs/weekly-audit", None),
        ("POST", "/v1/jobs/weekly-audit/disable", None),
    ]:
        message = assert_error(await viewer.request(method, path, json=body), 403, None)
        assert "viewer" in message
    after = await api.get("/v1/jobs")
    assert [(j["slug"], j["prompt"], j["enabled"]) for j in after.json()] == [("weekly-audit", "/k-housekeep", True)]


async def test_operator_pauses_and_resumes_but_cannot_edit(client_for: ClientFor, api: httpx.AsyncClient) -> None:
    await api.post("/v1/jobs", json=job_body())
    operator = await client_for("acme", "operator")
    assert (await operator.post("/v1/jobs/weekly-audit/disable", json={"note": "noisy"})).json()["enabled"] is False
    assert (await operator.post("/v1/jobs/weekly-audit/enable")).json()["enabled"] is True
    assert_error(await operator.patch("/v1/jobs/weekly-audit", json={"prompt": "changed"}), 403, None)
    assert_error(await operator.put("/v1/jobs/weekly-audit", json=job_body(prompt="changed")), 403, None)
    assert (await api.get("/v1/jobs/weekly-audit")).json()["prompt"] == "/k-housekeep"


async def test_editor_writes(client_for: ClientFor) -> None:
    editor = await client_for("acme", "editor")
    assert (await editor.post("/v1/jobs", json=job_body())).status_code == 201
    assert (await editor.delete("/v1/jobs/weekly-audit")).status_code == 204
