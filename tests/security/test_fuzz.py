"""Schema fuzzing: schemathesis generates requests for every operation of `/openapi.json` and
sends them in-process to the ASGI app on a real PostgreSQL, as a tenant's admin. No answer may
be a 5xx, and every answer must match the schema (status, content type, body).

Then the same generated requests turned hostile (issue 10): strings, numbers and dates in the
path, the query and the body swapped, at random, for what schema-valid generation rarely
produces: NUL, lone surrogates, huge and non-finite numbers (sent as JSON's `NaN`/`Infinity`,
which Python's parser accepts), far dates, traversal paths, loopback webhooks. No 5xx either,
and every refusal is kjob's error shape.

Bounded (FUZZ_EXAMPLES, HOSTILE_EXAMPLES per operation) so it runs in well under a minute.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import hypothesis
import pytest
import schemathesis
from hypothesis import strategies as st
from starlette.testclient import TestClient
from schemathesis.checks import not_a_server_error
from schemathesis.core import NOT_SET
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from kjob.config import Settings
from kjob.executor.agents import AgentRegistry
from kjob.gateway.app import create_app
from kjob.gateway.state import GatewayState
from kjob.model.job import parse_job
from kjob.model.run import Run
from kjob.store.audit import Actor
from kjob.store.database import normalize_url
from kjob.store.jobs import JobStore
from kjob.store.runs import RunReads
from kjob.store.slots import SlotLedger
from kjob.store.secrets import SecretBox, SecretStore, generate_key
from kjob.store.tokens import TokenStore
from tests.security.conftest import job_body

FUZZ_EXAMPLES = 20
HOSTILE_EXAMPLES = 16
#: What a string may become: each of issue 10's inputs, alone or around the generated text.
HOSTILE_TEXT = [
    "\x00", "a\x00b", "\ud800", "x\udfff", "\ufffe\uffff", "%00", "..", "../etc", "/", "//x", "9" * 400,
    "99999999999999999999G", "99999999d", "9999999999999d", "0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z",
    "-999999-01-01T00:00:00Z", "@once 9999-12-31T23:59Z", "@every 99999999d", "@once 0001-01-01T00:00+01:00",
    "webhook:http://127.0.0.1:1/x", "webhook:http://[::ffff:127.0.0.1]/", "webhook:http://2130706433/",
    "Infinity", "NaN", "A=B", "x" * 70_000,
]
#: What a number may become (the JSON encoder writes NaN and Infinity as such).
HOSTILE_NUMBERS = [10**30, -(10**30), 2**63, -(2**63) - 1, float("nan"), float("inf"), float("-inf"), 1e308, -1, 0]
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture
async def fuzz_seed(engine) -> tuple[str, str]:
    """Tenant `fuzz`: an admin token, and a job, a run and a secret for path parameters to
    hit. Returns (token, secret key)."""
    key = generate_key()
    _, token = await TokenStore(engine).create("fuzz", "admin", "schemathesis")
    actor = Actor(subject="seed", token_id=None, tenant="fuzz")
    job = await JobStore(engine).create(actor, parse_job(job_body("nightly")))
    await SlotLedger(engine).create_manual(job)
    await SecretStore(engine, SecretBox(key)).set(actor, "api-key", "v")
    return token, key


@pytest.fixture
def fuzz_schema(database_url: str, fuzz_seed: tuple[str, str], tmp_path):
    token, key = fuzz_seed
    # The ASGI test client runs each call on an event loop of its own: a pool would hand a
    # connection to a loop that did not open it, so every call opens its own.
    engine = create_async_engine(normalize_url(database_url), poolclass=NullPool)

    async def publish(run: Run) -> None:
        pass

    state = GatewayState(
        settings=Settings(home=tmp_path, secret_key=key, quotas={"run_now_per_minute": 1000}),
        engine=engine, jobs=JobStore(engine), tokens=TokenStore(engine), agents=AgentRegistry.load(None),
        relay_configured=False, runs=RunReads(engine), slots=SlotLedger(engine),
        publish_due=publish,
    )
    app = create_app(state)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    schema.fuzz_token = token
    schema.fuzz_app = app
    return schema


def _operations() -> list[tuple[str, str]]:
    """(method, path) of every operation, read from an app that needs no server."""
    settings = Settings(home="/nonexistent", secret_key=generate_key())
    offline = GatewayState(settings=settings, engine=None, jobs=None, tokens=None, agents=None,  # type: ignore[arg-type]
                           relay_configured=False)
    paths = create_app(offline).openapi()["paths"]
    return sorted((method.upper(), path) for path, item in paths.items() for method in item)


@pytest.mark.parametrize(("method", "path"), _operations(), ids=lambda v: v)
def test_the_api_answers_generated_requests_without_5xx_and_per_its_schema(fuzz_schema, method: str, path: str) -> None:
    operation = fuzz_schema[path][method]
    headers = {"Authorization": f"Bearer {fuzz_schema.fuzz_token}"}

    @hypothesis.given(case=operation.as_strategy())
    @hypothesis.settings(
        max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
        suppress_health_check=list(hypothesis.HealthCheck), phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
    )
    def fuzz(case) -> None:
        case.call_and_validate(headers=headers, checks=CHECKS)

    fuzz()


def _hostile(data: st.DataObject, value: Any) -> Any:
    """`value` with some of its strings and numbers (and the keys of its tables) made hostile."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if isinstance(key, str) and data.draw(st.integers(0, 9)) == 0:
                key = data.draw(st.sampled_from(HOSTILE_TEXT))
            out[key] = _hostile(data, item)
        return out
    if isinstance(value, list):
        return [_hostile(data, item) for item in value]
    if isinstance(value, bool) or value is None:
        return value
    if not data.draw(st.booleans()):
        return value
    if isinstance(value, (int, float)):
        return data.draw(st.sampled_from(HOSTILE_NUMBERS))
    hostile = data.draw(st.sampled_from(HOSTILE_TEXT))
    return data.draw(st.sampled_from([hostile, f"{value}{hostile}", f"{hostile}{value}"]))


