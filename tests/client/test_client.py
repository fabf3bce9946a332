"""kjob.client against a real `kjob up`, every call, each test once with `Client` and once
with `AsyncClient` (the `api` fixture). Answers are checked as a caller would use them:
typed models, exceptions by kind carrying the server's message and field."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from kjob.bus import names
from kjob.client import (
    AppliedAction,
    ApplyResult,
    AsyncClient,
    Client,
    Conflict,
    Forbidden,
    InvalidInput,
    JobSpec,
    JobView,
    NotFound,
    QuotaExceeded,
    RateLimited,
    RunDetail,
    RunStatus,
    ServerUnavailable,
    Unauthorized,
    WaitTimedOut,
)
from tests.client.conftest import TINY, close, collect, done, job, kind, like, tenant_token
from tests.support.up import KjobUp

Api = Client | AsyncClient


async def test_jobs_create_get_update_enable_disable_preview_delete(api: Api) -> None:
    created = await done(api.jobs.create(JobSpec(**job("audit"))))  # type: ignore[arg-type]
    assert isinstance(created, JobView) and created.slug == "audit" and created.timezone == "Europe/Berlin"
    assert created.next_fire is not None and created.timeout == timedelta(minutes=30)
    assert (await done(api.jobs.get("audit"))).id == created.id

    updated = await done(api.jobs.update("audit", {"retries": {"max": 2}}, timeout="1h", description="weekly"))
    assert (updated.retries.max, updated.timeout, updated.description) == (2, timedelta(hours=1), "weekly")
    assert updated.retries.backoff == created.retries.backoff  # nested tables merge key by key

    paused = await done(api.jobs.disable("audit", note="migration"))
    assert not paused.enabled and paused.paused_note == "migration" and paused.next_fire is None
    assert (await done(api.jobs.enable("audit"))).enabled

    fires = await done(api.jobs.preview("30 2 * * *", tz="America/New_York", n=3, after="2026-03-07T00:00:00Z"))
    assert fires == [datetime(2026, 3, 7, 7, 30, tzinfo=timezone.utc), datetime(2026, 3, 8, 7, 0, tzinfo=timezone.utc),
                     datetime(2026, 3, 9, 6, 30, tzinfo=timezone.utc)]

    assert await done(api.jobs.delete("audit")) is None
    with pytest.raises(NotFound) as missing:
        await done(api.jobs.get("audit"))
    assert missing.value.status == 404 and missing.value.message == "no job named 'audit' was found"


async def test_apply_is_idempotent_and_a_bad_job_refuses_the_batch_naming_it(api: Api) -> None:
    specs = [job("a-one"), JobSpec(**job("a-two"))]  # type: ignore[arg-type]
    first = await done(api.jobs.apply(specs))
    assert [(r.action, r.job.slug) for r in first] == [("created", "a-one"), ("created", "a-two")]
    assert all(isinstance(r, ApplyResult) for r in first)
    again = await done(api.jobs.apply(specs))
    assert [r.action for r in again] == ["unchanged", "unchanged"]

    # refused in this process, by the model the server validates with: the same field name
    with pytest.raises(InvalidInput) as local:
        await done(api.jobs.apply([job("a-one", description="changed"), job("a-three", schedule="61 * * * *")]))
    assert local.value.field == "jobs.1.schedule" and local.value.status is None
    # refused by the server (only it knows the agents): the same exception, with its status
    with pytest.raises(InvalidInput) as remote:
        await done(api.jobs.apply([job("a-one", description="changed"), job("a-three", agent="nobody")]))
    assert remote.value.field == "jobs.1.agent" and remote.value.status == 422 and "nobody" in remote.value.message
    jobs = await collect(api.jobs.list())
    assert [(j.slug, j.description) for j in jobs] == [("a-one", ""), ("a-two", "")]  # all or nothing


async def test_apply_actions_answers_slug_and_action_and_leaves_the_checks_to_the_server(api: Api) -> None:
    first = await done(api.jobs.apply_actions([job("b-one"), JobSpec(**job("b-two"))]))  # type: ignore[arg-type]
    assert first == [AppliedAction(slug="b-one", action="created"), AppliedAction(slug="b-two", action="created")]
    changed = await done(api.jobs.apply_actions([job("b-one", description="changed"), job("b-two")]))
    assert [(r.slug, r.action) for r in changed] == [("b-one", "updated"), ("b-two", "unchanged")]

    # a bad value is refused by the server (422), in the words of the model, naming the job
    with pytest.raises(InvalidInput) as remote:
        await done(api.jobs.apply_actions([job("b-one", description="again"), job("b-three", schedule="61 * * * *")]))
    assert remote.value.field == "jobs.1.schedule" and remote.value.status == 422
    assert remote.value.message.startswith("job 'b-three': '61 * * * *'")
    # one JSON cannot carry (a job file's date) is refused here, in the same words
    with pytest.raises(InvalidInput) as local:
        await done(api.jobs.apply_actions([job("b-one", description=datetime(2026, 1, 1, tzinfo=timezone.utc))]))
    assert local.value.field == "jobs.0.description" and local.value.status is None
    assert local.value.message == "job 'b-one': Input should be a valid string"
    jobs = await collect(api.jobs.list())
    assert [(j.slug, j.description) for j in jobs] == [("b-one", "changed"), ("b-two", "")]  # all or nothing


async def test_list_pages_past_one_page(api: Api) -> None:
    slugs = [f"page-{i:02d}" for i in range(7)]
    await done(api.jobs.apply([job(s) for s in reversed(slugs)]))
    # the server answers at most `limit` jobs a request: seven from pages of two took four pages
    assert [j.slug for j in await collect(api.jobs.list(page_size=2))] == slugs
    assert [j.slug for j in await collect(api.jobs.list(page_size=7))] == slugs  # a full last page


async def test_run_now_wait_logs_short_ids_and_paged_history(api: Api) -> None:
    await done(api.jobs.create(job("hello")))
    run = await done(api.runs.run_now("hello", wait=True, timeout_s=60))
    assert isinstance(run, RunDetail) and run.status is RunStatus.succeeded and run.exit_code == 0
    assert run.attempts and run.attempts[-1].status is RunStatus.succeeded
    assert await collect(api.runs.logs(run.id)) == ["hello from hello"]

    short = run.id[:8]
    assert (await done(api.runs.get(short))).id == run.id  # a short id, as tables show it
    assert await collect(api.runs.logs(short)) == ["hello from hello"]

    for _ in range(2):
        await done(api.runs.run_now("hello", wait=True, timeout_s=60))
    history = await collect(api.runs.list("hello", page_size=2))
    assert len(history) == 3 and history[-1].id == run.id  # newest slot first, across two pages
    assert [r.slot for r in history] == sorted((r.slot for r in history), reverse=True)


async def test_follow_a_live_log_and_wait_with_a_deadline(api: Api) -> None:
    await done(api.jobs.create(job("slow", prompt="echo one; sleep 1.5; echo two")))
    run = await done(api.runs.run_now("slow"))
    assert run.status is not RunStatus.succeeded  # still going: the lines below arrive live
    with pytest.raises(WaitTimedOut) as late:
        await done(api.runs.wait(run.id, timeout_s=0.2))
    assert late.value.run.id == run.id and not late.value.run.status.final
    assert await collect(api.runs.logs(run.id, follow=True)) == ["one", "two"]
    assert (await done(api.runs.wait(run.id, timeout_s=30))).status is RunStatus.succeeded


async def test_backfill_runs_past_slots_once(api: Api) -> None:
    await done(api.jobs.create(job("hourly", schedule="@every 1h", enabled=False)))
    now = datetime.now(timezone.utc)
    start, end = now - timedelta(hours=3), now - timedelta(minutes=1)
    first = await done(api.runs.backfill("hourly", start, end, overlap="allow"))
    assert first.slots == first.queued == len(first.run_ids) >= 2 and first.existing == 0
    again = await done(api.runs.backfill("hourly", start.isoformat(), end.isoformat()))
    assert (again.queued, again.existing) == (0, first.slots)


async def test_tokens_secrets_audit_quotas_status(api: Api, up: KjobUp) -> None:
    token = await done(api.tokens.create("viewer", name="dashboards"))
    assert token.secret and token.role == "viewer"
    listed = await done(api.tokens.list())
    assert token.id in [t.id for t in listed] and all(not hasattr(t, "secret") for t in listed)
    viewer = like(api, up.url, token.secret)
    try:
        assert await collect(viewer.jobs.list()) == []
        await done(api.tokens.revoke(token.id))
        with pytest.raises(Unauthorized):
            await collect(viewer.jobs.list())
    finally:
        await close(viewer)

    secret = await done(api.secrets.set("api-key", "s3cret"))
    assert secret.name == "api-key"
    assert [s.name for s in await done(api.secrets.list())] == ["api-key"]
    await done(api.secrets.delete("api-key"))
    assert await done(api.secrets.list()) == []

    await done(api.jobs.create(job("watched")))
    entries = await done(api.audit.list(slug="watched"))
    assert [(e.action, e.target) for e in entries] == [("job.create", "job/watched")]
    assert {e.action for e in await done(api.audit.list(limit=10))} >= {"secret.set", "secret.delete", "job.create"}

    quotas = await done(api.quotas.get())
    assert quotas.usage.jobs == 1 and quotas.limits.max_jobs >= 1

    status = await done(api.status())
    assert status.leader is not None and [n["node"] for n in status.nodes] == [status.leader.node]
    assert status.streams[names.RUNS_STREAM]["exists"] and status.streams[names.LOGS_STREAM]["exists"]


async def test_each_error_kind_carries_the_servers_message(api: Api, up: KjobUp, admin: Client) -> None:
    await done(api.jobs.create(job("taken")))
    with pytest.raises(Conflict) as taken:
        await done(api.jobs.create(job("taken")))
    assert taken.value.status == 409 and not isinstance(taken.value, QuotaExceeded)
    assert "already exists" in taken.value.message and "`kjob update`" in taken.value.message

    with pytest.raises(InvalidInput) as bad:  # refused before any request, as the API would
        await done(api.jobs.create(job("bad", timezone="Mars/Olympus_Mons")))
    assert bad.value.field == "timezone" and bad.value.status is None
    with pytest.raises(InvalidInput) as unknown:
        await done(api.jobs.create(job("bad", agent="nobody")))
    assert unknown.value.field == "agent" and unknown.value.status == 422
    with pytest.raises(InvalidInput) as slug:
        await done(api.jobs.get("../tokens"))
    assert slug.value.field == "slug"
    with pytest.raises(NotFound):
        await done(api.runs.get("ffffffff"))

    viewer = like(api, up.url, tenant_token(admin, role="viewer"))
    tiny = like(api, up.url, tenant_token(admin, TINY[kind(api)]))
    try:
        with pytest.raises(Forbidden) as forbidden:
            await done(viewer.jobs.create(job("nope")))
        assert forbidden.value.status == 403 and "role" in forbidden.value.message

        await done(tiny.jobs.create(job("only")))
        with pytest.raises(QuotaExceeded) as quota:
            await done(tiny.jobs.create(job("second")))
        assert quota.value.status == 409 and not isinstance(quota.value, RateLimited)
        await done(tiny.runs.run_now("only"))
        with pytest.raises(RateLimited) as rate:
            await done(tiny.runs.run_now("only"))
        assert rate.value.status == 429 and rate.value.retry_after_s >= 1
    finally:
        await close(viewer)
        await close(tiny)

    gone = like(api, "http://127.0.0.1:9", "kjob_x")
    try:
        with pytest.raises(ServerUnavailable) as down:
            await done(gone.status())
        assert down.value.status is None and "cannot reach the kjob API at http://127.0.0.1:9" in str(down.value)
    finally:
        await close(gone)
