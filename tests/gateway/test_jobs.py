"""The job routes against a real PostgreSQL: what a client sees and what is stored."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone

import httpx

from kjob.gateway.state import GatewayState
from kjob.model.schedule import Schedule
from tests.support.gateway import assert_error, job_body

UTC_INSTANT = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


async def test_create_returns_the_stored_job_with_its_next_fire(api: httpx.AsyncClient, changes: list) -> None:
    response = await api.post("/v1/jobs", json=job_body(retries={"max": 3, "backoff": "exponential"}))
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["slug"] == "weekly-audit" and job["tenant"] == "acme"
    assert job["schedule"] == "0 9 * * MON" and job["timezone"] == "Europe/Berlin"
    assert job["retries"]["max"] == 3 and job["timeout"] == "30m" and job["enabled"] is True
    assert {"id", "created_at", "updated_at", "enabled_at", "paused_note"} <= set(job)
    expected = Schedule.parse("0 9 * * MON").next_slot(datetime.now(timezone.utc), "Europe/Berlin")
    assert expected is not None
    assert job["next_fire"] == expected.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert (await api.get("/v1/jobs/weekly-audit")).json() == job
    assert changes == [("acme", "weekly-audit", "created", True)]


async def test_a_taken_slug_is_a_conflict(api: httpx.AsyncClient) -> None:
    await api.post("/v1/jobs", json=job_body())
    message = assert_error(await api.post("/v1/jobs", json=job_body(prompt="other")), 409, None)
    assert "weekly-audit" in message
    assert (await api.get("/v1/jobs/weekly-audit")).json()["prompt"] == "/k-housekeep"


async def test_list_is_the_tenants_jobs_by_slug(api: httpx.AsyncClient) -> None:
    assert (await api.get("/v1/jobs")).json() == []
    for slug in ("zeta", "alpha", "mid"):
        await api.post("/v1/jobs", json=job_body(slug))
    jobs = (await api.get("/v1/jobs")).json()
    assert [j["slug"] for j in jobs] == ["alpha", "mid", "zeta"]
    assert all(UTC_INSTANT.match(j["next_fire"]) for j in jobs)


async def test_missing_job_is_404(api: httpx.AsyncClient) -> None:
    for method, path in [
        ("GET", "/v1/jobs/ghost"),
        ("PATCH", "/v1/jobs/ghost"),
        ("DELETE", "/v1/jobs/ghost"),
        ("POST", "/v1/jobs/ghost/enable"),
        ("POST", "/v1/jobs/ghost/disable"),
    ]:
        body = {"prompt": "x"} if method == "PATCH" else None
        assert "ghost" in assert_error(await api.request(method, path, json=body), 404, None)


async def test_patch_changes_only_the_given_fields(api: httpx.AsyncClient, changes: list) -> None:
    await api.post("/v1/jobs", json=job_body(retries={"max": 3, "backoff": "fixed"}))
    response = await api.patch("/v1/jobs/weekly-audit", json={"prompt": "new prompt", "retries": {"max": 5}})
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["prompt"] == "new prompt"
    assert job["retries"]["max"] == 5 and job["retries"]["backoff"] == "fixed"  # nested tables merge
    assert job["schedule"] == "0 9 * * MON"
    assert (await api.get("/v1/jobs/weekly-audit")).json()["prompt"] == "new prompt"
    assert changes[-1] == ("acme", "weekly-audit", "updated", True)


async def test_patch_cannot_rename(api: httpx.AsyncClient) -> None:
    await api.post("/v1/jobs", json=job_body())
    assert_error(await api.patch("/v1/jobs/weekly-audit", json={"slug": "renamed"}), 422, "slug")
    assert [j["slug"] for j in (await api.get("/v1/jobs")).json()] == ["weekly-audit"]


async def test_put_applies_idempotently(api: httpx.AsyncClient, changes: list) -> None:
    first = await api.put("/v1/jobs/weekly-audit", json=job_body())
    assert first.status_code == 201 and first.json()["action"] == "created"
    again = await api.put("/v1/jobs/weekly-audit", json=job_body())
    assert again.status_code == 200 and again.json()["action"] == "unchanged"
    assert again.json()["job"]["updated_at"] == first.json()["job"]["updated_at"]
    changed = await api.put("/v1/jobs/weekly-audit", json=job_body(prompt="v2"))
    assert changed.json()["action"] == "updated" and changed.json()["job"]["prompt"] == "v2"
    assert [c[2] for c in changes] == ["created", "updated"]  # nothing announced for "unchanged"
    assert_error(await api.put("/v1/jobs/weekly-audit", json=job_body("other")), 422, "slug")


async def test_batch_apply_reports_each_job_and_is_idempotent(api: httpx.AsyncClient) -> None:
    await api.post("/v1/jobs", json=job_body("existing"))
    jobs = [job_body("existing", prompt="changed"), job_body("fresh"), job_body("same")]
    await api.post("/v1/jobs", json=job_body("same"))
    first = await api.post("/v1/jobs:apply", json={"jobs": jobs})
    assert first.status_code == 200, first.text
    assert [(r["job"]["slug"], r["action"]) for r in first.json()["results"]] == [
        ("existing", "updated"),
        ("fresh", "created"),
        ("same", "unchanged"),
    ]
    second = await api.post("/v1/jobs:apply", json={"jobs": jobs})
    assert [r["action"] for r in second.json()["results"]] == ["unchanged"] * 3


async def test_batch_apply_refuses_duplicate_slugs(api: httpx.AsyncClient) -> None:
    response = await api.post("/v1/jobs:apply", json={"jobs": [job_body("a"), job_body("a", prompt="b")]})
    assert_error(response, 422, "jobs.1.slug")
    assert (await api.get("/v1/jobs")).json() == []


async def test_disable_keeps_a_note_and_enable_resumes_from_now(api: httpx.AsyncClient, changes: list) -> None:
    created = (await api.post("/v1/jobs", json=job_body(schedule="@every 1h"))).json()
    paused = (await api.post("/v1/jobs/weekly-audit/disable", json={"note": "too noisy"})).json()
    assert paused["enabled"] is False and paused["paused_note"] == "too noisy" and paused["next_fire"] is None
    assert (await api.get("/v1/jobs/weekly-audit")).json()["paused_note"] == "too noisy"
    resumed = (await api.post("/v1/jobs/weekly-audit/enable")).json()
    assert resumed["enabled"] is True and resumed["paused_note"] is None
    assert resumed["enabled_at"] > created["enabled_at"]
    assert resumed["next_fire"] > resumed["enabled_at"]
    bare = await api.post("/v1/jobs/weekly-audit/disable")  # the note is optional
    assert bare.status_code == 200 and bare.json()["paused_note"] is None
    assert [c[2] for c in changes] == ["created", "disabled", "enabled", "disabled"]


async def test_delete_removes_the_job(api: httpx.AsyncClient, changes: list) -> None:
    await api.post("/v1/jobs", json=job_body())
    response = await api.delete("/v1/jobs/weekly-audit")
    assert response.status_code == 204 and response.content == b""
    assert_error(await api.get("/v1/jobs/weekly-audit"), 404, None)
    assert (await api.get("/v1/jobs")).json() == []
    assert changes[-1] == ("acme", "weekly-audit", "deleted", True)  # with its id, for the ticker


async def test_a_fired_once_job_can_still_be_edited_and_reapplied(api: httpx.AsyncClient, state: GatewayState) -> None:
    # Stored directly, as if created before its instant passed: the API refuses a past @once.
    from kjob.gateway.auth import actor_of
    from kjob.model.job import parse_job
    from kjob.store.tokens import Principal

    actor = actor_of(Principal(tenant="acme", role="admin", token_id="t"))
    past = job_body("one-shot", schedule="@once 2020-01-01T09:00Z")
    await state.jobs.create(actor, parse_job(past))
    assert (await api.get("/v1/jobs/one-shot")).json()["next_fire"] is None
    assert (await api.patch("/v1/jobs/one-shot", json={"description": "done"})).status_code == 200
    assert (await api.put("/v1/jobs/one-shot", json={**past, "description": "done"})).json()["action"] == "unchanged"
    moved = await api.patch("/v1/jobs/one-shot", json={"schedule": "@once 2021-01-01T09:00Z"})
    assert_error(moved, 422, "schedule")


async def test_a_failing_change_hook_does_not_fail_the_write(api: httpx.AsyncClient, state: GatewayState) -> None:
    async def broken(*args: object) -> None:
        raise RuntimeError("NATS is down")

    state.on_job_changed = broken
    assert (await api.post("/v1/jobs", json=job_body())).status_code == 201
    assert [j["slug"] for j in (await api.get("/v1/jobs")).json()] == ["weekly-audit"]


async def test_a_job_file_larger_than_other_bodies_applies_all_or_nothing(api: httpx.AsyncClient, changes: list) -> None:
    # Past the 256 KiB every other request is held to (a file of 1,000 jobs was refused with it).
    jobs = [job_body(f"job-{i}", schedule="@every 1h") for i in range(2000)]
    assert len(json.dumps({"jobs": jobs})) > 256 * 1024
    first = await api.post("/v1/jobs:apply", json={"jobs": jobs})
    assert first.status_code == 200, first.text[:300]
    assert [r["action"] for r in first.json()["results"]] == ["created"] * 2000
    assert len(changes) == 2000
    # One bad job among many changed ones: refused, naming it, and none of the others written.
    changed = [{**job, "prompt": "v2"} for job in jobs]
    changed[1234] = {**changed[1234], "schedule": "61 * * * *"}
    refused = await api.post("/v1/jobs:apply", json={"jobs": changed})
    assert_error(refused, 422, "jobs.1234.schedule")
    listed = (await api.get("/v1/jobs")).json()
    assert len(listed) == 2000 and {j["prompt"] for j in listed} == {jobs[0]["prompt"]}
    # the other requests keep their limit
    big = job_body("big", prompt="x" * 1000)
    response = await api.post("/v1/jobs", json={**big, "labels": {f"k{i}": "v" * 60 for i in range(4000)}})
    assert_error(response, 413, "body")


async def test_apply_can_answer_with_each_jobs_action_alone(api: httpx.AsyncClient, changes: list) -> None:
    # `kjob apply` prints no more than this: for 10,000 jobs the full answer was most of the time
    await api.post("/v1/jobs", json=job_body("existing"))
    jobs = [job_body("existing", prompt="changed"), job_body("fresh")]
    first = await api.post("/v1/jobs:apply", params={"results": "actions"}, json={"jobs": jobs})
    assert first.status_code == 200, first.text
    assert first.json() == {"results": [{"slug": "existing", "action": "updated"}, {"slug": "fresh", "action": "created"}]}
    assert [c[1:] for c in changes] == [("existing", "created", True), ("existing", "updated", True),
                                        ("fresh", "created", True)]
    assert {j["slug"]: j["prompt"] for j in (await api.get("/v1/jobs")).json()} == {
        "existing": "changed", "fresh": jobs[1]["prompt"]}
    again = await api.post("/v1/jobs:apply", params={"results": "actions"}, json={"jobs": jobs})
    assert [r["action"] for r in again.json()["results"]] == ["unchanged", "unchanged"]
    full = await api.post("/v1/jobs:apply", params={"results": "jobs"}, json={"jobs": jobs})
    assert [(r["action"], r["job"]["slug"], r["job"]["next_fire"] is not None) for r in full.json()["results"]] == [
        ("unchanged", "existing", True), ("unchanged", "fresh", True)]
    assert_error(await api.post("/v1/jobs:apply", params={"results": "some"}, json={"jobs": jobs}), 422, "results")


async def test_a_bad_job_of_an_apply_is_named_by_its_slug(api: httpx.AsyncClient) -> None:
    missing = {k: v for k, v in job_body("no-prompt").items() if k != "prompt"}
    message = assert_error(await api.post("/v1/jobs:apply", json={"jobs": [job_body("good"), missing]}),
                           422, "jobs.1.prompt")
    assert message == "job 'no-prompt': prompt is required"
    message = assert_error(await api.post("/v1/jobs:apply", json={"jobs": [job_body("x", timeout="soon")]}),
                           422, "jobs.0.timeout")
    assert message.startswith("job 'x': 'soon' is not a duration")
    message = assert_error(await api.post("/v1/jobs:apply", json={"jobs": [job_body("y", agent="nobody")]}),
                           422, "jobs.0.agent")  # a check of the server's, after the model's
    assert message.startswith("job 'y': unknown agent 'nobody'")
    # no slug to name it by: its place in the batch
    assert assert_error(await api.post("/v1/jobs:apply", json={"jobs": [job_body("z"), 7]}), 422, "jobs.1").startswith(
        "jobs.1: ")
    assert (await api.get("/v1/jobs")).json() == []


async def test_a_fired_once_job_reapplied_unchanged_in_a_file_is_accepted(api: httpx.AsyncClient,
                                                                       state: GatewayState) -> None:
    # The apply compares with the stored timing: only a new or changed past @once is refused.
    from kjob.gateway.auth import actor_of
    from kjob.model.job import parse_job
    from kjob.store.tokens import Principal

    past = job_body("one-shot", schedule="@once 2020-01-01T09:00Z")
    await state.jobs.create(actor_of(Principal(tenant="acme", role="admin", token_id="t")), parse_job(past))
    batch = [{**past, "description": "done"}, job_body("other")]
    applied = await api.post("/v1/jobs:apply", params={"results": "actions"}, json={"jobs": batch})
    assert applied.json()["results"] == [{"slug": "one-shot", "action": "updated"}, {"slug": "other", "action": "created"}]
    moved = [{**past, "schedule": "@once 2021-01-01T09:00Z"}]
    assert_error(await api.post("/v1/jobs:apply", json={"jobs": moved}), 422, "jobs.0.schedule")
