"""Tenant secrets: named values a job's sandbox gets as environment variables, stored encrypted.

A job references a secret by name from `sandbox.env`, as the whole value:

    env = { API_KEY = "secret:api-key", REGION = "eu-west-1" }

so a value starting with `secret:` is always a reference, never a literal. The reference is
what the job stores and the API shows; the executor swaps in the value just before it starts
the attempt (kjob.executor.secrets).

At rest each value is a Fernet token (AES-128-CBC + HMAC-SHA256) made with the node's secret
key, over `[tenant, name, value]`: a ciphertext copied onto another tenant's or name's row
does not decrypt there. Several keys may be given (comma-separated): the first encrypts, all
decrypt, so a key can be rotated by putting the new one first.
"""

from __future__ import annotations

import builtins
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from kjob._time import utcnow
from kjob.config import Settings
from kjob.errors import Conflict, InvalidInput, NotFound, ServerError
from kjob.model.secrets import check_name
from kjob.private_files import write_private
from kjob.store.audit import Actor, record_by
from kjob.store.tables import jobs, tenant_secrets

#: What marks an env value as a reference: `"secret:<name>"`.
REFERENCE_PREFIX = "secret:"
MAX_VALUE_BYTES = 64 * 1024
KEYGEN_HINT = "generate one with `kjob secret keygen`"


class SecretKeyMissing(ServerError):
    """This node has no secret key, so it can neither store nor read secrets."""

    def __init__(self) -> None:
        super().__init__(
            "secrets are not configured on this server: set KJOB_SECRET_KEY on every node "
            f"({KEYGEN_HINT}), or let `kjob up` create $KJOB_HOME/secret.key"
        )


def references(env: Mapping[str, str], field: str = "sandbox.env") -> dict[str, str]:
    """`{env var: secret name}` for the values of `env` that reference a secret.

    :raises InvalidInput: a `secret:` value whose name cannot be a secret's (field
        `<field>.<VAR>`).
    """
    refs: dict[str, str] = {}
    for var, value in env.items():
        if isinstance(value, str) and value.startswith(REFERENCE_PREFIX):
            refs[var] = check_name(value[len(REFERENCE_PREFIX):], f"{field}.{var}")
    return refs


def generate_key() -> str:
    return Fernet.generate_key().decode()


class SecretBox:
    """Seals and opens secret values with the node's key(s)."""

    def __init__(self, keys: str) -> None:
        """`keys`: one Fernet key, or several comma-separated (the first encrypts).

        :raises InvalidInput: field `secret_key`, for text that is not Fernet keys.
        """
        parts = [k.strip() for k in keys.split(",") if k.strip()]
        try:
            self._fernet = MultiFernet([Fernet(k) for k in parts])
        except (ValueError, TypeError):
            raise InvalidInput(
                f"is not a Fernet key (32 url-safe base64-encoded bytes); {KEYGEN_HINT}", "secret_key"
            ) from None

    @classmethod
    def from_settings(cls, settings: Settings) -> SecretBox | None:
        """The box of `KJOB_SECRET_KEY`, else of `$KJOB_HOME/secret.key`; None if neither is set."""
        if settings.secret_key:
            return cls(settings.secret_key)
        try:
            text = settings.secret_key_file.read_text().strip()
        except FileNotFoundError:
            return None
        return cls(text) if text else None

    def seal(self, tenant: str, name: str, value: str) -> str:
        return self._fernet.encrypt(json.dumps([tenant, name, value]).encode()).decode()

    def open(self, tenant: str, name: str, ciphertext: str) -> str:
        """The value; raises ServerError if this key cannot open it or it belongs elsewhere."""
        try:
            owner, owned_name, value = json.loads(self._fernet.decrypt(ciphertext.encode()))
        except (InvalidToken, ValueError):
            raise ServerError(
                f"secret {name!r} cannot be decrypted with this node's KJOB_SECRET_KEY: give every node "
                "the key it was stored with (new key first, old ones after, comma-separated)"
            ) from None
        if (owner, owned_name) != (tenant, name):
            raise ServerError(f"the stored secret {name!r} belongs to another tenant or name; set it again")
        return value


def ensure_key_file(path: Path) -> None:
    """Create a key file (mode 0600) at `path` unless one exists: `kjob up`'s default key."""
    if path.exists():
        return
    write_private(path, generate_key() + "\n")


@dataclass(frozen=True)
class SecretInfo:
    """A secret as lists show it: never the value."""

    name: str
    created_at: datetime
    updated_at: datetime


def _target(name: str) -> str:
    return f"secret/{name}"


