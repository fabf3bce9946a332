"""A start error that waiting will not heal ends the run at once: no retries, no backoff
(a missing agent binary, a missing image). Before, each was retried with backoff, so
`run-now --wait` sat silent for the whole retry budget (issue 15, item 3)."""

from __future__ import annotations

import pytest

from kjob.model.run import RunStatus
from tests.support.images import ensure_test_images
from tests.support.pipeline import attempts_of, create_job, fast_settings, running_node, runs_of, until

#: A backoff far longer than the test waits: a retried run cannot be final in time.
RETRIES = {"max": 3, "backoff": "fixed", "initial_delay": "1h"}


async def _first_final(engine, job, timeout: float = 30):
    async def final():
        # (a slot skipped by the overlap policy while the first run retried is not the one)
        return next((r for r in await runs_of(engine, job)
                     if r.status.final and r.status is not RunStatus.skipped), None)
    return await until(final, timeout, f"a final run of {job.slug} (a retried one would wait 1h)")


async def test_a_missing_agent_binary_ends_the_run_without_retries(tmp_path, fresh_nats, database_url, engine):
    agents = tmp_path / "agents.toml"
    agents.write_text('[agents.ghost]\ncommand = ["no-such-agent-binary-xyz"]\n')
    settings = fast_settings(tmp_path)
    settings.executor.agents_file = agents
    job = await create_job(engine, slug="ghost-job", agent="ghost", prompt="hi", retries=RETRIES)
    async with running_node(settings, fresh_nats.url, database_url):
        run = await _first_final(engine, job)
    assert run.status is RunStatus.error and "was not found" in (run.reason or ""), run.reason
    assert len(await attempts_of(engine, run.id)) == 1, "a missing binary was retried"


@pytest.mark.docker
async def test_a_missing_image_ends_the_run_without_retries(tmp_path, fresh_nats, database_url, engine):
    ensure_test_images()
    settings = fast_settings(tmp_path)
    job = await create_job(engine, slug="no-image", prompt="true", retries=RETRIES,
                           sandbox={"backend": "docker", "image": "kjob-test/no-such-image:1", "pull": "never"})
    async with running_node(settings, fresh_nats.url, database_url):
        run = await _first_final(engine, job)
    assert run.status is RunStatus.error and "is not on the docker host" in (run.reason or ""), run.reason
    assert len(await attempts_of(engine, run.id)) == 1, "a missing image was retried"


async def test_a_failing_agent_is_still_retried(tmp_path, fresh_nats, database_url, engine):
    """Only start errors that cannot heal skip the retries: an exit code is the agent's own."""
    job = await create_job(engine, slug="flaky", prompt="exit 3", retries={"max": 1, "backoff": "fixed",
                                                                           "initial_delay": "1s"})
    async with running_node(fast_settings(tmp_path), fresh_nats.url, database_url):
        run = await _first_final(engine, job)
    assert run.status is RunStatus.failed and len(await attempts_of(engine, run.id)) == 2
