"""Attacks 5, 6 and 7 of issue 10: input accepted at create that crashed a role or failed
every run, and input that answered 500. Every bound is checked when the job is saved (422
naming the field, nothing stored), and no path, query or body answers a 5xx."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.security.conftest import job_body

#: (what, change to a valid job, the field the 422 must name)
UNBOUNDED: list[tuple[str, dict[str, Any], str]] = [
    ("catch-up window of 270,000 years", {"catchup": {"window": "99999999d"}}, "catchup.window"),
    ("catch-up window past timedelta", {"catchup": {"window": "9999999999999d"}}, "catchup.window"),
    ("memory in yottabytes", {"sandbox": {"memory": "99999999999999999999G"}}, "sandbox.memory"),
    ("memory of 400 digits", {"sandbox": {"memory": "9" * 400}}, "sandbox.memory"),
    ("memory below what a container can start with", {"sandbox": {"memory": "1k"}}, "sandbox.memory"),
    ("cpus: a huge number", {"sandbox": {"cpus": 1e300}}, "sandbox.cpus"),
    ("pids: a huge int", {"sandbox": {"pids": 10**30}}, "sandbox.pids"),
    ("workdir /", {"sandbox": {"backend": "docker", "image": "x", "workdir": "/"}}, "sandbox.workdir"),
    ("workdir ../etc", {"sandbox": {"backend": "docker", "image": "x", "workdir": "../etc"}}, "sandbox.workdir"),
    ("workdir /work/../etc", {"sandbox": {"backend": "docker", "image": "x", "workdir": "/work/../etc"}},
     "sandbox.workdir"),
    ("workdir over /proc", {"sandbox": {"backend": "docker", "image": "x", "workdir": "/proc/self"}}, "sandbox.workdir"),
    ("workdir over /usr", {"sandbox": {"backend": "docker", "image": "x", "workdir": "/usr"}}, "sandbox.workdir"),
    ("workdir on the process backend", {"sandbox": {"workdir": "/etc"}}, "sandbox.workdir"),
    ("jitter of years", {"jitter": "99999999d"}, "jitter"),
    ("timeout of years", {"timeout": "99999999d"}, "timeout"),
    ("retries.max huge", {"retries": {"max": 10**30}}, "retries.max"),
    ("retry delay of years", {"retries": {"max": 20, "initial_delay": "99999999d"}}, "retries.initial_delay"),
    ("retry max delay of years", {"retries": {"max_delay": "99999999d"}}, "retries.max_delay"),
    ("history keep_days huge", {"history": {"keep_days": 10**30}}, "history.keep_days"),
    ("history keep_runs huge", {"history": {"keep_runs": 10**30}}, "history.keep_runs"),
    ("pause_after_failures huge", {"pause_after_failures": 10**30}, "pause_after_failures"),
    ("@every of 270,000 years", {"schedule": "@every 99999999d"}, "schedule"),
    ("@once in year 9999", {"schedule": "@once 9999-12-31T23:59Z"}, "schedule"),
    ("a time zone too long for a file name", {"timezone": "9" * 400 + "state"}, "timezone"),
    ("a NUL in the prompt", {"prompt": "echo \x00"}, "prompt"),
    ("a NUL in a label key", {"labels": {"a\x00": "b"}}, "labels"),
    ("a lone surrogate in the description", {"description": "\ud800"}, "description"),
    ("a lone surrogate in a label", {"labels": {"team": "x\udfff"}}, "labels.team"),
]

#: JSON numbers Python's json reads but PostgreSQL's JSONB cannot hold.
NON_FINITE = ["Infinity", "-Infinity", "NaN", "1e400"]


async def _no_jobs(client) -> None:
    assert (await client.get("/v1/jobs")).json() == []


@pytest.mark.parametrize(("what", "change", "field"), UNBOUNDED, ids=[c[0] for c in UNBOUNDED])
def test_every_bound_is_checked_in_the_model(what: str, change: dict[str, Any], field: str) -> None:
    """Without a server: kjob.model refuses it, naming the field."""
    from kjob.errors import InvalidInput
    from kjob.model.job import parse_job

    with pytest.raises(InvalidInput) as err:
        parse_job(_merged(change))
    assert err.value.field == field, (what, err.value)


async def test_every_bound_is_refused_by_the_api_and_nothing_is_stored(client_for) -> None:
    editor = await client_for("beta", "editor")
    for what, change, field in UNBOUNDED:
        body = json.dumps(_merged(change), ensure_ascii=True)  # lone surrogates travel as \\udxxx escapes
        answer = await editor.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
        assert answer.status_code == 422, (what, answer.status_code, answer.text)
        assert answer.json()["error"]["field"] == field, (what, answer.json())
    for number in NON_FINITE:
        body = json.dumps(job_body("inf")).replace('"output"', f'"sandbox": {{"cpus": {number}}}, "output"')
        answer = await editor.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
        assert answer.status_code == 422, (number, answer.text)
        assert answer.json()["error"]["field"] == "sandbox.cpus", (number, answer.json())
    await _no_jobs(editor)


BAD_TEXT = ["a%00b", "%00", "a%ED%A0%80", "%FF%FE", "a\\u0000"]


async def test_bad_text_in_any_path_or_query_is_a_4xx(client_for) -> None:
    admin = await client_for("beta", "admin")
    assert (await admin.post("/v1/jobs", json=job_body("real"))).status_code == 201
    for bad in BAD_TEXT:
        for method, path, body in [
            ("GET", f"/v1/jobs/{bad}", None), ("DELETE", f"/v1/jobs/{bad}", None),
            ("PUT", f"/v1/jobs/{bad}", job_body("real")), ("PATCH", f"/v1/jobs/{bad}", {"description": "x"}),
            ("POST", f"/v1/jobs/{bad}/enable", None), ("POST", f"/v1/jobs/{bad}/disable", None),
            ("POST", f"/v1/jobs/{bad}/run", None), ("GET", f"/v1/jobs/{bad}/runs", None),
            ("POST", f"/v1/jobs/{bad}/backfill", {"from": "2026-01-01T00:00:00Z", "to": "2026-01-02T00:00:00Z"}),
            ("GET", f"/v1/runs/{bad}", None), ("GET", f"/v1/runs/{bad}/logs", None),
            ("DELETE", f"/v1/tokens/{bad}", None), ("GET", f"/v1/tokens?tenant={bad}", None),
            ("PUT", f"/v1/secrets/{bad}", {"value": "v"}), ("DELETE", f"/v1/secrets/{bad}", None),
            ("GET", f"/v1/audit?slug={bad}", None), ("GET", f"/v1/jobs/real/runs?limit={bad}", None),
            ("GET", f"/v1/schedules/preview?schedule={bad}", None),
            ("GET", f"/v1/schedules/preview?schedule=@hourly&tz={bad}", None),
            ("GET", f"/v1/schedules/preview?schedule=@hourly&tz={'x' * 300}{bad}", None),
            ("GET", f"/v1/schedules/preview?schedule=@hourly&after={bad}", None),
        ]:
            answer = await admin.request(method, path, json=body)
            assert 400 <= answer.status_code < 500, (method, path, answer.status_code, answer.text)
            assert set(answer.json()) == {"error"}, (method, path, answer.text)


async def test_bad_text_and_numbers_in_other_bodies_are_a_4xx(client_for) -> None:
    admin = await client_for("beta", "admin")
    assert (await admin.post("/v1/jobs", json=job_body("real"))).status_code == 201
    raw = {"content-type": "application/json"}
    for method, path, body, field in [
        ("POST", "/v1/tokens", '{"role": "viewer", "name": "a\\u0000b"}', "name"),
        ("POST", "/v1/tokens", '{"role": "viewer", "name": "a\\ud800b"}', "name"),
        ("POST", "/v1/tokens", '{"role": "viewer\\u0000", "name": "x"}', "role"),
        ("POST", "/v1/tokens", '{"role": "viewer", "tenant": "beta\\u0000"}', "tenant"),
        ("PUT", "/v1/secrets/api-key", '{"value": "a\\u0000b"}', "value"),
        ("PUT", "/v1/secrets/api-key", '{"value": "\\udc00"}', "value"),
        ("POST", "/v1/jobs/real/disable", '{"note": "\\u0000"}', "note"),
        ("POST", "/v1/jobs/real/backfill", '{"from": "0001-01-01T00:00:00Z", "to": "2026-01-01T00:00:00Z"}', "from"),
        ("POST", "/v1/jobs/real/backfill", '{"from": "2026-01-01T00:00:00Z", "to": "9999-12-31T23:59:59Z"}', "to"),
        ("POST", "/v1/jobs/real/backfill", '{"from": "-999999-01-01T00:00:00Z", "to": "2026-01-01T00:00:00Z"}', "from"),
        ("POST", "/v1/jobs/real/backfill", '{"from": 1e400, "to": "2026-01-01T00:00:00Z"}', "from"),
        ("POST", "/v1/jobs:apply", '{"jobs": [{"slug": "x\\u0000"}]}', "jobs.0.slug"),
        ("PATCH", "/v1/jobs/real", '{"catchup": {"window": "99999999d"}}', "catchup.window"),
        ("PATCH", "/v1/jobs/real", '{"sandbox": {"cpus": Infinity}}', "sandbox.cpus"),
        ("PATCH", "/v1/jobs/real", '{"labels": {"\\u0000": "x"}}', "labels"),
    ]:
        answer = await admin.request(method, path, content=body, headers=raw)
        assert answer.status_code == 422, (method, path, body, answer.status_code, answer.text)
        assert answer.json()["error"]["field"] == field, (method, path, body, answer.json())
    # a form body (the dashboard's) is checked the same way, before any page reads it
    form = await admin.post("/ui/login", content="token=a%00b", headers={"content-type": "application/x-www-form-urlencoded"})
    assert form.status_code == 422 and form.json()["error"]["field"] == "token", form.text
    for query in ("n=99999999999999999999", "n=-1", "after=0001-01-01T00:00:00Z", "after=9999-12-31T23:59:59Z",
                  "schedule=@every%2099999999d"):
        params = "schedule=@hourly&" + query if not query.startswith("schedule") else query
        answer = await admin.get(f"/v1/schedules/preview?{params}")
        assert answer.status_code < 500, (query, answer.text)
    for query in ("limit=99999999999999999999", "limit=-5", "limit=NaN"):
        answer = await admin.get(f"/v1/jobs/real/runs?{query}")
        assert 400 <= answer.status_code < 500, (query, answer.text)
    # the job is as it was
    job = (await admin.get("/v1/jobs/real")).json()
    assert job["catchup"]["window"] == "1h" and job["sandbox"]["cpus"] is None and job["labels"] == {}


def _merged(change: dict[str, Any]) -> dict[str, Any]:
    body = job_body("bounded")
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(body.get(key), dict):
            body[key] = {**body[key], **value}
        else:
            body[key] = value
    return body
