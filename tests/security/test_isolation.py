"""Invariant 5 across the whole API: every route of the OpenAPI document, called by tenant B's
admin with tenant A's slugs, run ids, token ids and secret names, answers 404/403 (or B's own
data), never A's data, and changes nothing of A's.

A route added later is enumerated too: it fails here until it keeps tenants apart, and until
this file knows a valid body for it (BODIES), so the check cannot be dodged by a 422.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import httpx
import pytest

from kjob.gateway.state import GatewayState
from kjob.model.run import RunStatus
from kjob.store.claims import ClaimLedger
from tests.security.conftest import job_body

A, B = "tenant-a", "tenant-b"
SECRET_VALUE = "A-SECRET-VALUE-8f3e"

#: A valid body for each route that takes one, as tenant B would send it.
BODIES: dict[tuple[str, str], Any] = {
    ("POST", "/v1/jobs"): job_body("b-job"),
    ("POST", "/v1/jobs:apply"): {"jobs": [job_body("b-job-2")]},
    ("PUT", "/v1/jobs/{slug}"): job_body("a-job", prompt="echo b's own"),
    ("PATCH", "/v1/jobs/{slug}"): {"prompt": "echo hijacked"},
    ("POST", "/v1/jobs/{slug}/disable"): {"note": "hijacked"},
    ("POST", "/v1/jobs/{slug}/backfill"): {"from": "2026-01-01T00:00:00Z", "to": "2026-01-02T00:00:00Z"},
    ("POST", "/v1/tokens"): {"role": "admin", "tenant": A},
    ("PUT", "/v1/secrets/{name}"): {"value": "b's own value"},
}
#: Values for required query parameters that are not a tenant.
QUERY = {"schedule": "@daily"}


@pytest.fixture
async def world(client_for, make_state) -> dict[str, Any]:
    """Tenant A with a job (referencing a secret), a finished run with output, tokens, a
    secret and audit rows; and tenant B's admin client."""
    state: GatewayState = make_state()
    a = await client_for(A, "admin", state=state)
    assert (await a.put("/v1/secrets/a-secret", json={"value": SECRET_VALUE})).status_code == 201
    job = (await a.post("/v1/jobs", json=job_body(
        "a-job", prompt="echo A-PROMPT-MARKER", sandbox={"env": {"TOKEN": "secret:a-secret"}}))).json()
    run = (await a.post("/v1/jobs/a-job/run")).json()
    ledger = ClaimLedger(state.engine)
    claimed = await ledger.claim(run["id"], "test-node", timedelta(seconds=30))
    assert claimed is not None
    await ledger.finish(run["id"], "test-node", 1, status=RunStatus.succeeded, exit_code=0, reason=None,
                        output="A-OUTPUT-MARKER\n", output_bytes=16, dropped_bytes=0, retry_in_s=None)
    viewer = (await a.post("/v1/tokens", json={"role": "viewer", "name": "A-TOKEN-NAME"})).json()
    b = await client_for(B, "admin", state=state)
    return {
        "a": a, "b": b, "state": state,
        "path": {"slug": "a-job", "run_id": run["id"], "token_id": viewer["id"], "name": "a-secret"},
        "markers": [A, job["id"], run["id"], viewer["id"], "A-PROMPT-MARKER", "A-OUTPUT-MARKER", "A-TOKEN-NAME",
                    SECRET_VALUE],
    }


async def _snapshot(a: httpx.AsyncClient, run_id: str) -> dict[str, Any]:
    return {
        "jobs": (await a.get("/v1/jobs")).json(),
        "run": (await a.get(f"/v1/runs/{run_id}")).json(),
        "log": (await a.get(f"/v1/runs/{run_id}/logs")).text,
        "tokens": (await a.get("/v1/tokens")).json(),
        "secrets": (await a.get("/v1/secrets")).json(),
        "audit": (await a.get("/v1/audit")).json(),
    }


def _operations(openapi: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    ops = [(method.upper(), path, op) for path, item in openapi["paths"].items() for method, op in item.items()
           if path.startswith("/v1")]
    # Create-or-replace routes last: once B has its own `a-job`, later routes would find B's.
    return sorted(ops, key=lambda o: o[0] == "PUT")


async def test_no_route_answers_another_tenants_data(world: dict[str, Any]) -> None:
    a, b = world["a"], world["b"]
    before = await _snapshot(a, world["path"]["run_id"])
    openapi = (await b.get("/openapi.json")).json()
    operations = _operations(openapi)
    assert len(operations) >= 20  # the enumeration really sees the API

    for method, path, op in operations:
        names = re.findall(r"{(\w+)}", path)
        unknown = [n for n in names if n not in world["path"]]
        assert not unknown, f"{method} {path}: add a tenant-A value for {unknown} to the `world` fixture"
        url = path.format(**{n: world["path"][n] for n in names})
        params: dict[str, str] = {}
        asks_for_a = bool(names)
        for param in op.get("parameters", []):
            if param["in"] != "query":
                continue
            if param["name"] == "tenant":
                params["tenant"] = A
                asks_for_a = True
            elif param.get("required"):
                assert param["name"] in QUERY, f"{method} {path}: add a value for query {param['name']!r} to QUERY"
                params[param["name"]] = QUERY[param["name"]]
        takes_body = "requestBody" in op
        assert not (takes_body and op["requestBody"].get("required")) or (method, path) in BODIES, (
            f"{method} {path}: add a valid body for tenant B to BODIES")
        response = await b.request(method, url, params=params, json=BODIES.get((method, path)))
        where = f"{method} {url} {params} -> {response.status_code} {response.text[:300]}"

        assert response.status_code < 500, where
        assert response.status_code != 422, f"{where}: give it a valid body/params, so the check reaches the tenant"
        if asks_for_a and not (method == "PUT" and not params):
            assert response.status_code in (403, 404), where
        if 200 <= response.status_code < 300:
            leaked = [m for m in world["markers"] if m in response.text]
            assert not leaked, f"{where}: answers tenant A's {leaked}"

    assert await _snapshot(a, world["path"]["run_id"]) == before
    # B's own writes happened in B's tenant only
    b_jobs = {j["slug"]: j["tenant"] for j in (await b.get("/v1/jobs")).json()}
    assert b_jobs == {"b-job": B, "b-job-2": B, "a-job": B}


async def test_a_job_cannot_reference_another_tenants_secret(world: dict[str, Any]) -> None:
    response = await world["b"].post("/v1/jobs", json=job_body("steal", sandbox={"env": {"X": "secret:a-secret"}}))
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "sandbox.env.X"
