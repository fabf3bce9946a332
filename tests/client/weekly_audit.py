"""A service that gives each of its tenants a weekly audit job, runs one now and follows its log.

The worked example of docs/sdk.md: `mypy --strict` checks it and tests/client runs it against a
real `kjob up`.
"""

from __future__ import annotations

import sys

from kjob.client import AsyncClient, Client, InvalidInput, JobSpec, RunStatus


def audit_job(tenant: str) -> JobSpec:
    """One tenant's job: every Monday at 09:00, Berlin time."""
    return JobSpec(
        slug=f"audit-{tenant}",
        prompt=f"echo auditing {tenant}",
        agent="shell",
        schedule="0 9 * * MON",
        timezone="Europe/Berlin",
        labels={"tenant": tenant},
    )


def provision(kjob: Client, tenants: list[str]) -> bool:
    """Create or update every tenant's job (all or none), run the first one now, print its log as
    it comes, and say whether it succeeded."""
    for result in kjob.jobs.apply(audit_job(t) for t in tenants):
        print(f"{result.action:<9} {result.job.slug}, next at {result.job.next_fire}")
    run = kjob.runs.run_now(f"audit-{tenants[0]}")
    for line in kjob.runs.logs(run.id, follow=True):
        print(f"  | {line}")
    return kjob.runs.wait(run.id, timeout_s=60).status is RunStatus.succeeded


async def provision_async(kjob: AsyncClient, tenants: list[str]) -> bool:
    """The same, from asyncio code."""
    for result in await kjob.jobs.apply(audit_job(t) for t in tenants):
        print(f"{result.action:<9} {result.job.slug}, next at {result.job.next_fire}")
    run = await kjob.runs.run_now(f"audit-{tenants[0]}")
    async for line in kjob.runs.logs(run.id, follow=True):
        print(f"  | {line}")
    return (await kjob.runs.wait(run.id, timeout_s=60)).status is RunStatus.succeeded


def main(tenants: list[str]) -> int:
    with Client() as kjob:  # KJOB_API_URL and KJOB_TOKEN, or the files `kjob up` writes
        try:
            return 0 if provision(kjob, tenants) else 1
        except InvalidInput as err:  # refused here, before any request, naming the field
            print(f"bad job: {err.field}: {err.message}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["acme", "globex"]))
