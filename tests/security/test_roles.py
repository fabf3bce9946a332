"""Every `/v1` route declares the least role it needs, and the roles hold: viewer < operator <
editor < admin."""

from __future__ import annotations

import fastapi.routing
from fastapi.routing import APIRoute

from kjob.gateway.app import create_app
from kjob.gateway.auth import ROLE_ATTRIBUTE
from tests.security.conftest import MakeApp, job_body
from tests.support.gateway import assert_error

#: The role of each route (docs/api.md, docs/security.md). Routes added later must declare a
#: role too (the first test), and belong in this table once their role is settled.
ROLES = {
    ("GET", "/v1/jobs"): "viewer",
    ("POST", "/v1/jobs"): "editor",
    ("POST", "/v1/jobs:apply"): "editor",
    ("GET", "/v1/jobs/{slug}"): "viewer",
    ("PUT", "/v1/jobs/{slug}"): "editor",
    ("PATCH", "/v1/jobs/{slug}"): "editor",
    ("DELETE", "/v1/jobs/{slug}"): "editor",
    ("POST", "/v1/jobs/{slug}/enable"): "operator",
    ("POST", "/v1/jobs/{slug}/disable"): "operator",
    ("POST", "/v1/jobs/{slug}/run"): "operator",
    ("POST", "/v1/jobs/{slug}/backfill"): "operator",
    ("GET", "/v1/jobs/{slug}/runs"): "viewer",
    ("GET", "/v1/runs/{run_id}"): "viewer",
    ("GET", "/v1/runs/{run_id}/logs"): "viewer",
    ("GET", "/v1/schedules/preview"): "viewer",
    ("POST", "/v1/tokens"): "admin",
    ("GET", "/v1/tokens"): "admin",
    ("DELETE", "/v1/tokens/{token_id}"): "admin",
    ("PUT", "/v1/secrets/{name}"): "editor",
    ("GET", "/v1/secrets"): "viewer",
    ("DELETE", "/v1/secrets/{name}"): "editor",
    ("GET", "/v1/audit"): "viewer",
    ("GET", "/v1/quotas"): "viewer",
    ("GET", "/v1/status"): "viewer",
}


def declared_roles(make_state: MakeApp) -> dict[tuple[str, str], list[str]]:
    """(method, path) -> the roles its dependencies require, for every /v1 route of the app."""
    found: dict[tuple[str, str], list[str]] = {}
    for path, route in api_routes(create_app(make_state())):
        if not path.startswith("/v1"):
            continue
        roles: list[str] = []
        pending = list(route.dependant.dependencies)
        while pending:
            dep = pending.pop()
            if getattr(dep.call, ROLE_ATTRIBUTE, None):
                roles.append(getattr(dep.call, ROLE_ATTRIBUTE))
            pending.extend(dep.dependencies)
        for method in route.methods:
            found[(method, path)] = roles
    return found


def api_routes(app) -> list[tuple[str, APIRoute]]:
    """(full path, route) of every API route, however deep its router was included."""
    contexts = getattr(fastapi.routing, "iter_route_contexts", None)  # FastAPI >= 0.16x includes lazily
    if contexts is None:
        return [(r.path, r) for r in app.routes if isinstance(r, APIRoute)]
    return [(c.path, c.original_route) for c in contexts(app.routes) if isinstance(c.original_route, APIRoute)]


def test_every_v1_route_declares_exactly_one_role(make_state: MakeApp) -> None:
    declared = declared_roles(make_state)
    assert set(ROLES) <= set(declared), set(ROLES) - set(declared)
    undeclared = {route: roles for route, roles in declared.items() if len(roles) != 1}
    assert undeclared == {}, "each /v1 route needs one `Viewer`/`Operator`/`Editor`/`Admin` principal"
    assert {route: declared[route][0] for route in ROLES} == ROLES


async def test_run_now_needs_operator(client_for, published) -> None:
    editor = await client_for("acme", "editor")
    await editor.post("/v1/jobs", json=job_body())
    viewer = await client_for("acme", "viewer")
    assert "'operator'" in assert_error(await viewer.post("/v1/jobs/nightly/run"), 403, None)
    assert published == []
    operator = await client_for("acme", "operator")
    assert (await operator.post("/v1/jobs/nightly/run")).status_code == 202
    assert [r.slug for r in published] == ["nightly"]


async def test_tokens_need_admin_and_secrets_need_editor_to_change(client_for) -> None:
    editor = await client_for("acme", "editor")
    for method, path, body in [("GET", "/v1/tokens", None), ("POST", "/v1/tokens", {"role": "viewer"}),
                               ("DELETE", "/v1/tokens/abc", None)]:
        assert "'admin'" in assert_error(await editor.request(method, path, json=body), 403, None)
    operator = await client_for("acme", "operator")
    assert_error(await operator.put("/v1/secrets/api-key", json={"value": "v"}), 403, None)
    assert (await editor.put("/v1/secrets/api-key", json={"value": "v"})).status_code == 201
    assert [s["name"] for s in (await operator.get("/v1/secrets")).json()] == ["api-key"]
    assert_error(await operator.delete("/v1/secrets/api-key"), 403, None)
