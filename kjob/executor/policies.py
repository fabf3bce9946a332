"""The executor's side of `pause_after_failures = N`, once a run has ended: after N failed
runs in a row the job is paused with a note, the ticker is told (a `job_changed` event), and the
job's channel gets one alert through the dispatcher: a `notice = "paused"` message on the
results stream, delivered to Relay with `Idempotency-Key: <run id>.paused`. The pause is a
conditional write, so of two executors ending two failures at once only one pauses the job and
sends the alert.

It runs after the run's end is recorded; a failure here is logged and leaves the run as it is.
Known limit: a node that dies between pausing the job and publishing the alert sends none (the
pause, its note and its audit row are in the store).
"""

from __future__ import annotations

import logging

from nats.js import JetStreamContext

from kjob.bus import names
from kjob.bus.messages import RunResult
from kjob.bus.publish import announce_job_changed
from kjob.model.job import Job
from kjob.model.policies import PAUSED_NOTICE, pause_note
from kjob.model.run import Run, RunStatus
from kjob.store.audit import Actor
from kjob.store.jobs import JobStore
from kjob.store.claims import ClaimLedger

log = logging.getLogger(__name__)

#: Who the audit log names for a pause made by `pause_after_failures`.
PAUSE_ACTOR = "kjob:pause_after_failures"
FAILURES = frozenset({RunStatus.failed, RunStatus.timed_out, RunStatus.error})


class RunPolicies:
    def __init__(self, *, js: JetStreamContext, ledger: ClaimLedger) -> None:
        self.js, self.ledger = js, ledger
        self.jobs = JobStore(ledger.engine)

    async def after_end(self, run: Run, job: Job) -> None:
        """`run` of `job` reached a final status."""
        if not job.pause_after_failures or run.status not in FAILURES:
            return
        try:
            await self._pause_if_failing(run, job, job.pause_after_failures)
        except Exception:
            log.exception("executor: pause_after_failures of job %s/%s after run %s failed", job.tenant, job.slug, run.id)

    async def _pause_if_failing(self, run: Run, job: Job, failures: int) -> None:
        if not await self.ledger.failure_streak(job.id, failures):
            return
        actor = Actor(subject=PAUSE_ACTOR, token_id=None, tenant=job.tenant)
        paused = await self.jobs.pause_unless_paused(actor, job.id, pause_note(failures, run.id))
        if paused is None:
            return  # paused already, by a person or by another executor
        log.warning("executor: job %s/%s paused after %d failed runs in a row (last: %s)",
                    job.tenant, job.slug, failures, run.id)
        await announce_job_changed(self.js, job.tenant, job.id, job.slug, "disabled")
        if job.output.channel == "none":
            return
        notice = RunResult.of(run, finished_at=paused.updated_at, notice=PAUSED_NOTICE, failures=failures)
        await self.js.publish(names.run_result(run.tenant), notice.encode(), headers={
            names.HDR_MSG_ID: names.result_msg_id(run.id, PAUSED_NOTICE), **names.run_headers(run.id, run.tenant)})
