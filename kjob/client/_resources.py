"""The API, resource by resource, written once for `Client` and `AsyncClient`.

Each method builds its requests (kjob.client._wire) and reads the answers into the models the
gateway answers with (kjob.model.views). Input is validated here first, with the models the
server validates with, so a bad job is refused in the caller's process with the API's words.
"""

from __future__ import annotations

import builtins
import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import replace
from datetime import datetime
from typing import Any

import httpx

from kjob import errors
from kjob.client._errors import InvalidInput, WaitTimedOut
from kjob.client._ops import D, Resource, listing, operation, text_lines
from kjob.client._wire import Flow, Lines, Paged, Request, name_segment, parse, segment
from kjob.model.job import JobSpec, in_job, merge_job, parse_job
from kjob.model.policies import OverlapPolicy
from kjob.model.views import (AppliedAction, ApplyResult, AuditView, BackfillResult, JobView, MissedRangeView,
                              NewToken, QuotaView, Role, RunDetail, RunView, SecretView, StatusView, TokenView)
from kjob.model.secrets import check_name

#: A job as the client takes it: a JobSpec, or the fields of one (as in a job file or the API).
SpecLike = JobSpec | Mapping[str, Any]

#: Jobs per page of `jobs.list`, runs per page of `runs.list`.
JOBS_PAGE = 500
RUNS_PAGE = 200


def _checked(call: Any, field: str | None = None) -> Any:
    """`call()`, with a local InvalidInput re-raised as the client's (optionally under `field`)."""
    try:
        return call()
    except errors.InvalidInput as e:
        if isinstance(e, InvalidInput):
            raise
        raise InvalidInput(e.message, f"{field}.{e.field}" if field and e.field else field or e.field) from None


def job_spec(spec: SpecLike, field: str | None = None) -> JobSpec:
    """`spec` validated as a JobSpec. :raises InvalidInput: naming the field, as the API would."""
    if isinstance(spec, JobSpec):
        return spec
    return _checked(lambda: parse_job(dict(spec)), field)  # type: ignore[no-any-return]


def _batch_spec(spec: SpecLike, i: int) -> JobSpec:
    """The `i`-th job of a batch, validated here and refused in the server's words: the field
    is `jobs.<i>.<field>`, and the message names the job by its slug."""
    if isinstance(spec, JobSpec):
        return spec
    try:
        return parse_job(dict(spec))
    except errors.InvalidInput as e:
        where = f"jobs.{i}"
        raise InvalidInput(in_job(e, spec.get("slug"), where), f"{where}.{e.field}" if e.field else where) from None


def _instant(moment: datetime | str) -> str:
    return moment.isoformat() if isinstance(moment, datetime) else moment


def _pages(first: Request, model: Any, size: int, cursor: str, key: Any) -> Paged[Any]:
    """Pages of `size` items, the next page's request naming the last item's `key` as `cursor`."""

    def read(response: httpx.Response, request: Request) -> tuple[list[Any], Request | None]:
        items = parse(builtins.list[model], response)
        if len(items) < size:
            return items, None
        return items, replace(request, params={**(request.params or {}), cursor: key(items[-1])})

    return Paged(replace(first, params={**(first.params or {}), "limit": size}), read)


