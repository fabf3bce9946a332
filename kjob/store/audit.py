"""Who changed what: one `audit_log` row per write, in the same transaction as the write.

Writing the row inside the write's own transaction means a change without its audit row (or
an audit row for a change that was rolled back) cannot exist.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from kjob.store.tables import audit_log


@dataclass(frozen=True)
class Actor:
    """Who makes a change: a subject (a user or service name), the API token it used, and the
    tenant it acts in. Every change is made in the actor's tenant and no other."""

    subject: str
    token_id: str | None
    tenant: str


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: datetime
    tenant: str
    actor: str
    token_id: str | None
    action: str
    target: str
    change: dict[str, Any] | None


async def record(
    conn: AsyncConnection,
    tenant: str,
    actor: str,
    token_id: str | None,
    action: str,
    target: str,
    change: dict[str, Any] | None,
) -> None:
    """Add one audit row. Call it inside the transaction of the change it describes.

    `action` is `<kind>.<verb>` (e.g. `job.update`), `target` names the object (`job/<slug>`),
    `change` is JSON describing what changed (for updates: `{field: {"from": ..., "to": ...}}`).
    """
    await conn.execute(
        audit_log.insert().values(
            tenant=tenant, actor=actor, token_id=token_id, action=action, target=target, change=change
        )
    )


async def record_by(
    conn: AsyncConnection, actor: Actor, action: str, target: str, change: dict[str, Any] | None
) -> None:
    """`record` for a change made by `actor` in its own tenant."""
    await record(conn, actor.tenant, actor.subject, actor.token_id, action, target, change)


#: Audit rows of many changes, in the order given (their ids say it), from columns as arrays.
_RECORD_MANY_SQL = """
INSERT INTO audit_log (tenant, actor, token_id, action, target, change)
SELECT $1, $2, $3, a.action, a.target, a.change::jsonb
FROM unnest($4::text[], $5::text[], $6::text[]) WITH ORDINALITY AS a(action, target, change, i)
ORDER BY a.i
"""


async def record_many_raw(db: asyncpg.Connection, actor: Actor, entries: list[tuple[str, str, str]]) -> None:
    """`record_by` of many `(action, target, change as JSON text)` in one statement, on the
    asyncpg connection of the caller's transaction (`JobStore.apply_many`)."""
    if entries:
        actions, targets, changes = (list(column) for column in zip(*entries, strict=True))
        await db.execute(_RECORD_MANY_SQL, actor.tenant, actor.subject, actor.token_id, actions, targets, changes)


async def list_audit(
    engine: AsyncEngine, tenant: str, *, target: str | None = None, limit: int = 100
) -> list[AuditEntry]:
    """The tenant's audit rows, newest first; only those about `target` if given."""
    query = select(audit_log).where(audit_log.c.tenant == tenant)
    if target is not None:
        query = query.where(audit_log.c.target == target)
    query = query.order_by(audit_log.c.at.desc(), audit_log.c.id.desc()).limit(limit)
    async with engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    return [
        AuditEntry(
            id=r.id, at=r.at, tenant=r.tenant, actor=r.actor, token_id=r.token_id,
            action=r.action, target=r.target, change=r.change,
        )
        for r in rows
    ]
