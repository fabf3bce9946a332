"""Schema fuzzing: schemathesis generates requests for every operation of `/openapi.json` and
sends them in-process to the ASGI app on a real PostgreSQL, as a tenant's admin. No answer may
be a 5xx, and every answer must match the schema (status, content type, body).

Bounded (FUZZ_EXAMPLES per operation) so it runs in well under a minute.
"""

from __future__ import annotations

import hypothesis
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
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
from kjob.store.runs import RunLedger
from kjob.store.secrets import SecretBox, SecretStore, generate_key
from kjob.store.tokens import TokenStore
from tests.security.conftest import job_body

FUZZ_EXAMPLES = 20
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture
async def fuzz_seed(engine) -> tuple[str, str]:
    """Tenant `fuzz`: an admin token, and a job, a run and a secret for path parameters to
    hit. Returns (token, secret key)."""
    key = generate_key()
    _, token = await TokenStore(engine).create("fuzz", "admin", "schemathesis")
    actor = Actor(subject="seed", token_id=None, tenant="fuzz")
    job = await JobStore(engine).create(actor, parse_job(job_body("nightly")))
    await RunLedger(engine).create_manual(job)
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
        relay_configured=False, ledger=RunLedger(engine), publish_due=publish,
    )
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(state))
    schema.fuzz_token = token
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
