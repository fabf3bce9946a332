"""JobStore on a real PostgreSQL: CRUD, idempotent apply, pause/resume, tenancy, audit."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from kjob._time import utcnow
from kjob.errors import Conflict, InvalidInput, NotFound
from kjob.model.job import JobSpec, parse_job
from kjob.store.audit import Actor, list_audit
from kjob.store.jobs import JobStore
from kjob.store.tables import job_dispatch_targets, job_runs
from kjob.store.tables import jobs as jobs_table

ALICE = Actor(subject="alice", token_id="tok-a", tenant="acme")
BOB = Actor(subject="bob", token_id="tok-b", tenant="globex")


def spec(slug: str = "nightly-report", **fields: Any) -> JobSpec:
    return parse_job({"slug": slug, "prompt": "summarise the day", "agent": "kode", "schedule": "0 9 * * *", **fields})


@pytest.fixture
def store(engine: AsyncEngine) -> JobStore:
    return JobStore(engine)


async def _target(engine: AsyncEngine, job_id: object) -> tuple[str, str]:
    async with engine.connect() as conn:
        row = (await conn.execute(select(job_dispatch_targets).where(job_dispatch_targets.c.job_id == job_id))).one()
    return row.channel, row.kind


async def _version(engine: AsyncEngine, slug: str) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(select(jobs_table.c.version).where(jobs_table.c.slug == slug))).scalar_one())


async def test_create_then_get_returns_the_spec_with_what_the_store_assigned(store: JobStore) -> None:
    written = spec(timezone="Europe/Berlin", timeout="45m", retries={"max": 2}, labels={"team": "ops"})

    created = await store.create(ALICE, written)
    fetched = await store.get("acme", "nightly-report")

    assert fetched == created
    assert fetched.spec() == written
    assert fetched.tenant == "acme"
    assert fetched.timeout == timedelta(minutes=45)
    assert fetched.enabled_at is not None and fetched.enabled_at == fetched.created_at
    assert fetched.paused_note is None
    assert await store.get_by_id(created.id) == created


async def test_a_job_created_disabled_has_no_enabled_at(store: JobStore) -> None:
    job = await store.create(ALICE, spec(enabled=False))
    assert job.enabled is False and job.enabled_at is None


async def test_a_taken_slug_is_a_conflict_and_changes_nothing(store: JobStore) -> None:
    first = await store.create(ALICE, spec(prompt="first"))

    with pytest.raises(Conflict, match="already exists"):
        await store.create(ALICE, spec(prompt="second"))

    assert await store.get("acme", "nightly-report") == first


async def test_the_same_slug_in_two_tenants_is_two_jobs(store: JobStore) -> None:
    a = await store.create(ALICE, spec(prompt="for acme"))
    b = await store.create(BOB, spec(prompt="for globex"))

    assert a.id != b.id
    assert (await store.get("acme", "nightly-report")).prompt == "for acme"
    assert (await store.get("globex", "nightly-report")).prompt == "for globex"


async def test_list_is_the_tenants_jobs_by_slug(store: JobStore) -> None:
    for slug in ("zeta", "alpha", "mid"):
        await store.create(ALICE, spec(slug))
    await store.create(BOB, spec("beta"))

    assert [j.slug for j in await store.list("acme")] == ["alpha", "mid", "zeta"]
    assert [j.slug for j in await store.list("globex")] == ["beta"]
    assert await store.list("initech") == []


async def test_get_of_a_missing_job_is_not_found(store: JobStore) -> None:
    with pytest.raises(NotFound, match="no job named 'ghost'"):
        await store.get("acme", "ghost")
    assert await store.get_by_id(uuid.uuid4()) is None


async def test_update_replaces_the_spec_and_bumps_version_and_updated_at(store: JobStore, engine: AsyncEngine) -> None:
    created = await store.create(ALICE, spec())

    updated = await store.update(ALICE, "nightly-report", spec(schedule="*/5 * * * *", prompt="new prompt"))

    assert updated.id == created.id
    assert updated.schedule == "*/5 * * * *" and updated.prompt == "new prompt"
    assert updated.created_at == created.created_at
    assert updated.updated_at > created.updated_at
    assert updated.enabled_at == created.enabled_at  # still enabled: slots keep their origin
    assert await _version(engine, "nightly-report") == 2
    assert await store.get("acme", "nightly-report") == updated


async def test_update_cannot_rename_and_changes_nothing(store: JobStore) -> None:
    created = await store.create(ALICE, spec())

    with pytest.raises(InvalidInput) as err:
        await store.update(ALICE, "nightly-report", spec("other-name"))

    assert err.value.field == "slug"
    assert await store.get("acme", "nightly-report") == created
    assert await store.list("acme") == [created]


async def test_update_of_a_missing_job_is_not_found(store: JobStore) -> None:
    with pytest.raises(NotFound):
        await store.update(ALICE, "ghost", spec("ghost"))


async def test_apply_creates_then_updates_then_changes_nothing(store: JobStore, engine: AsyncEngine) -> None:
    job, result = await store.apply(ALICE, spec())
    assert result == "created"

    same, result = await store.apply(ALICE, spec())
    assert result == "unchanged"
    assert same == job
    assert await _version(engine, "nightly-report") == 1

    changed, result = await store.apply(ALICE, spec(prompt="different"))
    assert result == "updated"
    assert changed.prompt == "different" and changed.id == job.id

    assert [e.action for e in await list_audit(engine, "acme")] == ["job.update", "job.create"]


async def test_concurrent_applies_of_a_new_job_create_it_once(store: JobStore) -> None:
    results = await asyncio.gather(*(store.apply(ALICE, spec()) for _ in range(4)))

    assert sorted(r for _, r in results) == ["created", "unchanged", "unchanged", "unchanged"]
    assert len({job.id for job, _ in results}) == 1


async def test_pausing_keeps_the_note_and_resuming_restarts_from_now(store: JobStore) -> None:
    created = await store.create(ALICE, spec())

    paused = await store.set_enabled(ALICE, "nightly-report", False, note="waiting for the new API key")
    assert paused.enabled is False
    assert paused.paused_note == "waiting for the new API key"
    assert paused.spec().enabled is False
    assert (await store.list_scheduled()) == []

    resumed = await store.set_enabled(ALICE, "nightly-report", True)
    assert resumed.enabled is True
    assert resumed.paused_note is None
    # No slot from the paused time may run: enabled_at moves to the moment it was resumed.
    assert resumed.enabled_at is not None and created.enabled_at is not None
    assert resumed.enabled_at > created.enabled_at
    assert resumed.enabled_at == resumed.updated_at


async def test_enabling_an_enabled_job_changes_nothing(store: JobStore, engine: AsyncEngine) -> None:
    created = await store.create(ALICE, spec())

    again = await store.set_enabled(ALICE, "nightly-report", True)

    assert again == created
    assert [e.action for e in await list_audit(engine, "acme")] == ["job.create"]


async def test_enabling_through_update_restarts_from_now_and_clears_the_note(store: JobStore) -> None:
    await store.create(ALICE, spec())
    paused = await store.set_enabled(ALICE, "nightly-report", False, note="broken")

    resumed = await store.update(ALICE, "nightly-report", spec(enabled=True, prompt="fixed"))

    assert resumed.enabled and resumed.paused_note is None
    assert resumed.enabled_at is not None and resumed.enabled_at > paused.updated_at - timedelta(seconds=1)
    assert resumed.enabled_at == resumed.updated_at


async def test_delete_removes_the_job(store: JobStore) -> None:
    await store.create(ALICE, spec())

    await store.delete(ALICE, "nightly-report")

    with pytest.raises(NotFound):
        await store.get("acme", "nightly-report")
    with pytest.raises(NotFound):
        await store.delete(ALICE, "nightly-report")


async def test_another_tenant_can_neither_see_nor_change_a_job(store: JobStore) -> None:
    job = await store.create(ALICE, spec())

    with pytest.raises(NotFound):
        await store.get("globex", "nightly-report")
    with pytest.raises(NotFound):
        await store.update(BOB, "nightly-report", spec(prompt="hijacked"))
    with pytest.raises(NotFound):
        await store.set_enabled(BOB, "nightly-report", False, note="hijacked")
    with pytest.raises(NotFound):
        await store.delete(BOB, "nightly-report")
    assert await store.list("globex") == []

    assert await store.get("acme", "nightly-report") == job


async def test_every_write_leaves_one_audit_row_naming_who_and_what(store: JobStore, engine: AsyncEngine) -> None:
    await store.create(ALICE, spec())
    await store.update(ALICE, "nightly-report", spec(prompt="v2"))
    await store.set_enabled(ALICE, "nightly-report", False, note="holiday")
    await store.set_enabled(ALICE, "nightly-report", True)
    await store.delete(ALICE, "nightly-report")
    await store.create(BOB, spec("theirs"))

    entries = list(reversed(await list_audit(engine, "acme")))

    assert [e.action for e in entries] == ["job.create", "job.update", "job.disable", "job.enable", "job.delete"]
    who_and_what = {(e.tenant, e.actor, e.token_id, e.target) for e in entries}
    assert who_and_what == {("acme", "alice", "tok-a", "job/nightly-report")}
    create, update, disable, _, delete = entries
    assert create.change is not None and create.change["spec"]["prompt"] == "summarise the day"
    assert update.change == {"prompt": {"from": "summarise the day", "to": "v2"}}
    assert disable.change == {"enabled": {"from": True, "to": False}, "note": "holiday"}
    assert delete.change is not None and delete.change["spec"]["prompt"] == "v2"
    assert [e.target for e in await list_audit(engine, "globex")] == ["job/theirs"]


async def test_a_refused_write_leaves_no_audit_row(store: JobStore, engine: AsyncEngine) -> None:
    await store.create(ALICE, spec())
    with pytest.raises(Conflict):
        await store.create(ALICE, spec())
    with pytest.raises(NotFound):
        await store.delete(BOB, "nightly-report")

    assert [e.action for e in await list_audit(engine, "acme")] == ["job.create"]
    assert await list_audit(engine, "globex") == []


@pytest.mark.parametrize(
    ("channel", "kind"),
    [("none", "none"), ("webhook:https://hooks.example.com/x", "webhook"), ("kode-chat:user-1", "relay")],
)
async def test_the_dispatch_target_follows_the_channel(
    store: JobStore, engine: AsyncEngine, channel: str, kind: str
) -> None:
    job = await store.create(ALICE, spec(output={"channel": channel}))
    assert await _target(engine, job.id) == (channel, kind)


async def test_changing_the_channel_moves_the_dispatch_target(store: JobStore, engine: AsyncEngine) -> None:
    job = await store.create(ALICE, spec())
    await store.update(ALICE, "nightly-report", spec(output={"channel": "slack:#ops"}))
    assert await _target(engine, job.id) == ("slack:#ops", "relay")


async def test_the_ticker_lists_every_tenants_enabled_jobs(store: JobStore) -> None:
    await store.create(ALICE, spec("on-a"))
    await store.create(ALICE, spec("off-a", enabled=False))
    await store.create(BOB, spec("on-b"))
    await store.create(BOB, spec("paused-b"))
    await store.set_enabled(BOB, "paused-b", False)

    enabled = await store.list_scheduled()

    assert sorted((j.tenant, j.slug) for j in enabled) == [("acme", "on-a"), ("globex", "on-b")]
    assert all(j.enabled and j.enabled_at is not None for j in enabled)


async def test_the_tickers_view_carries_each_enabled_jobs_schedule_and_policies(store: JobStore) -> None:
    a = await store.create(ALICE, spec("on-a", schedule="*/5 * * * *", timezone="Europe/Berlin",
                                       catchup={"window": "2h", "policy": "all"}, jitter="30s"))
    await store.create(ALICE, spec("off-a", enabled=False))
    b = await store.create(BOB, spec("on-b"))

    listed = {j.slug: j for j in await store.list_scheduled()}

    assert sorted(listed) == ["on-a", "on-b"]
    on_a = listed["on-a"]
    assert (on_a.id, on_a.tenant, on_a.schedule, on_a.timezone) == (a.id, "acme", "*/5 * * * *", "Europe/Berlin")
    assert on_a.catchup == a.catchup and on_a.jitter == a.jitter and on_a.enabled_at == a.enabled_at
    assert listed["on-b"].catchup == b.catchup and listed["on-b"].jitter == b.jitter
    assert await store.get_scheduled(a.id) == on_a
    await store.delete(ALICE, "on-a")
    assert await store.get_scheduled(a.id) is None


async def test_listed_jobs_equal_the_jobs_read_one_by_one(store: JobStore) -> None:
    """list shares equal nested settings between jobs; each job must still come back exactly
    as written."""
    await store.create(ALICE, spec("plain"))
    await store.create(ALICE, spec("same-as-plain"))
    await store.create(ALICE, spec("docker", sandbox={"backend": "docker", "image": "koder-cli:latest",
                                                      "env": {"A": "1"}}, retries={"max": 3}))
    await store.create(ALICE, spec("hooked", output={"channel": "webhook:https://hooks.example.com/x"},
                                   catchup={"policy": "all", "window": "2h"}, timeout="5m"))

    listed = await store.list("acme")

    one_by_one = [await store.get("acme", j.slug) for j in listed]
    assert listed == one_by_one
    by_slug = {j.slug: j for j in listed}
    assert by_slug["docker"].sandbox.env == {"A": "1"} and by_slug["docker"].retries.max == 3
    assert by_slug["plain"].sandbox.backend == "process" and by_slug["plain"].retries.max == 0
    assert by_slug["hooked"].catchup.policy == "all" and by_slug["hooked"].timeout == timedelta(minutes=5)


async def test_apply_many_creates_updates_and_leaves_alone_in_one_go(store: JobStore, engine: AsyncEngine) -> None:
    kept = await store.create(ALICE, spec("kept"))
    moved = await store.create(ALICE, spec("moved", output={"channel": "none"}))
    files = [spec("moved", output={"channel": "slack:#ops"}, schedule="0 10 * * *"), spec("fresh"), spec("kept")]

    applied = await store.apply_many(ALICE, files)

    assert [(a.slug, a.action) for a in applied] == [("moved", "updated"), ("fresh", "created"), ("kept", "unchanged")]
    by_slug = {a.slug: a.job() for a in applied}
    assert by_slug["kept"] == kept == await store.get("acme", "kept")
    assert by_slug["moved"] == await store.get("acme", "moved")
    assert by_slug["moved"].id == moved.id and by_slug["moved"].schedule == "0 10 * * *"
    assert by_slug["moved"].updated_at > moved.updated_at and by_slug["moved"].created_at == moved.created_at
    assert by_slug["fresh"] == await store.get("acme", "fresh")
    assert by_slug["fresh"].spec() == spec("fresh") and by_slug["fresh"].enabled_at == by_slug["fresh"].created_at
    assert (await _version(engine, "moved"), await _version(engine, "kept"), await _version(engine, "fresh")) == (2, 1, 1)
    assert await _target(engine, moved.id) == ("slack:#ops", "relay")
    assert await _target(engine, by_slug["fresh"].id) == ("none", "none")
    # one audit row per change, in the file's order, saying what changed (newest first)
    create, update = (await list_audit(engine, "acme"))[:2]
    assert (update.action, update.target, create.action, create.target) == (
        "job.update", "job/moved", "job.create", "job/fresh")
    assert update.id < create.id and update.actor == "alice" and update.token_id == "tok-a"
    assert update.change == {"output": {"from": {"channel": "none", "notify": "always", "quiet": "NO_REPLY"},
                                        "to": {"channel": "slack:#ops", "notify": "always", "quiet": "NO_REPLY"}},
                             "schedule": {"from": "0 9 * * *", "to": "0 10 * * *"}}
    assert create.change == {"spec": by_slug["fresh"].spec().model_dump(mode="json")}

    again = await store.apply_many(ALICE, files)
    assert [a.action for a in again] == ["unchanged"] * 3
    assert [a.job() for a in again] == [by_slug["moved"], by_slug["fresh"], by_slug["kept"]]
    assert len(await list_audit(engine, "acme")) == 4  # nothing written for the unchanged


async def test_apply_many_pauses_and_resumes_as_apply_does(store: JobStore) -> None:
    await store.apply_many(ALICE, [spec("a"), spec("b", enabled=False)])
    [paused, resumed] = await store.apply_many(ALICE, [spec("a", enabled=False), spec("b")])
    assert (paused.action, resumed.action) == ("updated", "updated")
    a, b = await store.get("acme", "a"), await store.get("acme", "b")
    assert (a.enabled, a.paused_at is not None, b.enabled, b.paused_at) == (False, True, True, None)
    assert b.enabled_at is not None and b.enabled_at == b.updated_at  # no slot from the paused time runs
    assert (paused.job(), resumed.job()) == (a, b)


async def test_apply_many_compares_with_what_apply_compares(store: JobStore, engine: AsyncEngine) -> None:
    # A job stored before a field existed has no key for it; the spec applied now holds the
    # field's default (null): unchanged, as one `apply` says, not an update with no change.
    await store.create(ALICE, spec())
    async with engine.begin() as conn:
        await conn.execute(jobs_table.update().values(spec=jobs_table.c.spec.op("-")("workspace")))
    [result] = await store.apply_many(ALICE, [spec()])
    assert result.action == "unchanged" and (await store.apply(ALICE, spec()))[1] == "unchanged"
    # ... and another tenant's job of the same slug is neither read nor touched
    [theirs] = await store.apply_many(BOB, [spec(prompt="theirs")])
    assert theirs.action == "created" and (await store.get("acme", "nightly-report")).prompt == "summarise the day"


async def test_apply_many_drops_the_slots_queued_ahead_of_the_jobs_it_stops_or_retimes(engine: AsyncEngine) -> None:
    store = JobStore(engine, void_ahead=True)
    created = {a.slug: a.id for a in await store.apply_many(ALICE, [spec(s) for s in ("stop", "retime", "reword")])}
    ahead = utcnow() + timedelta(minutes=5)
    async with engine.begin() as conn:
        await conn.execute(job_runs.insert(), [
            {"id": f"run-{slug}", "job_id": job_id, "tenant": "acme", "slug": slug, "slot": ahead,
             "trigger": "schedule", "status": "scheduled"} for slug, job_id in created.items()])

    await store.apply_many(ALICE, [spec("stop", enabled=False), spec("retime", schedule="0 8 * * *"),
                                   spec("reword", prompt="other words")])

    async with engine.connect() as conn:
        left = (await conn.execute(select(job_runs.c.slug))).scalars().all()
    assert left == ["reword"]  # the same slots: its queued one is still its own


async def test_the_ticker_streams_every_enabled_job_once_with_its_latest_scheduled_slot(
        store: JobStore, engine: AsyncEngine) -> None:
    """Pages of 100 over 250 enabled jobs (the next page read while one is used), disabled jobs
    between them: every enabled job once, in id order, its cursor the newest slot the
    schedule or a catch-up put in the ledger (a manual run is no slot of the schedule)."""
    made = await store.apply_many(ALICE, [spec(f"job-{i:03}", enabled=i % 6 != 0) for i in range(300)])
    enabled = sorted(j.id for j in made if j.spec.enabled)
    assert len(enabled) == 250
    slot = utcnow().replace(microsecond=0) - timedelta(hours=1)
    first, second = enabled[0], enabled[137]
    async with engine.begin() as conn:
        await conn.execute(job_runs.insert(), [
            {"id": f"run-{n}", "job_id": job_id, "tenant": "acme", "slug": "x", "slot": slot + timedelta(minutes=m),
             "trigger": trigger, "status": "succeeded"}
            for n, (job_id, m, trigger) in enumerate([(first, 0, "schedule"), (first, 5, "catchup"),
                                                       (first, 9, "manual"), (second, 2, "schedule")])])

    pages = [page async for page in store.stream_scheduled(chunk=100)]

    assert [len(p) for p in pages] == [100, 100, 50]
    streamed = [(job.id, last) for page in pages for job, last in page]
    assert [job_id for job_id, _ in streamed] == enabled
    cursors = dict(streamed)
    assert cursors[first] == slot + timedelta(minutes=5) and cursors[second] == slot + timedelta(minutes=2)
    assert all(cursors[job_id] is None for job_id in enabled if job_id not in (first, second))


async def test_leaving_the_stream_early_leaves_no_read_ahead_behind(store: JobStore) -> None:
    await store.apply_many(ALICE, [spec(f"job-{i:03}") for i in range(30)])
    before = asyncio.all_tasks()
    async with contextlib.aclosing(store.stream_scheduled(chunk=10)) as pages:
        async for page in pages:
            assert len(page) == 10
            break
    assert asyncio.all_tasks() == before  # the second page's read was cancelled, not left running
