"""The audit log (who, with which token, did what to what, when, and the change) and the
token API: admins manage their own tenant's tokens; the admin tenant's admins any tenant's."""

from __future__ import annotations

import pytest

from tests.security.conftest import job_body
from tests.support.gateway import assert_error


async def test_every_kind_of_change_is_in_the_audit_log(client_for) -> None:
    admin = await client_for("acme", "admin")
    me = admin.headers["authorization"].split("_")[1]  # the token id inside `kjob_<id>_<secret>`
    await admin.post("/v1/jobs", json=job_body())
    await admin.patch("/v1/jobs/nightly", json={"prompt": "echo changed"})
    await admin.post("/v1/jobs/nightly/disable", json={"note": "maintenance"})
    await admin.post("/v1/jobs/nightly/enable")
    run = (await admin.post("/v1/jobs/nightly/run")).json()
    token = (await admin.post("/v1/tokens", json={"role": "viewer", "name": "dash"})).json()
    await admin.delete(f"/v1/tokens/{token['id']}")
    await admin.put("/v1/secrets/api-key", json={"value": "v"})
    await admin.delete("/v1/secrets/api-key")
    await admin.post("/v1/jobs", json=job_body("other"))

    entries = (await admin.get("/v1/audit")).json()
    assert [e["action"] for e in reversed(entries)] == [
        "job.create", "job.update", "job.disable", "job.enable", "job.run",
        "token.create", "token.revoke", "secret.set", "secret.delete", "job.create",
    ]
    assert {(e["actor"], e["token_id"], e["tenant"]) for e in entries} == {(f"token:{me}", me, "acme")}
    by_action = {e["action"]: e for e in entries if e["target"] != "job/other"}
    assert by_action["job.run"]["change"] == {"run_id": run["id"], "trigger": "manual"}
    assert by_action["job.update"]["change"]["prompt"] == {"from": "echo hello", "to": "echo changed"}
    assert by_action["token.create"]["target"] == f"token/{token['id']}"
    assert token["secret"] not in str(entries)

    only = (await admin.get("/v1/audit", params={"slug": "nightly"})).json()
    assert {e["target"] for e in only} == {"job/nightly"} and len(only) == 5
    assert len((await admin.get("/v1/audit", params={"limit": 2})).json()) == 2
    viewer = await client_for("acme", "viewer")
    assert len((await viewer.get("/v1/audit")).json()) == 10
    assert (await (await client_for("globex", "admin")).get("/v1/audit")).json() == []


async def test_a_refused_change_leaves_no_audit_row(client_for) -> None:
    admin = await client_for("acme", "admin")
    assert_error(await admin.post("/v1/jobs", json=job_body(schedule="61 * * * *")), 422, "schedule")
    assert_error(await admin.post("/v1/jobs/nope/run"), 404, None)
    assert (await admin.get("/v1/audit")).json() == []


async def test_tokens_are_created_once_listed_without_secrets_and_revoked(client_for) -> None:
    admin = await client_for("acme", "admin")
    created = await admin.post("/v1/tokens", json={"role": "editor", "name": "ci"})
    assert created.status_code == 201
    token = created.json()
    assert (token["tenant"], token["role"], token["name"]) == ("acme", "editor", "ci")
    ci = await client_for(token=token["secret"])
    assert (await ci.post("/v1/jobs", json=job_body())).status_code == 201

    listed = (await admin.get("/v1/tokens")).json()
    assert token["id"] in [t["id"] for t in listed]
    assert all("secret" not in t for t in listed) and token["secret"] not in str(listed)

    assert (await admin.delete(f"/v1/tokens/{token['id']}")).status_code == 204
    assert_error(await ci.get("/v1/jobs"), 401, None)
    assert (await admin.delete(f"/v1/tokens/{token['id']}")).status_code == 204  # twice: no-op
    [revoked] = [t for t in (await admin.get("/v1/tokens")).json() if t["id"] == token["id"]]
    assert revoked["revoked_at"] is not None


@pytest.mark.parametrize(("body", "field"), [
    ({"role": "root"}, "role"),
    ({"role": "viewer", "tenant": "a.b"}, "tenant"),
    ({"role": "viewer", "name": "x" * 129}, "name"),
    ({}, "role"),
])
async def test_bad_token_requests_are_refused_and_create_nothing(client_for, body, field) -> None:
    admin = await client_for("default", "admin")
    before = (await admin.get("/v1/tokens")).json()
    assert_error(await admin.post("/v1/tokens", json=body), 422, field)
    assert (await admin.get("/v1/tokens")).json() == before


async def test_only_the_admin_tenant_manages_other_tenants_tokens(client_for) -> None:
    acme = await client_for("acme", "admin")
    own = (await acme.post("/v1/tokens", json={"role": "viewer"})).json()
    globex = await client_for("globex", "admin")
    message = assert_error(await globex.post("/v1/tokens", json={"role": "admin", "tenant": "acme"}), 403, None)
    assert "'default'" in message
    assert_error(await globex.get("/v1/tokens", params={"tenant": "acme"}), 403, None)
    assert_error(await globex.delete(f"/v1/tokens/{own['id']}"), 404, None)  # not globex's token
    assert_error(await globex.delete(f"/v1/tokens/{own['id']}", params={"tenant": "acme"}), 403, None)

    root = await client_for("default", "admin")  # the tenant of `kjob up`'s token
    minted = (await root.post("/v1/tokens", json={"role": "viewer", "tenant": "newco"})).json()
    assert minted["tenant"] == "newco"
    assert [t["id"] for t in (await root.get("/v1/tokens", params={"tenant": "newco"})).json()] == [minted["id"]]
    assert (await root.delete(f"/v1/tokens/{own['id']}", params={"tenant": "acme"})).status_code == 204
    # each is audited in the token's own tenant, saying who from which tenant did it
    newco = await client_for(token=minted["secret"])
    [entry] = (await newco.get("/v1/audit")).json()
    assert (entry["action"], entry["change"]["by_tenant"]) == ("token.create", "default")
    acme_log = [(e["action"], (e["change"] or {}).get("by_tenant")) for e in (await acme.get("/v1/audit")).json()]
    assert acme_log[0] == ("token.revoke", "default")