def _encoded(value: Any) -> str:
    # surrogatepass: a lone surrogate travels as its (invalid) UTF-8 bytes, %ED%A0%80
    # capped: a URL of 70 KB is refused by the client before it leaves (the body carries those)
    return quote(str(value)[:2000].encode("utf-8", "surrogatepass"), safe="")


def test_hostile_values_anywhere_never_answer_5xx(fuzz_schema) -> None:
    """Every operation in one test: one seeded database for all (the requests change little)."""
    headers = {"Authorization": f"Bearer {fuzz_schema.fuzz_token}", "content-type": "application/json"}
    with TestClient(fuzz_schema.fuzz_app, raise_server_exceptions=False) as client:
        for method, path in _operations():
            _fuzz_hostile(client, fuzz_schema[path][method], method, path, headers)


def _fuzz_hostile(client: TestClient, operation: Any, method: str, path: str, headers: dict[str, str]) -> None:
    @hypothesis.given(case=operation.as_strategy(), data=st.data())
    @hypothesis.settings(
        max_examples=HOSTILE_EXAMPLES, deadline=None, derandomize=True, database=None,
        suppress_health_check=list(hypothesis.HealthCheck),
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
    )
    def fuzz(case, data: st.DataObject) -> None:
        params = {name: _hostile(data, v) for name, v in (case.path_parameters or {}).items()}
        url = path.format(**{name: _encoded(v) for name, v in params.items()})
        query = _hostile(data, dict(case.query or {}))
        if query:
            url += "?" + "&".join(f"{_encoded(k)}={_encoded(v)}" for k, v in query.items())
        content = None
        if case.body is not NOT_SET:
            content = json.dumps(_hostile(data, case.body), ensure_ascii=True, allow_nan=True)
        answer = client.request(method, url, content=content, headers=headers)
        assert answer.status_code < 500, (method, url, content and content[:300], answer.text[:500])
        if answer.status_code >= 400:
            assert set(answer.json()) == {"error"}, (method, url, answer.text[:500])

    fuzz()
