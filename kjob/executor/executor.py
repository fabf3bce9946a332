"""The executor: takes due runs off JetStream and runs them in a sandbox, once each.

For each message, top to bottom:
  1. Claim the run in the ledger. The claim, not the JetStream ack, decides who runs: a
     message delivered twice finds the run claimed or finished, and is acked unrun.
  2. While the attempt runs, renew the claim and the message's ack deadline together; if the
     claim is lost (someone else took it), stop the attempt and report nothing.
  3. Record the end of the attempt while the claim is still ours. A failure with retries left
     becomes `retrying`, and the message comes back after the backoff (`nak(delay)`).
  4. A final run is published on `kjob.run.result.<tenant>` for the dispatcher; then ack.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from datetime import datetime, timedelta, timezone
from pathlib import Path

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from kjob.bus import names
from kjob.bus.messages import DueRun, Event, RunResult
from kjob.bus.consume import consume
from kjob.bus.setup import BusSettings, ensure_consumer
from kjob.config import ExecutorSettings
from kjob.executor.agents import AgentRegistry
from kjob.executor.agent_run import AgentRun
from kjob.model.agent_report import AgentReport, verdict_status
from kjob.executor.sandbox.base import Launch, Outcome, Sandbox
from kjob.model.run import DeliveryStatus, Run, RunStatus, attempt_status, should_retry
from kjob.executor.secrets import LiveMask, SecretResolver, SecretsUnavailable
from kjob.store.quotas import Quotas, TenantBusy, busy_retry_delay
from kjob.executor.policies import RunPolicies
from kjob.model.policies import defer_delay
from kjob.store.runs import Claimed, Deferred, RunLedger, Skipped
from kjob.store.secrets import SecretStore
from kjob.store.usage import UsageStore
from kjob.telemetry import metrics, tracing
from kjob.telemetry.logging import agent_output

log = logging.getLogger(__name__)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Executor:
    def __init__(
        self,
        *,
        nc: NATS,
        js: JetStreamContext,
        ledger: RunLedger,
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
        self.in_flight = 0

    async def run(self, stop: asyncio.Event) -> None:
        # Stopping cancels the attempts in flight, which kills their sandboxes. Their claims
        # lapse and another executor (or this one, restarted) runs them again.
        self.work_root.mkdir(parents=True, exist_ok=True)
        sub = await ensure_consumer(self.js, names.RUNS_STREAM, names.EXECUTOR_CONSUMER, names.RUN_DUE_ALL, self.bus)
        await consume(sub, self._handle, concurrency=self.settings.concurrency, stop=stop, name="executor")

    @tracing.handles_run("kjob claim", names.EXECUTOR_CONSUMER)
    async def _handle(self, msg) -> None:
        try:
            due = DueRun.decode(msg.data)
        except ValueError:
            log.error("executor: dropping a malformed due message on %s", msg.subject)
            await msg.term()
            return
        tracing.annotate(tenant=due.tenant, job=due.slug, run_id=due.run_id, slot=due.slot, trigger=due.trigger)
        try:
            claimed = await self.ledger.claim(
                due.run_id, self.node, self.lease, max_running=self.quotas.limits(due.tenant).max_concurrent_runs
            )
        except TenantBusy:
            # The tenant is at its concurrency quota: the run stays scheduled; ask again later.
            await msg.nak(delay=busy_retry_delay(msg.metadata.num_delivered))
            return
        if claimed is None:
            await self._not_ours(due, msg)
            return
        if isinstance(claimed, Skipped):  # overlap `skip`: final now, with its reason
            metrics.slots_missed("overlap")
            await self._event(claimed.run, "run_finished", claimed.run.status.value)
            await msg.ack()
            return
        if isinstance(claimed, Deferred):  # overlap `queue`/`replace`: not yet; nothing changed
            await msg.nak(delay=defer_delay(msg.metadata.num_delivered))
            return
        tracing.annotate(attempt=claimed.run.attempt)
        metrics.run_claimed(claimed.run, claimed.previous_lost)
        self.in_flight += 1
        try:
            await self._attempt(claimed, msg)
        finally:
            self.in_flight -= 1

    async def _not_ours(self, due: DueRun, msg) -> None:
        """The run is finished, owned by another executor, or not due yet."""
        delivery = await self.ledger.delivery(due.run_id)
        if delivery is None:  # the job was deleted, and its runs with it
            await msg.ack()
            return
        run = delivery.run
        if run.status is RunStatus.retrying and run.next_attempt_at and run.next_attempt_at > utcnow():
            await msg.nak(delay=(run.next_attempt_at - utcnow()).total_seconds())
            return
        if run.status is RunStatus.running:
            # Someone else holds it: leave this delivery alone. An ack here would ack the
            # message the owner is working on (a late ack still acks, DESIGN.md).
            return
        if run.status.final and run.delivery_status.value == "pending":
            # We may have died between recording the end and publishing the result.
            await self._publish_result(run)
        await msg.ack()

    @tracing.span("kjob sandbox")
    async def _attempt(self, claimed: Claimed, msg) -> None:
        run, job = claimed.run, claimed.job
        tracing.annotate(attempt=run.attempt, backend=job.sandbox.backend)
        await self._event(run, "run_started", f"attempt {run.attempt}")
        over_cap = await self._over_cost_cap(job)
        if over_cap is not None:  # the tenant's agents spent their day's budget: record, alert once
            with contextlib.suppress(Exception):
                await self.usage.record(run_id=run.id, attempt=run.attempt, tenant=job.tenant, job_id=job.id,
                                        agent=job.agent, report=AgentReport(answer=over_cap))
            finished = await self.ledger.finish(
                run.id, self.node, run.attempt, status=RunStatus.skipped, exit_code=None, reason=over_cap,
                output="", output_bytes=0, dropped_bytes=0, retry_at=None)
            if finished is not None:
                metrics.slots_missed("cost_cap")
                if finished.delivery_status is DeliveryStatus.pending:
                    await self._publish_result(finished)
                await self._event(finished, "run_finished", finished.status.value)
            await msg.ack()
            return
        stop_attempt = asyncio.Event()
        keeper = asyncio.create_task(self._keep_claim(run, msg, stop_attempt))
        agent_run = self._agent_run(job)
        try:
            outcome = await self._run_sandbox(claimed, stop_attempt, agent_run)
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
        if agent_run is not None:  # what the agent said: its answer, verdict and usage
            report = agent_run.report()
            with contextlib.suppress(Exception):  # usage is bookkeeping; the run's end matters more
                await self.usage.record(run_id=run.id, attempt=run.attempt, tenant=job.tenant, job_id=job.id,
                                        agent=job.agent, report=report)
                metrics.agent_usage(job.tenant, job.slug, job.agent, report.usage)
        if outcome is None:
            await self._claim_lost(run, job, msg)
            return
        status = attempt_status(outcome.exit_code, outcome.timed_out, outcome.start_error)
        reason = outcome.start_error or outcome.reason
        if agent_run is not None and outcome.start_error is None:
            status, reason = verdict_status(status, reason, report, agent_run.budget_reason, agent_run.result_error)
        if status is RunStatus.timed_out and not reason:
            reason = f"timed out after {job.timeout}"
        if status is RunStatus.failed and not reason:
            reason = f"exit code {outcome.exit_code}"
        retry = should_retry(status, run.attempt, run.lost_attempts, job.retries)
        retry_at = utcnow() + job.retries.delay(run.attempt) if retry else None
        finished = await self.ledger.finish(
            run.id, self.node, run.attempt,
            status=status, exit_code=outcome.exit_code, reason=reason, output=outcome.output,
            output_bytes=outcome.output_bytes, dropped_bytes=outcome.dropped_bytes, retry_at=retry_at,
        )
        await self._log_end(run)
        if finished is None:
            await self._claim_lost(run, job, msg)
            return
        tracing.annotate(status=finished.status.value, exit_code=finished.exit_code)
        metrics.attempt_finished(finished)
        if retry_at is not None:
            await msg.nak(delay=(retry_at - utcnow()).total_seconds())
            return
        if finished.delivery_status is DeliveryStatus.pending:  # channel `none`: nothing to deliver
            await self._publish_result(finished)
        await self._event(finished, "run_finished", finished.status.value)
        await msg.ack()
        await self.policies.after_end(finished, job)

    async def _claim_lost(self, run: Run, job, msg) -> None:
        """The attempt's claim is gone: the overlap policy `replace` cancelled the run (confirm
        the stop, so the run replacing it starts), or another executor took it over (stay
        silent: this attempt's result is void)."""
        if await self.ledger.stopped(run.id, self.node, run.attempt):
            log.info("executor: run %s stopped: replaced by a newer run of %s", run.id, job.slug)
            await msg.ack()
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

    def _agent_run(self, job) -> AgentRun | None:
        if job.agent not in self.agents:
            return None
        s = self.settings
        return AgentRun(self.agents.get(job.agent), job, stdout_cap=s.output_cap_bytes,
                        clone_timeout_s=s.workspace_timeout_s, clone_max_bytes=s.workspace_max_bytes,
                        local_roots=s.workspace_roots)

    async def _run_sandbox(self, claimed: Claimed, stop_attempt: asyncio.Event,
                           agent_run: AgentRun | None = None) -> Outcome | None:
        """The attempt's Outcome, or None if the claim was lost while it ran."""
        run, job = claimed.run, claimed.job
        try:
            agent = self.agents.get(job.agent)
            argv, stdin, env = self.agents.render(
                agent, prompt=job.prompt, run_id=run.id, slug=job.slug, tenant=job.tenant, attempt=run.attempt,
                limits=job.limits.model_dump(exclude_none=True),
            )
        except Exception as err:
            return Outcome(start_error=f"agent {job.agent!r} cannot start: {err}")
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
        launch = Launch(
            run_id=run.id, tenant=job.tenant, job_slug=job.slug, attempt=run.attempt,
            argv=argv, stdin=stdin, env={**job_env, **env}, spec=job.sandbox,
            timeout=job.timeout, output_cap_bytes=self.settings.output_cap_bytes, work_root=self.work_root, **hooks,
        )
        log_subject = names.run_log(job.tenant, run.id)

        async def on_output(stream: str, text: str) -> None:
            agent_output(stream, text)  # the file sink, when one is configured
            if agent_run is not None:
                agent_run.feed(stream, text)
            with contextlib.suppress(Exception):  # live logs are best effort; the ledger keeps the output
                await self.nc.publish(log_subject, text.encode(), headers={
                    "Kjob-Stream": stream, names.HDR_RUN_ID: run.id, names.HDR_TENANT: job.tenant})

        live = LiveMask(masker, on_output)  # every captured byte passes the mask of the secret values
        runner = asyncio.create_task(sandbox.run(launch, live.write))
        lost = asyncio.create_task(stop_attempt.wait())
        over = asyncio.create_task(agent_run.exceeded.wait() if agent_run else asyncio.Event().wait())
        done, _ = await asyncio.wait({runner, lost, over}, return_when=asyncio.FIRST_COMPLETED)
        if over in done and runner not in done:  # over its budget: stop the agent, keep the run
            lost.cancel()
            runner.cancel()
            with contextlib.suppress(BaseException):
                await runner
            await live.flush()
            assert agent_run is not None
            output = agent_run.output()
            return Outcome(exit_code=None, reason=agent_run.budget_reason, output=output,
                           output_bytes=len(output.encode()))
        over.cancel()
        if runner in done:
            lost.cancel()
            await live.flush()
            try:
                return masker.outcome(runner.result())
            except Exception as err:  # a sandbox bug must still end the run, not hang it
                log.exception("executor: sandbox %s failed on run %s", sandbox.name, run.id)
                return masker.outcome(Outcome(start_error=f"sandbox {sandbox.name} failed: {err}"))
        runner.cancel()  # cancelling kills what the attempt started
        with contextlib.suppress(BaseException):
            await runner
        return None

    async def _keep_claim(self, run: Run, msg, stop_attempt: asyncio.Event) -> None:
        """Renew the claim and the ack deadline well inside both; flag a lost claim."""
        failures = 0
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            with contextlib.suppress(Exception):
                await msg.in_progress()
            try:
                if not await self.ledger.heartbeat(run.id, self.node, run.attempt, self.lease):
                    stop_attempt.set()
                    return
                failures = 0
            except Exception as err:
                # The database is away. Keep running while the lease may still hold; past it,
                # another executor may have taken over, so stop.
                failures += 1
                log.warning("executor: heartbeat for run %s failed (%s)", run.id, err)
                if failures * self.settings.heartbeat_s >= self.settings.claim_lease_s:
                    stop_attempt.set()
                    return

    async def _publish_result(self, run: Run) -> None:
        result = RunResult(run_id=run.id, job_id=run.job_id, tenant=run.tenant, slug=run.slug,
                           status=run.status.value, attempt=run.attempt, exit_code=run.exit_code,
                           finished_at=run.finished_at or utcnow())
        await self.js.publish(
            names.run_result(run.tenant), result.encode(),
            headers={"Nats-Msg-Id": f"{run.id}.result", names.HDR_RUN_ID: run.id, names.HDR_TENANT: run.tenant,
                     **tracing.headers()},
        )

    async def _log_end(self, run: Run) -> None:
        with contextlib.suppress(Exception):
            await self.nc.publish(names.run_log(run.tenant, run.id), b"",
                                  headers={"Kjob-Stream": "end", "Kjob-Attempt": str(run.attempt)})

    async def _event(self, run: Run, kind: str, detail: str) -> None:
        event = Event(kind=kind, tenant=run.tenant, job_id=run.job_id, slug=run.slug, run_id=run.id,
                      detail=detail, at=utcnow())
        with contextlib.suppress(Exception):  # events are for observers; never block a run on them
            await self.nc.publish(names.event(run.tenant, kind), event.encode(),
                                  headers={names.HDR_RUN_ID: run.id, names.HDR_TENANT: run.tenant})