class Jobs(Resource[D]):
    """`client.jobs`: the jobs of the token's tenant."""

    @operation
    def create(self, spec: SpecLike) -> Flow[JobView]:
        """Create a job. :raises Conflict: the slug is taken; QuotaExceeded: the tenant's job quota."""
        body = job_spec(spec).model_dump(mode="json")
        return parse(JobView, (yield Request("POST", "/v1/jobs", json=body)))

    @operation
    def apply(self, specs: Iterable[SpecLike]) -> Flow[builtins.list[ApplyResult]]:
        """Create or update jobs, idempotently, all or none: one bad job refuses the whole batch,
        naming it `jobs.<i>.<field>` (from 0). Results are in the order given."""
        body = [_batch_spec(s, i).model_dump(mode="json") for i, s in enumerate(specs)]
        response = yield Request("POST", "/v1/jobs:apply", json={"jobs": body}, idempotent=True)
        return [ApplyResult.model_validate(r) for r in response.json()["results"]]

    @operation
    def apply_actions(self, specs: Iterable[SpecLike]) -> Flow[builtins.list[AppliedAction]]:
        """`apply` answered with each job's slug and action alone, its jobs validated by the
        server only (a JobSpec is sent as its JSON, a mapping as given): for a job file of
        thousands (`kjob apply`), a fraction of `apply`'s time at both ends. A bad job raises
        InvalidInput naming `jobs.<i>.<field>`, and the job in the message; one holding a value
        JSON cannot carry (a date, an infinite number) is refused here, in the same words."""
        body = [s.model_dump(mode="json") if isinstance(s, JobSpec) else s for s in specs]
        try:  # serialized once, and sent as it is
            content = json.dumps({"jobs": body}, allow_nan=False).encode()
        except (TypeError, ValueError):  # the model says which job and field, as the server would
            body = [_batch_spec(s, i).model_dump(mode="json") for i, s in enumerate(body)]
            content = json.dumps({"jobs": body}).encode()
        response = yield Request("POST", "/v1/jobs:apply", params={"results": "actions"}, content=content,
                                 idempotent=True)
        return [AppliedAction.model_validate(r) for r in response.json()["results"]]

    @operation
    def get(self, slug: str) -> Flow[JobView]:
        return parse(JobView, (yield Request("GET", f"/v1/jobs/{segment(slug)}", idempotent=True)))

    @listing
    def list(self, *, page_size: int = JOBS_PAGE) -> Paged[JobView]:
        """Every job of the tenant, by slug, fetched `page_size` at a time as you iterate."""
        return _pages(Request("GET", "/v1/jobs", idempotent=True), JobView, page_size, "after", lambda j: j.slug)

    @operation
    def update(self, slug: str, changes: Mapping[str, Any] | None = None, /, **fields: Any) -> Flow[JobView]:
        """Change some fields of a job (`changes` and `fields` together, JSON values as in a job
        file: `timeout="1h"`); nested tables merge key by key. The changed job is validated here
        before it is written. :raises InvalidInput: naming the field."""
        patch = {**(changes or {}), **fields}
        current = parse(JobView, (yield Request("GET", f"/v1/jobs/{segment(slug)}", idempotent=True)))
        _checked(lambda: merge_job(current.spec(), patch))
        return parse(JobView, (yield Request("PATCH", f"/v1/jobs/{segment(slug)}", json=patch, idempotent=True)))

    @operation
    def enable(self, slug: str) -> Flow[JobView]:
        """Enable a job: only slots after now run, no burst of missed ones."""
        return parse(JobView, (yield Request("POST", f"/v1/jobs/{segment(slug)}/enable", idempotent=True)))

    @operation
    def disable(self, slug: str, *, note: str | None = None) -> Flow[JobView]:
        """Pause a job, with a note saying why (inspect shows it)."""
        request = Request("POST", f"/v1/jobs/{segment(slug)}/disable", json={"note": note}, idempotent=True)
        return parse(JobView, (yield request))

    @operation
    def delete(self, slug: str) -> Flow[None]:
        """Delete a job and its run history."""
        yield Request("DELETE", f"/v1/jobs/{segment(slug)}", idempotent=True)

    @operation
    def preview(self, schedule: str, *, tz: str = "UTC", n: int = 5,
                after: datetime | str | None = None) -> Flow[builtins.list[datetime]]:
        """The next `n` slots of `schedule` read in `tz`, after `after` (default now), in UTC."""
        params: dict[str, Any] = {"schedule": schedule, "tz": tz, "n": n}
        if after is not None:
            params["after"] = _instant(after)
        return parse(builtins.list[datetime], (yield Request("GET", "/v1/schedules/preview", params=params, idempotent=True)))


def _wait(run_id: str, timeout_s: float, poll_s: float) -> Flow[RunDetail]:
    deadline = time.monotonic() + timeout_s
    request = Request("GET", f"/v1/runs/{name_segment(run_id)}", idempotent=True)
    run: RunDetail = parse(RunDetail, (yield request))
    while not run.status.final:
        if time.monotonic() > deadline:
            raise WaitTimedOut(f"run {run.id} still {run.status.value} after {timeout_s:g}s", run)
        run = parse(RunDetail, (yield replace(request, delay_s=poll_s)))
    return run


