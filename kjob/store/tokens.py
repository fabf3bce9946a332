"""API tokens: bearer secrets that name a tenant and a role.

A secret reads `kjob_<id>_<random>`: the id lets people tell tokens apart in lists and logs
without the secret. Only the sha256 of the secret is stored, so the database never holds a
usable token; the secret is shown once, when the token is created.
"""

from __future__ import annotations

import builtins
import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from kjob._time import utcnow
from kjob.errors import InvalidInput, NotFound
from kjob.private_files import write_private
from kjob.store.audit import Actor, record
from kjob.store.tables import api_tokens

#: Each role can do what the roles before it can: viewer reads, operator enables and disables,
#: editor creates, changes and deletes jobs, admin manages tokens.
ROLES = ("viewer", "operator", "editor", "admin")

#: The tenant of the admin token `kjob up` creates.
DEFAULT_TENANT = "default"

#: A tenant name is one NATS subject token (`kjob.run.due.<tenant>`): no dots, wildcards or spaces.
TENANT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")

_PREFIX = "kjob_"


@dataclass(frozen=True)
class Principal:
    """Who a valid token speaks for."""

    tenant: str
    role: str
    #: kjob's own token id; for an OIDC token, its `jti` claim if it has one.
    token_id: str | None
    #: The OIDC `sub` claim; None for kjob's own tokens, which `who` names by token id.
    subject: str | None = None

    @property
    def who(self) -> str:
        """The actor the audit log names."""
        return self.subject if self.subject is not None else f"token:{self.token_id}"

    def allows(self, role: str) -> bool:
        """Whether this principal's role is `role` or higher."""
        return self.role in ROLES and ROLES.index(self.role) >= ROLES.index(role)


@dataclass(frozen=True)
class TokenInfo:
    """A token as lists show it: never the secret."""

    id: str
    tenant: str
    role: str
    name: str
    created_at: datetime
    revoked_at: datetime | None


def check_tenant(tenant: str, field: str = "tenant") -> str:
    """Return `tenant` if it can name a tenant, else raise InvalidInput naming `field`."""
    if not isinstance(tenant, str) or not TENANT_PATTERN.fullmatch(tenant):
        raise InvalidInput(
            f"{tenant!r} is not a tenant name: use 1-64 letters, digits, '-' or '_', starting with a letter or digit",
            field,
        )
    return tenant


def check_role(role: str, field: str = "role") -> str:
    if role not in ROLES:
        raise InvalidInput(f"unknown role {role!r}; use one of {', '.join(ROLES)}", field)
    return role


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class TokenStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def create(self, tenant: str, role: str, name: str = "", *, actor: Actor | None = None) -> tuple[str, str]:
        """Create a token; return `(token_id, secret)`. The secret cannot be read back later.

        With `actor`, the creation is written to the audit log of `tenant` (which may differ
        from the actor's own: an admin of the admin tenant manages every tenant's tokens).
        """
        check_tenant(tenant)
        check_role(role)
        if len(name) > 128:
            raise InvalidInput("a token name can be at most 128 characters", "name")
        token_id = secrets.token_hex(6)
        secret = f"{_PREFIX}{token_id}_{secrets.token_urlsafe(32)}"
        async with self.engine.begin() as conn:
            await conn.execute(
                api_tokens.insert().values(
                    id=token_id, tenant=tenant, role=role, name=name,
                    secret_hash=hash_secret(secret), created_at=utcnow(),
                )
            )
            if actor is not None:
                await _record(conn, tenant, actor, "token.create", token_id, {"role": role, "name": name})
        return token_id, secret

    async def verify(self, secret: str) -> Principal | None:
        """The principal of `secret`; None if it is unknown, malformed or revoked."""
        if not secret.startswith(_PREFIX):
            return None
        query = select(api_tokens.c.id, api_tokens.c.tenant, api_tokens.c.role).where(
            api_tokens.c.secret_hash == hash_secret(secret), api_tokens.c.revoked_at.is_(None)
        )
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).first()
        if row is None:
            return None
        return Principal(tenant=row.tenant, role=row.role, token_id=row.id)

    async def list(self, tenant: str) -> builtins.list[TokenInfo]:  # `list` is this method here
        """The tenant's tokens, revoked ones included, oldest first."""
        return await self._select(api_tokens.c.tenant == tenant)

    async def _select(self, *where: Any) -> builtins.list[TokenInfo]:
        query = (
            select(api_tokens.c.id, api_tokens.c.tenant, api_tokens.c.role, api_tokens.c.name,
                   api_tokens.c.created_at, api_tokens.c.revoked_at)
            .where(*where)
            .order_by(api_tokens.c.created_at, api_tokens.c.id)
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [TokenInfo(**row._mapping) for row in rows]

    async def get(self, tenant: str, token_id: str) -> TokenInfo:
        """The tenant's token `token_id`. Raises NotFound (also for another tenant's token)."""
        for info in await self._select(api_tokens.c.tenant == tenant, api_tokens.c.id == token_id):
            return info
        raise NotFound("token", token_id)

    async def revoke(self, tenant: str, token_id: str, *, actor: Actor | None = None) -> None:
        """Revoke the tenant's token `token_id` (at once: the next request with it is refused).

        Revoking a revoked token changes nothing. Raises NotFound for another tenant's token.
        """
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(
                    select(api_tokens.c.revoked_at)
                    .where(api_tokens.c.tenant == tenant, api_tokens.c.id == token_id)
                    .with_for_update()
                )
            ).first()
            if row is None:
                raise NotFound("token", token_id)
            if row.revoked_at is not None:
                return
            await conn.execute(
                api_tokens.update()
                .where(api_tokens.c.id == token_id)
                .values(revoked_at=utcnow())
            )
            if actor is not None:
                await _record(conn, tenant, actor, "token.revoke", token_id, None)


async def _record(
    conn: AsyncConnection, tenant: str, actor: Actor, action: str, token_id: str, change: dict[str, Any] | None
) -> None:
    """Audit a token operation in the tenant that owns the token, saying so if the actor is of another."""
    if actor.tenant != tenant:
        change = {**(change or {}), "by_tenant": actor.tenant}
    await record(conn, tenant, actor.subject, actor.token_id, action, f"token/{token_id}", change)


async def ensure_admin_token(store: TokenStore, token_file: Path) -> str:
    """The admin token in `token_file` if it is still valid; else a new admin token of tenant
    `default`, written to `token_file` (mode 0600). Returns the secret."""
    if token_file.exists():
        secret = token_file.read_text().strip()
        principal = await store.verify(secret)
        if principal is not None and principal.role == "admin":
            return secret
    _, secret = await store.create(DEFAULT_TENANT, "admin", "admin (kjob up)")
    write_private(token_file, secret + "\n")
    return secret
