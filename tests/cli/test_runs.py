"""Short run ids at the gateway, against rows in a real ledger: a prefix that starts one of the
tenant's runs names it, one that starts several is refused naming `run_id` and the candidates,
and another tenant's runs neither match nor make a prefix ambiguous."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from kjob.store.tables import job_runs
from kjob.store.tokens import TokenStore
from tests.cli.conftest import Run, one_line_error, runner_for
from tests.support.gateway import GatewayServer

IDS = ["abcd1111-0000-4000-8000-000000000001", "abcd2222-0000-4000-8000-000000000002"]
OTHER = "abce3333-0000-4000-8000-000000000003"


async def _runs(engine: AsyncEngine, job: dict[str, object], ids: list[str]) -> None:
    slot = datetime(2026, 11, 30, 9, tzinfo=timezone.utc)
    async with engine.begin() as conn:
        await conn.execute(insert(job_runs), [
            {"id": run_id, "job_id": job["id"], "tenant": job["tenant"], "slug": job["slug"],
             "slot": slot + timedelta(minutes=i), "trigger": "manual", "status": "succeeded", "exit_code": 0,
             "started_at": slot, "finished_at": slot + timedelta(seconds=1)}
            for i, run_id in enumerate(ids)
        ])


def _job(kjob: Run, slug: str) -> dict[str, object]:
    created = kjob("create", "--slug", slug, "--agent", "shell", "--schedule", "@daily", "--prompt", "echo")
    assert created.exit_code == 0, created.output
    return json.loads(kjob("inspect", slug, "-o", "json").stdout)


async def test_short_run_ids(kjob: Run, engine: AsyncEngine, base_env: dict[str, str | None],
                             server: GatewayServer) -> None:
    await _runs(engine, _job(kjob, "mine"), IDS)
    _, globex_token = await TokenStore(engine).create("globex", "admin")
    globex = runner_for({**base_env, "KJOB_API_URL": server.url, "KJOB_TOKEN": globex_token})
    await _runs(engine, _job(globex, "theirs"), [OTHER])

    error = one_line_error(kjob("logs", "abcd"), "run_id")
    assert "'abcd' is the start of 2 runs (abcd1111-000, abcd2222-000); give more of the id" in error
    assert kjob("logs", "ABCD2").exit_code == 0  # ids are lowercase hex: the prefix is too
    table = kjob("runs", "mine").stdout
    assert "abcd1111 " in table and "abcd2222 " in table and IDS[0] not in table
    assert IDS[0] in kjob("runs", "mine", "--wide").stdout

    # another tenant's run is neither found nor counted
    assert "no run named 'abce' was found" in one_line_error(kjob("logs", "abce"))
    assert "no run named 'abcd' was found" in one_line_error(globex("logs", "abcd"))
    assert globex("logs", "abc").exit_code == 1  # under 4 characters: only a whole id
    assert "no run named 'abc' was found" in one_line_error(globex("logs", "abc"))