class Runs(Resource[D]):
    """`client.runs`: runs of the tenant's jobs. A run id may be given short (its first 4 or
    more characters) wherever one is taken, as long as it starts only one run."""

    @operation
    def run_now(self, slug: str, *, wait: bool = False, timeout_s: float = 3600.0,
                poll_s: float = 0.25) -> Flow[RunView]:
        """Start a run of the job now; with `wait`, return it once it has ended (a RunDetail).

        :raises RateLimited: beyond the tenant's run-now rate. WaitTimedOut: still going after
            `timeout_s` (the run goes on).
        """
        run: RunView = parse(RunView, (yield Request("POST", f"/v1/jobs/{segment(slug)}/run")))
        if not wait:
            return run
        return (yield from _wait(run.id, timeout_s, poll_s))

    @operation
    def wait(self, run_id: str, *, timeout_s: float = 3600.0, poll_s: float = 0.25) -> Flow[RunDetail]:
        """The run once it has ended. :raises WaitTimedOut: still going after `timeout_s`."""
        return (yield from _wait(run_id, timeout_s, poll_s))

    @listing
    def list(self, slug: str, *, page_size: int = RUNS_PAGE) -> Paged[RunView]:
        """The job's runs, newest slot first, fetched `page_size` at a time as you iterate
        (stop iterating when you have enough: `itertools.islice(client.runs.list(slug), 20)`)."""
        return _pages(Request("GET", f"/v1/jobs/{segment(slug)}/runs", idempotent=True), RunView, page_size,
                      "before", lambda r: r.slot.isoformat())

    @operation
    def missed(self, slug: str, *, limit: int = 50) -> Flow[builtins.list[MissedRangeView]]:
        """The job's compact records of slots a long downtime left unrun, newest first (the
        newest slots of a downtime are runs of their own, in `list`)."""
        request = Request("GET", f"/v1/jobs/{segment(slug)}/missed", params={"limit": limit}, idempotent=True)
        return parse(builtins.list[MissedRangeView], (yield request))

    @operation
    def get(self, run_id: str) -> Flow[RunDetail]:
        """A run and its attempts."""
        return parse(RunDetail, (yield Request("GET", f"/v1/runs/{name_segment(run_id)}", idempotent=True)))

    @text_lines
    def logs(self, run_id: str, *, follow: bool = False) -> Lines:
        """The run's output, line by line (without line breaks). With `follow`, a running run's
        output so far and then live, until the run ends."""
        params = {"follow": "true"} if follow else None
        return Lines(Request("GET", f"/v1/runs/{name_segment(run_id)}/logs", params=params, idempotent=True),
                     endless=follow)

    @operation
    def backfill(self, slug: str, start: datetime | str, end: datetime | str, *,
                 overlap: OverlapPolicy | None = None) -> Flow[BackfillResult]:
        """Run the job's slots from `start` to `end` (both included, in the past, at most 1000);
        slots already in the ledger are not run again, so it is safe to repeat."""
        body: dict[str, Any] = {"from": _instant(start), "to": _instant(end)}
        if overlap is not None:
            body["overlap"] = overlap
        request = Request("POST", f"/v1/jobs/{segment(slug)}/backfill", json=body, idempotent=True)
        return parse(BackfillResult, (yield request))


def _tenant(tenant: str | None) -> dict[str, str] | None:
    return {"tenant": tenant} if tenant else None


class Tokens(Resource[D]):
    """`client.tokens` (admin): API tokens of your tenant, or of another for admins of the
    admin tenant."""

    @operation
    def create(self, role: Role, *, name: str = "", tenant: str | None = None) -> Flow[NewToken]:
        """A new token; its `secret` is in this answer only."""
        body = {"role": role, "name": name, **(_tenant(tenant) or {})}
        return parse(NewToken, (yield Request("POST", "/v1/tokens", json=body)))

    @operation
    def list(self, *, tenant: str | None = None) -> Flow[builtins.list[TokenView]]:
        request = Request("GET", "/v1/tokens", params=_tenant(tenant), idempotent=True)
        return parse(builtins.list[TokenView], (yield request))

    @operation
    def revoke(self, token_id: str, *, tenant: str | None = None) -> Flow[None]:
        yield Request("DELETE", f"/v1/tokens/{name_segment(token_id)}", params=_tenant(tenant), idempotent=True)


class Secrets(Resource[D]):
    """`client.secrets`: values jobs reference from `sandbox.env` as `"secret:NAME"`."""

    @operation
    def set(self, name: str, value: str) -> Flow[SecretView]:
        """Create or replace a secret (the value never comes back)."""
        request = Request("PUT", f"/v1/secrets/{name_segment(_checked(lambda: check_name(name)))}",
                          json={"value": value}, idempotent=True)
        return parse(SecretView, (yield request))

    @operation
    def list(self) -> Flow[builtins.list[SecretView]]:
        return parse(builtins.list[SecretView], (yield Request("GET", "/v1/secrets", idempotent=True)))

    @operation
    def delete(self, name: str) -> Flow[None]:
        """:raises Conflict: jobs still reference it (the message names them)."""
        yield Request("DELETE", f"/v1/secrets/{name_segment(_checked(lambda: check_name(name)))}", idempotent=True)


class Audit(Resource[D]):
    @operation
    def list(self, *, slug: str | None = None, limit: int = 100) -> Flow[builtins.list[AuditView]]:
        """Who changed what in the tenant, newest first; with `slug`, only about that job."""
        params: dict[str, Any] = {"limit": limit}
        if slug is not None:
            segment(slug)
            params["slug"] = slug
        return parse(builtins.list[AuditView], (yield Request("GET", "/v1/audit", params=params, idempotent=True)))


class Quotas(Resource[D]):
    @operation
    def get(self) -> Flow[QuotaView]:
        """The tenant's limits and what it uses of them now."""
        return parse(QuotaView, (yield Request("GET", "/v1/quotas", idempotent=True)))


class Api(Resource[D]):
    """Everything the API offers, over one driver: the base of Client and AsyncClient."""

    def __init__(self, driver: D) -> None:
        super().__init__(driver)
        self.jobs = Jobs(driver)
        self.runs = Runs(driver)
        self.tokens = Tokens(driver)
        self.secrets = Secrets(driver)
        self.audit = Audit(driver)
        self.quotas = Quotas(driver)

    @operation
    def status(self) -> Flow[StatusView]:
        """Nodes and their roles, the ticker leader, stream backlog."""
        return parse(StatusView, (yield Request("GET", "/v1/status", idempotent=True)))