class SecretStore:
    def __init__(self, engine: AsyncEngine, box: SecretBox | None) -> None:
        self.engine = engine
        self.box = box

    def _box(self) -> SecretBox:
        if self.box is None:
            raise SecretKeyMissing()
        return self.box

    async def set(self, actor: Actor, name: str, value: str) -> tuple[SecretInfo, bool]:
        """Store `value` as the actor's tenant's secret `name`. Returns it and whether it is new.

        :raises InvalidInput: a bad name, an empty value or one over 64 KiB.
        :raises SecretKeyMissing: this node has no key.
        """
        check_name(name)
        if not isinstance(value, str) or not value:
            raise InvalidInput("a secret's value cannot be empty", "value")
        if len(value.encode()) > MAX_VALUE_BYTES:
            raise InvalidInput(f"a secret's value can be at most {MAX_VALUE_BYTES // 1024} KiB", "value")
        if "\x00" in value:
            raise InvalidInput("holds a NUL character (\\0), which an environment variable cannot carry", "value")
        ciphertext = self._box().seal(actor.tenant, name, value)
        now = utcnow()
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(
                    insert(tenant_secrets)
                    .values(tenant=actor.tenant, name=name, ciphertext=ciphertext, created_at=now, updated_at=now)
                    .on_conflict_do_update(
                        index_elements=[tenant_secrets.c.tenant, tenant_secrets.c.name],
                        set_={"ciphertext": ciphertext, "updated_at": now},
                    )
                    .returning(tenant_secrets.c.created_at, tenant_secrets.c.updated_at)
                )
            ).one()
            created = row.created_at == now
            # The audit row says that the value changed, never what it is.
            await record_by(conn, actor, "secret.set", _target(name), {"created": created})
        return SecretInfo(name=name, created_at=row.created_at, updated_at=row.updated_at), created

    async def list(self, tenant: str) -> builtins.list[SecretInfo]:  # `list` is this method here
        query = (
            select(tenant_secrets.c.name, tenant_secrets.c.created_at, tenant_secrets.c.updated_at)
            .where(tenant_secrets.c.tenant == tenant)
            .order_by(tenant_secrets.c.name)
        )
        async with self.engine.connect() as conn:
            return [SecretInfo(**row._mapping) for row in await conn.execute(query)]

    async def existing(self, tenant: str, names: set[str]) -> set[str]:
        """Which of `names` the tenant has."""
        if not names:
            return set()
        query = select(tenant_secrets.c.name).where(
            tenant_secrets.c.tenant == tenant, tenant_secrets.c.name.in_(sorted(names))
        )
        async with self.engine.connect() as conn:
            return set((await conn.execute(query)).scalars())

    async def delete(self, actor: Actor, name: str) -> None:
        """Delete the actor's tenant's secret `name`.

        :raises NotFound: no such secret in the tenant.
        :raises Conflict: jobs still reference it (named in the message); their runs would fail.
        """
        check_name(name)
        async with self.engine.begin() as conn:
            users = await self._jobs_using(conn, actor.tenant, name)
            if users:
                shown = ", ".join(users[:10]) + (f" and {len(users) - 10} more" if len(users) > 10 else "")
                raise Conflict(
                    f"secret {name!r} is used by job(s) {shown}; remove it from their sandbox.env first"
                )
            deleted = (
                await conn.execute(
                    tenant_secrets.delete()
                    .where(tenant_secrets.c.tenant == actor.tenant, tenant_secrets.c.name == name)
                    .returning(tenant_secrets.c.name)
                )
            ).first()
            if deleted is None:
                raise NotFound("secret", name)
            await record_by(conn, actor, "secret.delete", _target(name), None)

    async def _jobs_using(self, conn, tenant: str, name: str) -> builtins.list[str]:
        reference = REFERENCE_PREFIX + name
        rows = await conn.execute(
            select(jobs.c.slug, jobs.c.spec["sandbox"]["env"]).where(jobs.c.tenant == tenant).order_by(jobs.c.slug)
        )
        return [slug for slug, env in rows if isinstance(env, dict) and reference in env.values()]

    async def values(self, tenant: str, names: set[str]) -> dict[str, str]:
        """The plaintext of the tenant's secrets `names`: for the executor only.

        :raises NotFound: one of them does not exist (the first missing one is named).
        :raises SecretKeyMissing: this node has no key; ServerError: the key cannot open one.
        """
        if not names:
            return {}
        box = self._box()
        query = select(tenant_secrets.c.name, tenant_secrets.c.ciphertext).where(
            tenant_secrets.c.tenant == tenant, tenant_secrets.c.name.in_(sorted(names))
        )
        async with self.engine.connect() as conn:
            rows = {name: ciphertext for name, ciphertext in await conn.execute(query)}
        missing = sorted(names - rows.keys())
        if missing:
            raise NotFound("secret", missing[0])
        return {name: box.open(tenant, name, ciphertext) for name, ciphertext in rows.items()}
