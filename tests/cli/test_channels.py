"""Relay's channel kinds are a known list (RFC section 7: Kode chat, Slack, Telegram, email,
webhook; `relay_channel_kinds` to change it): a channel of another kind is refused when the
job is written, 422 naming `output.channel` and listing the kinds, by the API, `kjob create`
and `kjob apply`, and changes nothing. Before, `--output carrier-pigeon:x` was accepted while a
Relay was configured, and failed at the first run."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from kjob.config import Settings
from kjob.model.channels import DEFAULT_CHANNEL_KINDS
from tests.cli.conftest import Run, one_line_error, runner_for
from tests.support.gateway import GatewayServer

KINDS = "kode-chat, slack, telegram, email, webhook"
CREATE = ["create", "--slug", "report", "--prompt", "p", "--agent", "shell", "--schedule", "@daily"]


@pytest.fixture
def relay_server(database_url: str, home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[GatewayServer]:
    """A gateway with a Relay configured (so any kind would otherwise go to Relay)."""
    monkeypatch.delenv("KJOB_RELAY_CHANNEL_KINDS", raising=False)
    with GatewayServer(database_url, home, relay_configured=True) as running:
        yield running


@pytest.fixture
def relay_kjob(base_env: dict[str, str | None], relay_server: GatewayServer, token: str) -> Run:
    return runner_for({**base_env, "KJOB_API_URL": relay_server.url, "KJOB_TOKEN": token})


def _slugs(kjob: Run) -> list[str]:
    return [j["slug"] for j in json.loads(kjob("list", "-o", "json").stdout)]


@pytest.mark.parametrize(("channel", "words"), [
    ("carrier-pigeon:x", f"'carrier-pigeon' is not a channel kind; the kinds are {KINDS}"),
    ("Slack:ops", "'Slack' is not a channel kind"),  # kinds are lowercase, as Relay names them
    ("kode-chat", "'kode-chat' is not a channel: write KIND:ADDRESS"),  # no address
    ("telegram:  ", "'telegram:' is not a channel"),
])
def test_an_unknown_channel_kind_is_refused_at_create(relay_kjob: Run, relay_server: GatewayServer, token: str,
                                                      tmp_path: Path, channel: str, words: str) -> None:
    error = one_line_error(relay_kjob(*CREATE, "--output", channel), "output.channel")
    assert words in error
    with httpx.Client(base_url=relay_server.url, headers={"Authorization": f"Bearer {token}"}) as api:
        body = {"slug": "report", "prompt": "p", "agent": "shell", "schedule": "@daily", "output": {"channel": channel}}
        answer = api.post("/v1/jobs", json=body)
        assert answer.status_code == 422, answer.text
        assert answer.json()["error"]["field"] == "output.channel" and words in answer.json()["error"]["message"]
    jobs = tmp_path / "jobs.toml"
    jobs.write_text('[[job]]\nslug = "fine"\nprompt = "p"\nagent = "shell"\nschedule = "@daily"\n\n'
                    f'[[job]]\nslug = "report"\nprompt = "p"\nagent = "shell"\nschedule = "@daily"\n'
                    f'output = {{ channel = "{channel}" }}\n')
    assert words in one_line_error(relay_kjob("apply", "-f", str(jobs)), "job[2].output.channel")
    assert _slugs(relay_kjob) == []  # nothing written, not even the good job of the file


def test_every_kind_of_the_rfc_is_accepted(relay_kjob: Run) -> None:
    for kind in DEFAULT_CHANNEL_KINDS:
        address = "https://hooks.example.com/x" if kind == "webhook" else "ops"
        created = relay_kjob("create", "--slug", f"to-{kind}", "--prompt", "p", "--agent", "shell",
                             "--schedule", "@daily", "--output", f"{kind}:{address}")
        assert created.exit_code == 0, created.output
    assert sorted(_slugs(relay_kjob)) == sorted(f"to-{k}" for k in DEFAULT_CHANNEL_KINDS)


def test_the_operator_sets_the_kinds(database_url: str, home: Path, token: str, base_env: dict[str, str | None],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KJOB_RELAY_CHANNEL_KINDS", '["matrix", "kode-chat"]')
    with GatewayServer(database_url, home, relay_configured=True) as server:
        kjob = runner_for({**base_env, "KJOB_API_URL": server.url, "KJOB_TOKEN": token})
        assert kjob(*CREATE, "--output", "matrix:!room").exit_code == 0
        error = one_line_error(kjob(*CREATE[:2], "other", *CREATE[3:], "--output", "slack:ops"), "output.channel")
        assert "'slack' is not a channel kind; the kinds are matrix, kode-chat" in error


@pytest.mark.parametrize("kinds", [[], ["Carrier Pigeon"], ["slack:"]])
def test_a_bad_kinds_setting_is_refused(kinds: list[str]) -> None:
    with pytest.raises(ValidationError, match="relay_channel_kinds"):
        Settings(relay_channel_kinds=kinds)
