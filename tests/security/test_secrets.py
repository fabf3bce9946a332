"""Secrets: set from the API or CLI, encrypted at rest, referenced by name from sandbox.env,
never answered back; an unknown reference is refused at job create; clear errors without a key."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from kjob.errors import InvalidInput, ServerError
from kjob.gateway.app import create_app
from kjob.store.audit import Actor
from kjob.store.secrets import SecretBox, SecretStore, generate_key
from kjob.store.tables import tenant_secrets
from tests.security.conftest import MakeApp, job_body
from tests.support.gateway import assert_error

VALUE = "sk-live-0123456789abcdef"


async def _rows(engine: AsyncEngine) -> list:
    async with engine.connect() as conn:
        return list(await conn.execute(select(tenant_secrets)))


async def test_a_secret_is_stored_encrypted_and_never_answered(client_for, engine: AsyncEngine) -> None:
    editor = await client_for("acme", "editor")
    put = await editor.put("/v1/secrets/api-key", json={"value": VALUE})
    assert put.status_code == 201 and VALUE not in put.text
    assert set(put.json()) == {"name", "created_at", "updated_at"}
    assert (await editor.put("/v1/secrets/api-key", json={"value": VALUE + "2"})).status_code == 200

    [row] = await _rows(engine)
    assert (row.tenant, row.name) == ("acme", "api-key")
    assert VALUE not in row.ciphertext
    box = SecretBox(editor.state.settings.secret_key)
    assert box.open("acme", "api-key", row.ciphertext) == VALUE + "2"

    created = await editor.post("/v1/jobs", json=job_body(sandbox={"env": {"API_KEY": "secret:api-key", "REGION": "eu"}}))
    assert created.status_code == 201, created.text
    for response in (created, await editor.get("/v1/jobs/nightly"), await editor.get("/v1/jobs"),
                     await editor.get("/v1/secrets"), await editor.get("/v1/audit")):
        assert VALUE not in response.text
    assert (await editor.get("/v1/jobs/nightly")).json()["sandbox"]["env"] == {"API_KEY": "secret:api-key", "REGION": "eu"}
    assert [s["name"] for s in (await editor.get("/v1/secrets")).json()] == ["api-key"]
    actions = [(e["action"], e["target"], e["change"]) for e in (await editor.get("/v1/audit")).json()]
    assert ("secret.set", "secret/api-key", {"created": True}) in actions
    assert ("secret.set", "secret/api-key", {"created": False}) in actions


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/v1/jobs", job_body(sandbox={"env": {"API_KEY": "secret:nope"}}), "sandbox.env.API_KEY"),
    ("/v1/jobs", job_body(sandbox={"env": {"API_KEY": "secret:not a name!"}}), "sandbox.env.API_KEY"),
    ("/v1/jobs:apply", {"jobs": [job_body(sandbox={"env": {"K": "secret:nope"}})]}, "jobs.0.sandbox.env.K"),
])
async def test_an_unknown_secret_reference_is_a_422_naming_the_field(client_for, path, body, field) -> None:
    editor = await client_for("acme", "editor")
    message = assert_error(await editor.post(path, json=body), 422, field)
    assert "secret" in message
    assert (await editor.get("/v1/jobs")).json() == []


async def test_adding_an_unknown_reference_by_patch_changes_nothing(client_for) -> None:
    editor = await client_for("acme", "editor")
    await editor.post("/v1/jobs", json=job_body())
    assert_error(await editor.patch("/v1/jobs/nightly", json={"sandbox": {"env": {"T": "secret:nope"}}}),
                 422, "sandbox.env.T")
    assert (await editor.get("/v1/jobs/nightly")).json()["sandbox"]["env"] == {}


@pytest.mark.parametrize(("name", "body", "field"), [
    ("api-key", {"value": ""}, "value"),
    ("bad%20name", {"value": "v"}, "name"),
    ("api-key", {"value": "v", "extra": 1}, "extra"),
    ("api-key", {}, "value"),
])
async def test_bad_secret_input_is_refused_and_stores_nothing(client_for, engine, name, body, field) -> None:
    editor = await client_for("acme", "editor")
    assert_error(await editor.put(f"/v1/secrets/{name}", json=body), 422, field)
    assert await _rows(engine) == []


async def test_a_secret_in_use_cannot_be_deleted(client_for) -> None:
    editor = await client_for("acme", "editor")
    await editor.put("/v1/secrets/api-key", json={"value": VALUE})
    await editor.post("/v1/jobs", json=job_body(sandbox={"env": {"API_KEY": "secret:api-key"}}))
    message = assert_error(await editor.delete("/v1/secrets/api-key"), 409, None)
    assert "nightly" in message
    assert_error(await editor.delete("/v1/secrets/other"), 404, None)
    await editor.delete("/v1/jobs/nightly")
    assert (await editor.delete("/v1/secrets/api-key")).status_code == 204
    assert (await editor.get("/v1/secrets")).json() == []


async def test_without_a_key_setting_a_secret_says_how_to_configure_one(make_state: MakeApp, client_for, engine) -> None:
    state = make_state(secret_key=None)  # and no $KJOB_HOME/secret.key
    editor = await client_for("acme", "editor", state=state)
    message = assert_error(await editor.put("/v1/secrets/api-key", json={"value": VALUE}), 503, None)
    assert "KJOB_SECRET_KEY" in message and "kjob secret keygen" in message
    assert await _rows(engine) == []


def test_a_key_that_is_not_a_fernet_key_is_refused_at_start(make_state: MakeApp) -> None:
    with pytest.raises(InvalidInput) as err:
        create_app(make_state(secret_key="not-a-key"))
    assert err.value.field == "secret_key"


async def test_rotation_and_binding_of_ciphertexts(engine: AsyncEngine) -> None:
    old, new = generate_key(), generate_key()
    acme = Actor(subject="test", token_id=None, tenant="acme")
    await SecretStore(engine, SecretBox(old)).set(acme, "api-key", VALUE)
    # the new key first, the old one after: old values still open, new ones use the new key
    rotated = SecretStore(engine, SecretBox(f"{new},{old}"))
    assert await rotated.values("acme", {"api-key"}) == {"api-key": VALUE}
    with pytest.raises(ServerError, match="cannot be decrypted"):
        await SecretStore(engine, SecretBox(new)).values("acme", {"api-key"})
    # a ciphertext copied onto another tenant's row does not open there
    [row] = await _rows(engine)
    async with engine.begin() as conn:
        await conn.execute(tenant_secrets.insert().values(tenant="globex", name="api-key", ciphertext=row.ciphertext))
    with pytest.raises(ServerError, match="belongs to another tenant"):
        await rotated.values("globex", {"api-key"})
