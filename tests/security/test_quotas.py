"""Per-tenant quotas at the gateway: max jobs (409), minimum schedule interval (422, naming the
field), run-now rate (429 + Retry-After); each refusal stores nothing. The concurrency quota is
enforced by the executor (tests/security/test_executor.py)."""

from __future__ import annotations

import pytest

from tests.security.conftest import MakeApp, job_body
from tests.support.gateway import assert_error


async def test_max_jobs_per_tenant_with_a_per_tenant_override(make_state: MakeApp, client_for) -> None:
    state = make_state(quotas={"max_jobs": 3, "tenants": {"acme": {"max_jobs": 1}}})
    acme = await client_for("acme", "editor", state=state)
    assert (await acme.post("/v1/jobs", json=job_body("one"))).status_code == 201
    for method, path, body in [
        ("POST", "/v1/jobs", job_body("two")),
        ("PUT", "/v1/jobs/two", job_body("two")),
        ("POST", "/v1/jobs:apply", {"jobs": [job_body("one"), job_body("two")]}),
    ]:
        message = assert_error(await acme.request(method, path, json=body), 409, None)
        assert "max_jobs" in message and "at most 1" in message
    assert [j["slug"] for j in (await acme.get("/v1/jobs")).json()] == ["one"]
    # at the limit, existing jobs still change
    assert (await acme.put("/v1/jobs/one", json=job_body("one", prompt="echo changed"))).json()["action"] == "updated"
    # other tenants have the default
    globex = await client_for("globex", "editor", state=state)
    assert (await globex.post("/v1/jobs:apply", json={"jobs": [job_body(f"g{i}") for i in range(3)]})).status_code == 200
    assert_error(await globex.post("/v1/jobs", json=job_body("g3")), 409, None)


@pytest.mark.parametrize("schedule", ["@every 30s", "*/10 * * * * *", "0,1 9 * * *"])
async def test_a_schedule_faster_than_the_minimum_interval_is_refused(make_state: MakeApp, client_for, schedule) -> None:
    state = make_state(quotas={"min_interval_s": 300})
    editor = await client_for("acme", "editor", state=state)
    message = assert_error(await editor.post("/v1/jobs", json=job_body(schedule=schedule)), 422, "schedule")
    assert "minimum interval of 300s" in message
    assert_error(await editor.post("/v1/jobs:apply", json={"jobs": [job_body(schedule=schedule)]}),
                 422, "jobs.0.schedule")
    assert (await editor.get("/v1/jobs")).json() == []
    for ok in ("*/5 * * * *", "@every 1h", "@once 2099-01-01T00:00Z"):
        assert (await editor.put("/v1/jobs/nightly", json=job_body(schedule=ok))).status_code in (200, 201)
    assert_error(await editor.patch("/v1/jobs/nightly", json={"schedule": schedule}), 422, "schedule")
    assert (await editor.get("/v1/jobs/nightly")).json()["schedule"] == "@once 2099-01-01T00:00Z"


async def test_run_now_is_rate_limited_per_tenant(make_state: MakeApp, client_for, published) -> None:
    state = make_state(quotas={"run_now_per_minute": 2})
    acme = await client_for("acme", "operator", state=state)
    editor = await client_for("acme", "editor", state=state)
    await editor.post("/v1/jobs", json=job_body())
    for _ in range(2):
        assert (await acme.post("/v1/jobs/nightly/run")).status_code == 202
    refused = await acme.post("/v1/jobs/nightly/run")
    message = assert_error(refused, 429, None)
    assert "run_now_per_minute" in message
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert len((await acme.get("/v1/jobs/nightly/runs")).json()) == 2
    assert len(published) == 2
    quota = (await acme.get("/v1/quotas")).json()
    assert quota["usage"] == {"jobs": 1, "concurrent_runs": 0, "run_now_last_minute": 2, "cost_usd_today": 0.0}
    assert quota["limits"]["run_now_per_minute"] == 2
    # another tenant has its own budget
    globex = await client_for("globex", "editor", state=state)
    await globex.post("/v1/jobs", json=job_body())
    assert (await globex.post("/v1/jobs/nightly/run")).status_code == 202
