"""The executor: takes due runs off JetStream and runs them in a sandbox, once each.

For each message, top to bottom:
  1. Claim the run in the ledger. The claim, not the JetStream ack, decides who runs: a
     message delivered twice finds the run claimed or finished, and is acked unrun.
  2. While the attempt runs, renew the claim in the ledger and the message's ack deadline in
     JetStream, each on its own: the ack deadline never waits on the database. If the claim is
     lost (someone else took it), stop the attempt and report nothing. If it cannot be renewed
     (the database is stalled or unreachable), stop the agent before the claim can expire, by a
     local monotonic deadline: lease after the last renewal sent, less a margin.
  3. Record the end of the attempt while the claim is still ours. An attempt that ran to its end
     is never run again because its result could not be written: the outcome is kept and
     written when the database is back (transient errors are retried for
     `executor.outcome_keep_s`; the claim check in `finish` decides whether it still counts).
     A failure with retries left becomes `retrying`, and the message comes back after the
     backoff (`nak(delay)`).
  4. A final run is published on `kjob.run.result.<tenant>` for the dispatcher; then ack.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import socket
import time
from datetime import timedelta
from pathlib import Path
from typing import Callable

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from kjob._time import utcnow
from kjob._tasks import cancel_and_wait, stopped_within
from kjob.bus import ack, hold, names
from kjob.bus.errors import BUS_ERRORS
from kjob.bus.messages import DueRun, Event, EventKind
from kjob.bus.publish import publish_event, publish_result
from kjob.bus.consume import consume
from kjob.bus.setup import BusSettings, ensure_consumer
from kjob.config import ExecutorSettings
from kjob.executor.watchdog import Watchdog
from kjob.executor.agents import AgentRegistry
from kjob.executor.agent_run import AgentRun
from kjob.model.agent_report import AgentReport, verdict_status
from kjob.model.job import Job
from kjob.executor.sandbox.base import Launch, Outcome, Sandbox
from kjob.model.run import DeliveryStatus, MissReason, Run, RunStatus, attempt_status, should_retry
from kjob.executor.secrets import LiveMask, SecretResolver, SecretsUnavailable
from kjob.store.quotas import Quotas, TenantBusy, busy_retry_delay
from kjob.executor.policies import RunPolicies
from kjob.model.policies import defer_delay
from kjob.store.database import DATABASE_ERRORS, DatabaseClock, is_transient
from kjob.store.claims import TAKEOVER_GRACE, ClaimLedger, Claimed, Deferred, GaveUp, Skipped, TakeoverHeld
from kjob.store.secrets import SecretStore
from kjob.store.usage import UsageStore, usage_row
from kjob.telemetry import metrics, runcontext, tracing
from kjob.telemetry.logging import agent_output

log = logging.getLogger(__name__)

#: How often the executor reads the database's clock (for the look-ahead's holds).
CLOCK_EVERY_S = 60.0
#: A warm start whose run was not claimed this long after its instant is ended unstarted.
WARM_TTL_S = 30.0


@dataclasses.dataclass(eq=False)
class WarmStart:
    """A sandbox built ahead for a run the look-ahead brought early, its agent held at the
    sandbox's gate (Launch.gate). The claim at the instant opens the gate only if it found the
    same job and the same attempt; anything else (the job changed, disabled or deleted, the run
    taken by another executor, a stop) closes it, and the agent never starts."""

    run_id: str
    task: asyncio.Task | None = None  #: the build, then its time to live
    job: Job | None = None
    attempt: int = 0
    agent_run: AgentRun | None = None
    sandbox: Sandbox | None = None
    live: LiveMask | None = None
    masker: object = None
    gate: asyncio.Future | None = None
    runner: asyncio.Task | None = None  #: sandbox.run, waiting at the gate
    #: The attempt's claim, bound when it is taken: the watchdog is armed with its deadline.
    claim: ClaimKeeper | None = None

    def ready_for(self, claimed: Claimed) -> bool:
        return (self.runner is not None and not self.runner.done() and claimed.ended is None
                and self.attempt == claimed.run.attempt and self.job == claimed.job)

    def close(self) -> None:
        """The agent is not to start: its sandbox ends (in the background), and the build stops."""
        if self.gate is not None and not self.gate.done():
            self.gate.set_result(False)
            metrics.warm_start("closed")
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()


def _retrieved(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("executor: a warm start's sandbox failed", exc_info=task.exception())


class Executor:
    def __init__(
        self,
        *,
        nc: NATS,
        js: JetStreamContext,
        ledger: ClaimLedger,
        agents: AgentRegistry,
        sandboxes: dict[str, Sandbox],
        settings: ExecutorSettings,
        bus: BusSettings,
        work_root: Path,
        node: str | None = None,
        unavailable: dict[str, str] | None = None,
        secrets: SecretResolver | None = None,
        quotas: Quotas | None = None,
    ) -> None:
        self.nc, self.js, self.ledger, self.agents = nc, js, ledger, agents
        self.sandboxes, self.settings, self.bus = sandboxes, settings, bus
        self.work_root = work_root
        self.node = node or socket.gethostname()
        #: Backends that failed to start on this node, and why.
        self.unavailable = unavailable or {}
        #: Without a resolver given, a job that references a secret ends `error` ("no secret key").
        self.secrets = secrets or SecretResolver(SecretStore(ledger.engine, None))
        self.quotas = quotas or Quotas()
        self.policies = RunPolicies(js=js, ledger=ledger)
        self.usage = UsageStore(ledger.engine)
        self.lease = timedelta(seconds=settings.claim_lease_s)
        # Never more than a third of the lease: a short lease (tests) still renews in time.
        self.margin_s = min(settings.claim_margin_s, settings.claim_lease_s / 3)
        #: Kills an agent whose claim this executor, paused, no longer renews (watchdog.py).
        docker = sandboxes.get("docker")
        self.watchdog = Watchdog(dsn=ledger.engine.url.set(drivername="postgresql").render_as_string(hide_password=False),
                                 docker_url=getattr(docker, "url", None))
        self.in_flight = 0
        #: When this executor last found the database away (a failed or stuck statement); its
        #: start counts as one. For `TAKEOVER_GRACE` of the lease after it, lapsed claims are
        #: left to their owners' watchdogs, which may have ends to write from the outage.
        self.db_away_at = time.monotonic()
        #: Look-ahead runs are held until their instant by the database's clock (measured at
        #: start, then every minute).
        self.clock = DatabaseClock(ledger.engine, "executor")
        #: run id -> its sandbox built ahead (or being built); the tasks planning them.
        self._warm: dict[str, WarmStart] = {}
        self._warming: set[asyncio.Task] = set()

    def database_away(self) -> None:
        self.db_away_at = time.monotonic()

    def _may_take_over(self) -> bool:
        return time.monotonic() - self.db_away_at >= self.settings.claim_lease_s * TAKEOVER_GRACE

    async def run(self, stop: asyncio.Event) -> None:
        # Stopping cancels the attempts in flight, which kills their sandboxes. Their claims
        # lapse and another executor (or this one, restarted) runs them again.
        self.work_root.mkdir(parents=True, exist_ok=True)
        sub = await ensure_consumer(self.js, names.RUNS_STREAM, names.EXECUTOR_CONSUMER, names.RUN_DUE_ALL, self.bus)
        await self.watchdog.start()
        try:
            await self.ledger.warm_up()
        except Exception as err:  # only the first runs' speed is at stake
            log.warning("executor: could not warm up the ledger's connections (%s)", err)
        # Early messages wait for their instant by the database's clock: read it before the
        # first can arrive. On a host whose clock runs ahead, the waiting messages of the first
        # fetch were otherwise started by the host's clock, up to the look-ahead early (seen).
        while not self.clock.measured and not stop.is_set():
            await self.clock.measure()
            if not self.clock.measured:  # the database away: no run could be claimed anyway
                await stopped_within(stop, 0.5)
        clock = asyncio.create_task(self._keep_clock(stop))
        try:
            # A run published ahead (the ticker's look-ahead) starts at its instant, by the
            # database's clock; it waits for it outside the run slots.
            await consume(sub, self._handle, concurrency=self.settings.concurrency, stop=stop, name="executor",
                          hold=self._hold, keepalive_s=self.bus.ack_wait_s / 3)
        finally:
            await cancel_and_wait(*self._warming)
            for warm in list(self._warm.values()):
                warm.close()
            self._warm.clear()
            await cancel_and_wait(clock)
            await self.watchdog.close()

    def _hold(self, msg) -> float:
        """How long an early message waits for its instant; a sandbox is built for it ahead."""
        wait = hold.wait_s(msg, self.clock.not_before_offset())
        # No more plans than room: a herd of 10,000 early messages must not cost 10,000 tasks.
        if wait > 0 and len(self._warming) < self.settings.warm_starts:
            try:
                due = DueRun.decode(msg.data)
            except ValueError:
                return wait  # the handler drops it
            task = asyncio.create_task(self._warm_up(due, asyncio.get_running_loop().time() + wait))
            self._warming.add(task)
            task.add_done_callback(self._warming.discard)
        return wait

    async def _warm_up(self, due: DueRun, at: float) -> None:
        """Build the run's sandbox `warm_ahead_s` before its instant `at` (loop time), if there
        is room, and keep it until the claim takes it or `WARM_TTL_S` after the instant."""
        loop = asyncio.get_running_loop()
        # The sandbox's task copies this context: its output lines carry the run's ids.
        runcontext.bind(tenant=due.tenant, job=due.slug, run_id=due.run_id)
        await asyncio.sleep(at - self.settings.warm_ahead_s - loop.time())
        # Room is bounded in _hold: every warm start here has its planning task in _warming.
        if due.run_id in self._warm or loop.time() >= at:
            return
        warm = self._warm[due.run_id] = WarmStart(due.run_id, task=asyncio.current_task())
        try:
            built = await self._build_warm(warm)
        except Exception as err:  # the database away, say: the run starts cold at its instant
            log.debug("executor: no warm start for run %s (%r)", due.run_id, err)
            built = False
        if built:
            await asyncio.sleep(max(at - loop.time(), 0.0) + WARM_TTL_S)
        if self._warm.get(due.run_id) is warm:
            del self._warm[due.run_id]
            warm.close()

    async def _build_warm(self, warm: WarmStart) -> bool:
        peeked = await self.ledger.peek(warm.run_id)
        if peeked is None:
            return False
        run, job = peeked
        if job.workspace is not None:  # no clone for a run that may not be ours
            return False
        attempt = run.attempt + 1  # what the claim will make it
        agent_run = self._agent_run(job)
        gate = asyncio.get_running_loop().create_future()
        built = await self._build_launch(run.id, attempt, job, agent_run, lambda: warm.claim, gate=gate)
        if isinstance(built, Outcome) or not built[0].gates(built[1]):
            return False
        sandbox, launch, live, masker = built
        warm.job, warm.attempt, warm.agent_run, warm.sandbox = job, attempt, agent_run, sandbox
        warm.live, warm.masker, warm.gate = live, masker, gate
        warm.runner = asyncio.create_task(sandbox.run(launch, live.write))
        warm.runner.add_done_callback(_retrieved)
        return True

    def _take_warm(self, claimed: Claimed) -> WarmStart | None:
        """The claimed run's sandbox built ahead, if it was built for just this; else it ends."""
        warm = self._warm.pop(claimed.run.id, None)
        if warm is None:
            return None
        if warm.ready_for(claimed):
            if warm.task is not None:
                warm.task.cancel()  # its time to live
            metrics.warm_start("used")
            return warm
        warm.close()
        return None

    def _drop_warm(self, run_id: str) -> None:
        if (warm := self._warm.pop(run_id, None)) is not None:
            warm.close()

    async def _keep_clock(self, stop: asyncio.Event) -> None:
        """The database's clock offset, every minute; the last one stands while it is away."""
        while not await stopped_within(stop, CLOCK_EVERY_S):
            await self.clock.measure()

    @tracing.handles_run("kjob claim", names.EXECUTOR_CONSUMER)
    async def _handle(self, msg) -> None:
        try:
            due = DueRun.decode(msg.data)
        except ValueError:
            log.error("executor: dropping a malformed due message on %s", msg.subject)
            await ack.drop(msg)
            return
        try:
            await self._handle_due(due, msg)
        finally:
            self._drop_warm(due.run_id)  # built ahead and not taken: not ours to start

    async def _handle_due(self, due: DueRun, msg) -> None:
        tracing.annotate(tenant=due.tenant, job=due.slug, run_id=due.run_id, slot=due.slot, trigger=due.trigger.value)
        claim_sent = time.monotonic()  # the claim's lease runs from no earlier than this
        try:
            claimed = await self.ledger.claim(
                due.run_id, self.node, self.lease, max_running=self.quotas.limits(due.tenant).max_concurrent_runs,
                takeover=self._may_take_over(),
            )
        except TenantBusy:
            # The tenant is at its concurrency quota: the run stays scheduled; ask again later.
            await ack.later(msg, busy_retry_delay(msg.metadata.num_delivered))
            return
        except Exception as err:
            await self._claim_failed(due, msg, err)
            return
        if claimed is None:
            await self._not_ours(due, msg)
            return
        if isinstance(claimed, Skipped):  # overlap `skip` or a disabled job: final now, with its reason
            metrics.slots_missed(claimed.run.reason_code or MissReason.overlap)
            await self._event(claimed.run, EventKind.run_finished, claimed.run.status.value)
            await ack.done(msg)
            return
        if isinstance(claimed, GaveUp):  # lost once too often: final now, with its reason
            log.error("executor: run %s: %s", claimed.run.id, claimed.run.reason)
            metrics.attempt_finished(claimed.run)
            if claimed.run.delivery_status is DeliveryStatus.pending:
                await self._publish_result(claimed.run)
            await self._event(claimed.run, EventKind.run_finished, claimed.run.status.value)
            await ack.done(msg)
            return
        if isinstance(claimed, TakeoverHeld):  # a lapsed claim, just after an outage: its watchdog first
            await ack.later(msg, self.settings.claim_lease_s * TAKEOVER_GRACE)
            return
        if isinstance(claimed, Deferred):  # overlap `queue`/`replace`: not yet; nothing changed
            await ack.later(msg, defer_delay(msg.metadata.num_delivered))
            return
        tracing.annotate(attempt=claimed.run.attempt)
        metrics.run_claimed(claimed.run, claimed.previous_lost)
        self.in_flight += 1
        try:
            await self._attempt(claimed, msg, claim_sent)
        finally:
            self.in_flight -= 1

    async def _claim_failed(self, due: DueRun, msg, err: Exception) -> None:
        """The claim raised. The database away: the message comes back soon (the claim decides
        then). A statement it refuses fails the same way every time: back off for long, and say
        so loudly, rather than hold the message or retry it in a hot loop."""
        transient = is_transient(err)
        delay = min(2.0 * msg.metadata.num_delivered, 30.0) if transient else 300.0
        if transient:
            self.database_away()
            log.warning("executor: cannot claim run %s (%r); again in %.0fs", due.run_id, err, delay)
        else:
            log.error("executor: claiming run %s failed permanently; again in %.0fs", due.run_id, delay, exc_info=err)
        await ack.later(msg, delay)

    async def _not_ours(self, due: DueRun, msg) -> None:
        """The run is finished, owned by another executor, or not due yet. Answer the message
        now: one held un-acked would come back at every ack deadline for the whole run."""
        run = await self.ledger.run(due.run_id)
        if run is None:  # the job was deleted, and its runs with it
            await ack.done(msg)
            return
        if run.status is RunStatus.retrying:
            # Not due yet by the database's clock (the claim said so): come back about then.
            wait = (run.next_attempt_at - utcnow()).total_seconds() if run.next_attempt_at else 0.0
            await ack.later(msg, max(wait, 1.0))
            return
        if run.status is RunStatus.running:
            if msg.metadata.num_delivered > 1:
                # Maybe the owner's own message, redelivered (its in_progress did not arrive): an
                # ack would ack the owner's. Come back when its claim could have lapsed.
                await ack.later(msg, self.settings.claim_lease_s + self.settings.heartbeat_s)
            else:
                # A second message for a run someone holds (a re-publish): the owner has its own.
                # Should the owner die, the ticker re-publishes the run once its claim lapsed.
                await ack.done(msg)
            return
        if run.status.final and run.delivery_status.value == "pending":
            # We may have died between recording the end and publishing the result.
            await self._publish_result(run)
        await ack.done(msg)

    @tracing.span("kjob sandbox")
    async def _attempt(self, claimed: Claimed, msg, claim_sent: float) -> None:
        run, job = claimed.run, claimed.job
        tracing.annotate(attempt=run.attempt, backend=job.sandbox.backend)
        claim = ClaimKeeper(self, run, claim_sent)
        if time.monotonic() >= claim.deadline:  # the claim took so long that it may lapse before the agent starts
            claim.expired = True
            await self._claim_lost(run, job, msg, claim)
            return
        if claimed.ended is None:
            await self._event(run, EventKind.run_started, f"attempt {run.attempt}")
            over_cap = await self._over_cost_cap(job)
            if over_cap is not None:  # the tenant's agents spent their day's budget: record, alert once
                await self._skip_over_cost_cap(run, job, msg, over_cap)
                return
        warm = self._take_warm(claimed)
        acker = asyncio.create_task(self._keep_acking(msg))
        keeper = asyncio.create_task(claim.keep())
        agent_run = None if claimed.ended is not None else warm.agent_run if warm else self._agent_run(job)
        try:
            usage = None
            if claimed.ended is not None:
                # Its agent ran to its end under an executor that could not record it: conclude
                # the attempt from the end its watchdog wrote; never run the agent again.
                log.warning("executor: run %s attempt %d: %s", run.id, run.attempt, claimed.ended.reason)
                outcome = Outcome(exit_code=claimed.ended.exit_code, reason=claimed.ended.reason)
            else:
                outcome = await self._run_sandbox(claimed, claim, agent_run, warm)
            if agent_run is not None:  # what the agent said: its answer, verdict and usage
                report = agent_run.report()
                metrics.agent_usage(job.tenant, job.slug, job.agent, report.usage)
                usage = usage_row(tenant=job.tenant, job_id=job.id, agent=job.agent, report=report)
            if outcome is None:
                if agent_run is not None:  # no end to write it with: the tokens were spent all the same
                    await self._record_usage(run, job, report)
                await self._claim_lost(run, job, msg, claim)
                return
            status = attempt_status(outcome.exit_code, outcome.timed_out, outcome.start_error)
            reason = outcome.start_error or outcome.reason
            if agent_run is not None and outcome.start_error is None:
                status, reason = verdict_status(status, reason, report, agent_run.budget_reason, agent_run.result_error)
            if status is RunStatus.timed_out and not reason:
                reason = f"timed out after {job.timeout}"
            if status is RunStatus.failed and not reason:
                reason = f"exit code {outcome.exit_code}"
            # From now on the keeper only renews: no agent left to stop. The watchdog stays armed
            # until the end is written: should we be paused meanwhile, it writes the agent's end.
            claim.agent_done = True
            retry = should_retry(status, run.attempt, run.lost_attempts, job.retries, permanent=outcome.permanent)
            retry_in = job.retries.delay(run.attempt).total_seconds() if retry else None
            # The claim keeper and the acker go on while the end is recorded: the claim stays
            # ours (and the message with us) however long the database takes to come back.
            finished = await self._record_end(run, dict(
                status=status, exit_code=outcome.exit_code, reason=reason, output=outcome.output,
                output_bytes=outcome.output_bytes, dropped_bytes=outcome.dropped_bytes, retry_in_s=retry_in,
                usage=usage,  # in the same statement as the end: one round trip
            ))
        finally:
            if warm is not None:
                warm.close()  # opened by now, unless the attempt ended before its sandbox ran
            self.watchdog.disarm(claim.key)
            await cancel_and_wait(keeper, acker)
        await self._log_end(run)
        if finished is None:
            await self._claim_lost(run, job, msg, claim)
            return
        tracing.annotate(status=finished.status.value, exit_code=finished.exit_code)
        metrics.attempt_finished(finished)
        if retry_in is not None:
            await ack.later(msg, retry_in)
            return
        if finished.delivery_status is DeliveryStatus.pending:  # channel `none`: nothing to deliver
            await self._publish_result(finished)
        await self._event(finished, EventKind.run_finished, finished.status.value)
        await ack.done(msg)
        await self.policies.after_end(finished, job)

    async def _record_end(self, run: Run, fields: dict) -> Run | None:
        """`finish`, tried again while the database is away (transient errors) for up to
        `outcome_keep_s`: an attempt that ran must not run again because its end went unwritten.
        None: the claim is no longer ours (or the outcome could not be written in time)."""
        give_up = time.monotonic() + self.settings.outcome_keep_s
        delay = 0.1
        while True:
            try:
                return await self.ledger.finish(run.id, self.node, run.attempt, **fields)
            except Exception as err:
                if not is_transient(err):
                    if not (fields["output"] or fields.get("usage") is not None):
                        log.error("executor: cannot record the end of run %s", run.id, exc_info=err)
                        return None
                    # Refused for what the agent said (the texts are made storable, but a
                    # refusal here would run the agent again): its end without its words.
                    log.error("executor: the end of run %s was refused; recording it without its output", run.id,
                              exc_info=err)
                    dropped = f"its output and report were refused by the ledger ({type(err).__name__}) and dropped"
                    fields = dict(fields, output="", usage=None, dropped_bytes=fields["output_bytes"],
                                  reason=f"{fields['reason']}; {dropped}" if fields["reason"] else dropped)
                    continue
                self.database_away()
                if time.monotonic() + delay > give_up:
                    log.error("executor: gave up recording the end of run %s after %.0fs (%r)",
                              run.id, self.settings.outcome_keep_s, err)
                    return None
                log.warning("executor: recording the end of run %s failed (%r); keeping it, again in %.1fs",
                            run.id, err, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.heartbeat_s)

    async def _keep_acking(self, msg) -> None:
        """Push the message's ack deadline out every heartbeat, never waiting on the database."""
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            with contextlib.suppress(*BUS_ERRORS):  # NATS away: the next beat tries again
                async with asyncio.timeout(self.settings.heartbeat_s):
                    await msg.in_progress()

    async def _claim_lost(self, run: Run, job, msg, claim: "ClaimKeeper") -> None:
        """The attempt's claim is gone: the overlap policy `replace` cancelled the run (confirm
        the stop, so the run replacing it starts), or another executor took it over (stay
        silent: this attempt's result is void), or it could not be renewed in time and the
        agent was stopped (the claim lapses; the message comes back when it has)."""
        if claim.expired:
            log.warning("executor: run %s: stopped the agent; its claim could not be renewed for %.1fs",
                        run.id, self.settings.claim_lease_s - self.margin_s)
            await ack.later(msg, self.margin_s + self.settings.heartbeat_s)
            return
        stopped = False
        with contextlib.suppress(*DATABASE_ERRORS):  # the database may still be away; the claim lapses then
            stopped = await self.ledger.stopped(run.id, self.node, run.attempt)
        if stopped:
            log.info("executor: run %s stopped: replaced by a newer run of %s", run.id, job.slug)
            await ack.done(msg)
            return
        log.warning("executor: lost the claim on run %s; its result is void", run.id)

    async def _over_cost_cap(self, job) -> str | None:
        """Why the run must not start: its tenant's agents spent its daily cost cap (UTC day)."""
        cap = self.quotas.limits(job.tenant).max_cost_usd_per_day
        if cap is None:
            return None
        day = utcnow().replace(hour=0, minute=0, second=0, microsecond=0)
        spent = await self.usage.tenant_cost_since(job.tenant, day)
        if spent < cap:
            return None
        return (f"not run: tenant {job.tenant}'s daily cost cap of ${cap:g} is reached "
                f"(${spent:.2f} spent on {day:%Y-%m-%d} UTC); runs resume tomorrow")

    async def _skip_over_cost_cap(self, run: Run, job, msg, why: str) -> None:
        """Record the run `skipped` for the cost cap (the alert rides on its delivery), then ack."""
        await self._record_usage(run, job, AgentReport(answer=why))
        finished = await self._record_end(run, dict(
            status=RunStatus.skipped, exit_code=None, reason=why, reason_code=MissReason.cost_cap, output="",
            output_bytes=0, dropped_bytes=0, retry_in_s=None))
        if finished is not None:
            metrics.slots_missed(MissReason.cost_cap)
            if finished.delivery_status is DeliveryStatus.pending:
                await self._publish_result(finished)
            await self._event(finished, EventKind.run_finished, finished.status.value)
        await ack.done(msg)

    async def _record_usage(self, run: Run, job, report: AgentReport) -> None:
        """The agent's usage row, apart from the attempt's end (that one has it in its statement).
        Bookkeeping: the database away loses it, with a warning, and never the run."""
        try:
            await self.usage.record(run_id=run.id, attempt=run.attempt, tenant=job.tenant, job_id=job.id,
                                    agent=job.agent, report=report)
        except DATABASE_ERRORS as err:
            log.warning("executor: run %s: its agent's usage was not recorded (%r)", run.id, err)

    def _agent_run(self, job) -> AgentRun | None:
        if job.agent not in self.agents:
            return None
        s = self.settings
        return AgentRun(self.agents.get(job.agent), job, stdout_cap=s.output_cap_bytes,
                        clone_timeout_s=s.workspace_timeout_s, clone_max_bytes=s.workspace_max_bytes,
                        local_roots=s.workspace_roots)

    async def _run_sandbox(self, claimed: Claimed, claim: "ClaimKeeper", agent_run: AgentRun | None = None,
                           warm: WarmStart | None = None) -> Outcome | None:
        """The attempt's Outcome, or None if the claim was lost while it ran."""
        run = claimed.run
        if warm is not None:  # built ahead: open its gate
            assert warm.sandbox is not None and warm.live is not None and warm.runner and warm.gate
            sandbox, live, masker, runner = warm.sandbox, warm.live, warm.masker, warm.runner
            warm.claim = claim
            warm.gate.set_result(True)
        else:
            built = await self._build_launch(run.id, run.attempt, claimed.job, agent_run, lambda: claim)
            if isinstance(built, Outcome):
                return built
            sandbox, launch, live, masker = built
            runner = asyncio.create_task(sandbox.run(launch, live.write))
        lost = asyncio.create_task(claim.stop.wait())
        over = asyncio.create_task(agent_run.exceeded.wait() if agent_run else asyncio.Event().wait())
        done, _ = await asyncio.wait({runner, lost, over}, return_when=asyncio.FIRST_COMPLETED)
        if over in done and runner not in done:  # over its budget: stop the agent, keep the run
            lost.cancel()
            await cancel_and_wait(runner)
            await live.flush()
            assert agent_run is not None
            output = agent_run.output()
            return Outcome(exit_code=None, reason=agent_run.budget_reason, output=output,
                           output_bytes=len(output.encode()))
        over.cancel()
        if runner not in done and claim.expired:
            # Our own deadline, and the claim holds `margin` longer: an agent that is already
            # ending (it ran to its end, and is exiting) gets half of that to finish by itself,
            # rather than be killed and run again. The other half is for killing it.
            done, _ = await asyncio.wait({runner}, timeout=self.margin_s / 2)
        if runner in done:
            lost.cancel()
            await live.flush()
            try:
                outcome = runner.result()
            except Exception as err:  # a sandbox bug must still end the run, not hang it
                log.exception("executor: sandbox %s failed on run %s", sandbox.name, run.id)
                return masker.outcome(Outcome(start_error=f"sandbox {sandbox.name} failed: {err}"))
            if outcome.exit_code in (-signal.SIGKILL, 128 + signal.SIGKILL) and \
                    (claim.expired or time.monotonic() >= claim.kill_by):
                # Killed by the watchdog while this executor was paused: not the agent's own
                # end. The claim is as good as lost; the attempt counts as lost, not failed.
                claim.expired = True
                return None
            return masker.outcome(outcome)
        await cancel_and_wait(runner)  # cancelling kills what the attempt started
        return None

    async def _build_launch(self, run_id: str, attempt: int, job: Job, agent_run: AgentRun | None,
                            claim_of: Callable[[], ClaimKeeper], gate: asyncio.Future | None = None):
        """(sandbox, launch, its masked output sink, the masker) for an attempt, or the Outcome
        that it cannot start. The watchdog's hooks ask `claim_of()` for the claim when they
        fire: a warm start is built before its claim exists."""
        try:
            agent = self.agents.get(job.agent)
            argv, stdin, env = self.agents.render(
                agent, prompt=job.prompt, run_id=run_id, slug=job.slug, tenant=job.tenant, attempt=attempt,
                limits=job.limits.model_dump(exclude_none=True),
            )
        except Exception as err:
            return Outcome(start_error=f"agent {job.agent!r} cannot start: {err}", permanent=True)
        sandbox = self.sandboxes.get(job.sandbox.backend)
        if sandbox is None:
            why = self.unavailable.get(job.sandbox.backend, "it is not in executor.sandboxes")
            return Outcome(start_error=f"sandbox backend {job.sandbox.backend!r} is unavailable on node {self.node}: {why}")
        try:  # `secret:<name>` values become the secrets here, and only here (docs/security.md)
            job_env, masker = await self.secrets.environment(job.tenant, job.sandbox.env)
        except SecretsUnavailable as err:
            return Outcome(start_error=str(err))
        hooks = {}
        if agent_run is not None and sandbox.name == "process":  # the work dir is the host's
            hooks = {"prepare": agent_run.prepare, "collect": agent_run.collect}
        elif job.workspace is not None:
            return Outcome(start_error=f"workspace needs the process backend; the {sandbox.name} backend has none yet")
        who = dict(run_id=run_id, attempt=attempt, node=self.node)  # whose end the watchdog may write
        launch = Launch(
            run_id=run_id, tenant=job.tenant, job_slug=job.slug, attempt=attempt, gate=gate,
            argv=argv, stdin=stdin, env={**job_env, **env}, spec=job.sandbox,
            timeout=job.timeout, output_cap_bytes=self.settings.output_cap_bytes, work_root=self.work_root, **hooks,
            on_spawn=lambda pgid, status_fd: self.watchdog.arm(claim_of().key, pgid, claim_of().kill_by,
                                                                  status_fd=status_fd, **who),
            on_container=lambda container: self.watchdog.arm(claim_of().key, None, claim_of().kill_by,
                                                                  container=container, **who),
        )
        log_subject = names.run_log(job.tenant, run_id)

        async def on_output(stream: str, text: str) -> None:
            agent_output(stream, text)  # the file sink, when one is configured
            if agent_run is not None:
                agent_run.feed(stream, text)
            with contextlib.suppress(*BUS_ERRORS):  # live logs are best effort; the ledger keeps the output
                await self.nc.publish(log_subject, text.encode(), headers={
                    names.HDR_STREAM: stream, **names.run_headers(run_id, job.tenant)})

        live = LiveMask(masker, on_output)  # every captured byte passes the mask of the secret values
        return sandbox, launch, live, masker

    async def _publish_result(self, run: Run) -> None:
        # A stream that is electing a leader (a NATS node lost) answers nothing for a few
        # seconds: try again within the ack deadline rather than leave the result to a
        # redelivery of the due message (the Msg-Id makes a repeat harmless).
        give_up = time.monotonic() + self.bus.ack_wait_s / 2
        delay = 0.2
        while True:
            try:
                await publish_result(self.js, run)
                return
            except Exception as err:
                if time.monotonic() + delay > give_up:
                    raise
                log.warning("executor: publishing the result of run %s failed (%r); again in %.1fs", run.id, err, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _log_end(self, run: Run) -> None:
        with contextlib.suppress(*BUS_ERRORS):  # `kjob logs -f` then ends at its own timeout
            await self.nc.publish(names.run_log(run.tenant, run.id), b"",
                                  headers={names.HDR_STREAM: "end", names.HDR_ATTEMPT: str(run.attempt)})

    async def _event(self, run: Run, kind: EventKind, detail: str) -> None:
        await publish_event(self.nc, Event.about_run(kind, run, detail, utcnow()))


class ClaimKeeper:
    """Renews one attempt's claim and holds its local deadline.

    The ledger stamps `claim_until` with the database's clock when a renewal arrives, which is
    after we sent it: so our claim holds at least `lease` past the monotonic instant we sent the
    last renewal that succeeded. The agent is stopped (`stop`, with `expired`) `margin` before
    that, whatever the database does; a renewal stuck on a stalled server is never awaited past
    it. A renewal the ledger refuses (someone else owns the run) sets `stop` at once.
    """

    def __init__(self, executor: Executor, run: Run, sent: float) -> None:
        self.executor, self.run = executor, run
        self.lease_s = executor.settings.claim_lease_s
        self.stop = asyncio.Event()
        self.expired = False
        #: The agent ended: keep renewing (its end is still to be written), stop nothing.
        self.agent_done = False
        # The claim was written at or after this instant, with the full lease.
        self.deadline = sent + self.lease_s - executor.margin_s
        #: The attempt's name for the watchdog.
        self.key = f"{run.id}.{run.attempt}"

    @property
    def kill_by(self) -> float:
        """When the watchdog kills the agent should this executor not stop it itself (paused):
        after the executor's own deadline and the agent's chance to end by itself (half the
        margin), before the claim can lapse (the full margin)."""
        return self.deadline + 0.75 * self.executor.margin_s

    async def keep(self) -> None:
        ex = self.executor
        beat_s = ex.settings.heartbeat_s
        next_beat = time.monotonic() + beat_s
        pending: asyncio.Task | None = None
        sent = 0.0
        try:
            while True:
                now = time.monotonic()
                if now >= self.deadline and not (self.expired or self.agent_done):
                    # Stop the agent; go on renewing: an agent that ends during its kill grace
                    # has its end written while the claim is still ours.
                    self.expired = True
                    self.stop.set()
                if pending is None and now >= next_beat:
                    sent = now
                    pending = asyncio.create_task(
                        ex.ledger.heartbeat(self.run.id, ex.node, self.run.attempt, ex.lease))
                deadline = now + beat_s if self.expired or self.agent_done else self.deadline
                wake = min(deadline, next_beat if pending is None else deadline) - now
                if pending is not None:
                    await asyncio.wait({pending}, timeout=max(wake, 0.01))
                    if not pending.done():
                        if time.monotonic() - sent > beat_s:
                            ex.database_away()  # stuck: the server is stalled, or the network
                        continue
                    try:
                        if not pending.result():
                            self.stop.set()  # the ledger says the claim is no longer ours
                            return
                        self.deadline = max(self.deadline, sent + self.lease_s - ex.margin_s)
                        ex.watchdog.extend(self.key, self.kill_by)
                    except Exception as err:
                        ex.database_away()
                        log.warning("executor: renewing the claim on run %s failed (%r); stopping its agent in %.1fs "
                                    "unless a renewal succeeds", self.run.id, err, self.deadline - time.monotonic())
                    pending = None
                    next_beat = sent + beat_s
                else:
                    await asyncio.sleep(max(wake, 0.01))
        finally:
            if pending is not None:
                # Let it finish on its own (its statement has a deadline): cancelling a
                # statement mid-flight would only leave its connection in doubt.
                pending.add_done_callback(lambda t: t.cancelled() or t.exception())
