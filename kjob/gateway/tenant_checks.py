"""The checks of a write that depend on its tenant: the secrets a job references exist, its
schedule respects the tenant's minimum interval, the tenant stays within its job quota, and
run-now within its rate. Each runs before anything is written, so a refused write changes nothing."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncConnection

from kjob.errors import InvalidInput
from kjob.gateway.state import GatewayState
from kjob.model.job import JobSpec, Timing
from kjob.store.quotas import Quotas, check_interval, check_job_count, check_run_now_rate
from kjob.store.secrets import references


async def check_job_for_tenant(
    state: GatewayState, tenant: str, spec: JobSpec, now: datetime, previous: JobSpec | Timing | None = None
) -> None:
    """Raise InvalidInput (naming the field) if `spec` cannot be stored for `tenant`.

    The minimum interval is checked when the schedule or zone is new or changed, so a lowered
    quota does not block unrelated edits of an existing job.

    :raises InvalidInput: field `schedule` (fires too often), `sandbox.env.<VAR>` (a secret
        the tenant does not have, or a bad secret name), `sandbox.network` ("host" for a tenant
        the operator did not list).
    """
    assert state.secrets is not None, "create_app wires the secret store"
    if spec.sandbox.network == "host" and tenant not in state.settings.executor.host_network_tenants:
        raise InvalidInput(
            f"\"host\" (the node's own network) is not allowed for tenant {tenant!r}: the operator lists such "
            "tenants in executor.host_network_tenants; use \"egress\" to reach the outside, or \"none\"",
            "sandbox.network",
        )
    if previous is None or (previous.schedule, previous.timezone) != (spec.schedule, spec.timezone):
        check_interval(spec.schedule, spec.timezone, _quotas(state).limits(tenant), now)
    refs = references(spec.sandbox.env)
    if refs:
        known = await state.secrets.existing(tenant, set(refs.values()))
        for var, name in refs.items():
            if name not in known:
                raise InvalidInput(
                    f"references secret {name!r}, which this tenant does not have; "
                    f"create it first with `kjob secret set {name}`",
                    f"sandbox.env.{var}",
                )


async def check_new_jobs(state: GatewayState, tenant: str, adding: int) -> None:
    """Raise QuotaExceeded if the tenant may not have `adding` more jobs."""
    await check_job_count(state.engine, tenant, adding, _quotas(state).limits(tenant))


def run_now_guard(state: GatewayState, tenant: str) -> Callable[[AsyncConnection], Awaitable[None]]:
    """The check a run-now makes inside its own transaction: the tenant's run-now rate."""
    limits = _quotas(state).limits(tenant)

    async def guard(conn: AsyncConnection) -> None:
        await check_run_now_rate(conn, tenant, limits)

    return guard


def _quotas(state: GatewayState) -> Quotas:
    assert state.quotas is not None, "create_app wires the quotas"
    return state.quotas
