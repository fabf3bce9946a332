"""API tokens on a real PostgreSQL: create, verify, list, revoke, and `kjob up`'s admin token."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from kjob.errors import InvalidInput, NotFound
from kjob.store.audit import Actor, list_audit
from kjob.store.tables import api_tokens
from kjob.store.tokens import Principal, TokenStore, ensure_admin_token


@pytest.fixture
def tokens(engine: AsyncEngine) -> TokenStore:
    return TokenStore(engine)


async def test_a_new_token_verifies_as_its_tenant_and_role(tokens: TokenStore) -> None:
    token_id, secret = await tokens.create("acme", "editor", "ci deploys")

    assert secret.startswith(f"kjob_{token_id}_")
    assert await tokens.verify(secret) == Principal(tenant="acme", role="editor", token_id=token_id)


async def test_wrong_or_tampered_secrets_do_not_verify(tokens: TokenStore) -> None:
    _, secret = await tokens.create("acme", "viewer")

    assert await tokens.verify(secret[:-1] + ("A" if secret[-1] != "A" else "B")) is None
    assert await tokens.verify("kjob_nothing_here") is None
    assert await tokens.verify("") is None


async def test_only_the_hash_of_the_secret_is_stored(tokens: TokenStore, engine: AsyncEngine) -> None:
    _, secret = await tokens.create("acme", "admin")
    async with engine.connect() as conn:
        stored = (await conn.execute(select(api_tokens))).one()
    assert secret not in [str(v) for v in stored]
    assert secret.split("_")[-1] not in stored.secret_hash


async def test_an_unknown_role_is_refused_and_creates_nothing(tokens: TokenStore) -> None:
    with pytest.raises(InvalidInput) as err:
        await tokens.create("acme", "superuser")
    assert err.value.field == "role"
    assert "viewer, operator, editor, admin" in err.value.message
    assert await tokens.list("acme") == []


async def test_list_shows_the_tenants_tokens_without_secrets(tokens: TokenStore) -> None:
    first, secret1 = await tokens.create("acme", "viewer", "dashboard")
    second, secret2 = await tokens.create("acme", "admin", "ops")
    await tokens.create("globex", "admin")

    listed = await tokens.list("acme")

    assert [(t.id, t.role, t.name) for t in listed] == [(first, "viewer", "dashboard"), (second, "admin", "ops")]
    assert all(t.tenant == "acme" and t.revoked_at is None for t in listed)
    shown = repr(listed)
    assert secret1 not in shown and secret2 not in shown


async def test_a_revoked_token_stops_verifying_at_once(tokens: TokenStore) -> None:
    token_id, secret = await tokens.create("acme", "operator")

    await tokens.revoke("acme", token_id)

    assert await tokens.verify(secret) is None
    [info] = await tokens.list("acme")
    assert info.revoked_at is not None
    await tokens.revoke("acme", token_id)  # again: nothing to do, no error


async def test_a_tenant_cannot_revoke_another_tenants_token(tokens: TokenStore) -> None:
    token_id, secret = await tokens.create("acme", "admin")

    with pytest.raises(NotFound):
        await tokens.revoke("globex", token_id)

    assert await tokens.verify(secret) is not None


async def test_token_changes_by_an_actor_are_audited(tokens: TokenStore, engine: AsyncEngine) -> None:
    admin = Actor(subject="token:root", token_id="root", tenant="acme")

    token_id, _ = await tokens.create("acme", "viewer", "grafana", actor=admin)
    await tokens.revoke("acme", token_id, actor=admin)

    entries = list(reversed(await list_audit(engine, "acme")))
    assert [(e.action, e.target, e.actor) for e in entries] == [
        ("token.create", f"token/{token_id}", "token:root"),
        ("token.revoke", f"token/{token_id}", "token:root"),
    ]
    assert entries[0].change == {"role": "viewer", "name": "grafana"}


def test_roles_are_ordered() -> None:
    editor = Principal(tenant="acme", role="editor", token_id="x")
    assert editor.allows("viewer") and editor.allows("operator") and editor.allows("editor")
    assert not editor.allows("admin")


async def test_ensure_admin_token_writes_a_private_file_and_reuses_it(tokens: TokenStore, tmp_path: Path) -> None:
    token_file = tmp_path / "home" / "admin.token"

    secret = await ensure_admin_token(tokens, token_file)

    assert token_file.read_text().strip() == secret
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    principal = await tokens.verify(secret)
    assert principal is not None and (principal.tenant, principal.role) == ("default", "admin")

    assert await ensure_admin_token(tokens, token_file) == secret
    assert len(await tokens.list("default")) == 1


async def test_ensure_admin_token_replaces_a_revoked_or_foreign_token(tokens: TokenStore, tmp_path: Path) -> None:
    token_file = tmp_path / "admin.token"
    old = await ensure_admin_token(tokens, token_file)
    [info] = await tokens.list("default")
    await tokens.revoke("default", info.id)

    new = await ensure_admin_token(tokens, token_file)

    assert new != old
    assert token_file.read_text().strip() == new
    assert await tokens.verify(new) is not None

    token_file.write_text("kjob_from_another_database_x\n")
    newest = await ensure_admin_token(tokens, token_file)
    assert newest not in (old, new) and await tokens.verify(newest) is not None
