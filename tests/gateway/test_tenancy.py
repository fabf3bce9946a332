"""Invariant 5: the tenant is the token's; another tenant's job does not exist for you."""

from __future__ import annotations

from tests.gateway.conftest import ClientFor
from tests.support.gateway import assert_error, job_body


async def test_a_tenant_cannot_see_or_touch_another_tenants_job(client_for: ClientFor) -> None:
    acme = await client_for("acme", "admin")
    globex = await client_for("globex", "admin")
    original = (await acme.post("/v1/jobs", json=job_body())).json()

    assert (await globex.get("/v1/jobs")).json() == []
    for method, path, body in [
        ("GET", "/v1/jobs/weekly-audit", None),
        ("PATCH", "/v1/jobs/weekly-audit", {"prompt": "hijacked"}),
        ("DELETE", "/v1/jobs/weekly-audit", None),
        ("POST", "/v1/jobs/weekly-audit/disable", {"note": "hijacked"}),
        ("POST", "/v1/jobs/weekly-audit/enable", None),
    ]:
        assert_error(await globex.request(method, path, json=body), 404, None)
    assert (await acme.get("/v1/jobs/weekly-audit")).json() == original


async def test_the_same_slug_in_two_tenants_is_two_jobs(client_for: ClientFor) -> None:
    acme = await client_for("acme", "admin")
    globex = await client_for("globex", "admin")
    await acme.post("/v1/jobs", json=job_body())
    # A body cannot choose the tenant: `tenant` is not a job field.
    assert_error(await globex.post("/v1/jobs", json=job_body(tenant="acme")), 422, "tenant")
    mine = (await globex.put("/v1/jobs/weekly-audit", json=job_body(prompt="globex's"))).json()
    assert mine["action"] == "created" and mine["job"]["tenant"] == "globex"
    assert (await acme.get("/v1/jobs/weekly-audit")).json()["prompt"] == "/k-housekeep"
    assert (await globex.get("/v1/jobs/weekly-audit")).json()["prompt"] == "globex's"
