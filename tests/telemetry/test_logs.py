"""Logs: JSON lines that say which run they are about, and agent output in a file sink."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import pytest
from pydantic import ValidationError

from kjob.config import Settings
from kjob.errors import InvalidInput
from kjob.model.run import DeliveryStatus, RunStatus
from kjob.telemetry import logging as run_logging
from kjob.telemetry import tracing
from tests.support.pipeline import (
    create_job,
    fast_settings,
    running_node,
    runs_of,
    until,
)
from tests.support.relay import RecordingRelay


def capture(fmt: str) -> tuple[logging.Handler, io.StringIO]:
    """The handler `setup` would install, writing to a buffer instead of stderr."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(run_logging.formatter(fmt, "node-a"))
    handler.addFilter(run_logging.RunContextFilter())
    return handler, out


async def test_lines_carry_the_run_of_the_task_that_logs_them_and_no_other():
    handler, out = capture("json")
    log = logging.getLogger("kjob.test.logs")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        async def handle(run_id: str) -> None:
            run_logging.bind(tenant="acme", run_id=run_id)
            run_logging.bind(job="nightly")
            await asyncio.sleep(0)  # interleave the two tasks
            log.warning("working on it")

        await asyncio.gather(handle("run-1"), handle("run-2"))
        log.info("between runs")
    finally:
        log.removeHandler(handler)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(l.get("run_id"), l.get("trace_id")) for l in lines] == [
        ("run-1", tracing.trace_id_hex("run-1")), ("run-2", tracing.trace_id_hex("run-2")), (None, None)]
    assert lines[0]["tenant"] == "acme" and lines[0]["job"] == "nightly"
    assert (lines[0]["level"], lines[0]["logger"], lines[0]["msg"], lines[0]["node"]) == (
        "warning", "kjob.test.logs", "working on it", "node-a")


def test_console_lines_name_the_run_at_the_end():
    handler, out = capture("console")
    record = logging.LogRecord("kjob.x", logging.INFO, __file__, 1, "claimed", None, None)
    token = run_logging.bind(tenant="acme", job="nightly", run_id="run-1")
    try:
        handler.handle(record)
    finally:
        run_logging.reset(token)
    assert out.getvalue().rstrip().endswith(f"claimed [acme/nightly run=run-1 trace={tracing.trace_id_hex('run-1')}]")


def test_an_unknown_log_format_is_refused_naming_the_setting():
    with pytest.raises(InvalidInput) as err:
        run_logging.formatter("xml")
    assert err.value.field == "log_format"
    with pytest.raises(ValidationError, match="log_format"):
        Settings(log_format="xml")


async def test_agent_output_and_node_lines_about_a_run_carry_its_ids(tmp_path, fresh_nats, database_url, engine):
    output_log = tmp_path / "agent-output.jsonl"
    handler, out = capture("json")
    kjob_logger = logging.getLogger("kjob")
    old_level = kjob_logger.level
    kjob_logger.addHandler(handler)
    kjob_logger.setLevel(logging.INFO)
    try:
        with RecordingRelay() as relay:
            relay.fail(status=503, count=1)  # the dispatcher logs the retry, inside the run's task
            settings = fast_settings(tmp_path, relay_url=relay.url)
            settings.executor.output_log = output_log
            job = await create_job(engine, slug="chatty", prompt="echo to-stdout; echo to-stderr >&2",
                                   output={"channel": "kode-chat:ops"})
            async with running_node(settings, fresh_nats.url, database_url):
                async def delivered_after_a_retry():
                    # The job fires every second: the run Relay refused is not always the first
                    # one delivered, so follow the run the dispatcher's retry line names.
                    retried = {l.get("run_id") for l in _json_lines(out) if _is_retry_line(l)}
                    return next((r for r in await runs_of(engine, job)
                                 if r.delivery_status is DeliveryStatus.delivered and r.id in retried), None)
                run = await until(delivered_after_a_retry, 20, "a run delivered after one Relay failure")
    finally:
        kjob_logger.removeHandler(handler)
        kjob_logger.setLevel(old_level)
    assert run.status is RunStatus.succeeded

    # the file sink: one JSON line per output line, with the run's ids
    records = [json.loads(line) for line in output_log.read_text().splitlines()]
    mine = [r for r in records if r.get("run_id") == run.id]
    assert {(r["stream"], r["msg"]) for r in mine} == {("stdout", "to-stdout"), ("stderr", "to-stderr")}
    for record in mine:
        assert (record["tenant"], record["job"], record["trace_id"]) == ("default", "chatty", tracing.trace_id_hex(run.id))

    # the dispatcher's line about the retry names the run without being told in the message
    [retry] = [l for l in _json_lines(out) if _is_retry_line(l)]
    assert (retry["run_id"], retry["tenant"], retry["job"], retry["trace_id"]) == (
        run.id, "default", "chatty", tracing.trace_id_hex(run.id))


def _json_lines(out) -> list[dict]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def _is_retry_line(line: dict) -> bool:
    return line["logger"] == "kjob.dispatcher.dispatcher" and "not delivered" in line["msg"]


def test_a_node_at_info_does_not_log_each_http_request(capsys):
    """`kjob up` at INFO printed one httpx line per Relay delivery; kjob's own lines remain."""
    import httpx

    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        run_logging.setup("INFO", "console", node="quiet-node")
        with RecordingRelay() as relay:
            httpx.post(f"{relay.url}/v1/dispatch", json={"channel": "kode-chat:ops", "message": {}})
        logging.getLogger("kjob.dispatcher").info("delivered run-1")
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    err = capsys.readouterr().err
    assert "delivered run-1" in err
    assert "HTTP Request" not in err and "/v1/dispatch" not in err


def test_tracing_does_not_need_the_logging_module():
    """The run context lives apart from both, so tracing loads without logging (no cycle, and
    no import inside the filter that stamps every record)."""
    import subprocess
    import sys

    probe = "import sys, kjob.telemetry.tracing; print('kjob.telemetry.logging' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
