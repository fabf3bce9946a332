"""How the CLI finds the API and its token, what it says when it cannot, and the real
`kjob` console script in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncEngine

from kjob.store.tokens import TokenStore
from tests.cli.conftest import Run, one_line_error, runner_for
from tests.cli.test_jobs import CREATE, jobs_json
from tests.support.gateway import GatewayServer

KJOB = Path(sys.executable).with_name("kjob")


def test_no_server_says_how_to_start_one(offline: Run) -> None:
    for args in (["list"], ["inspect", "x"], CREATE):
        message = one_line_error(offline(*args))
        assert (
            message
            == "error: cannot reach the kjob API at http://127.0.0.1:9: start it with `kjob up` or set KJOB_API_URL"
        )


def test_bad_or_missing_token_is_one_line(kjob: Run) -> None:
    assert "not valid" in one_line_error(kjob("list", KJOB_TOKEN="kjob_000000000000_wrong"))
    assert "no API token" in one_line_error(kjob("list", KJOB_TOKEN=None))


def test_a_slug_that_cannot_exist_is_refused_before_the_request(kjob: Run) -> None:
    one_line_error(kjob("inspect", "../jobs"), "slug")


def test_url_and_token_come_from_the_files_kjob_up_writes(
    base_env: dict[str, str | None], home: Path, server: GatewayServer, token: str
) -> None:
    (home / "api.url").write_text(server.url + "\n")
    (home / "admin.token").write_text(token + "\n")
    kjob = runner_for(base_env)
    assert kjob(*CREATE).exit_code == 0
    assert [j["slug"] for j in jobs_json(kjob)] == ["weekly-audit"]


async def test_another_tenant_cannot_see_or_change_the_job(
    kjob: Run, base_env: dict[str, str | None], server: GatewayServer, engine: AsyncEngine
) -> None:
    assert kjob(*CREATE).exit_code == 0
    _, globex_token = await TokenStore(engine).create("globex", "admin")
    globex = runner_for({**base_env, "KJOB_API_URL": server.url, "KJOB_TOKEN": globex_token})
    assert jobs_json(globex) == []
    for args in (["inspect", "weekly-audit"], ["disable", "weekly-audit"], ["delete", "weekly-audit", "--yes"]):
        assert "no job named 'weekly-audit'" in one_line_error(globex(*args))
    [job] = jobs_json(kjob)
    assert job["enabled"] is True and job["tenant"] == "acme"


def test_the_console_script(server: GatewayServer, token: str, home: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KJOB_")}
    env.update(KJOB_HOME=str(home), KJOB_API_URL=server.url, KJOB_TOKEN=token)

    def kjob(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(KJOB), *args], env=env, capture_output=True, text=True, timeout=60)

    created = kjob(*CREATE)
    assert created.returncode == 0, created.stderr
    listed = kjob("list", "-o", "json")
    assert [j["slug"] for j in json.loads(listed.stdout)] == ["weekly-audit"]
    bad = kjob(*CREATE[:-2], "--tz", "Mars/Olympus_Mons")
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.startswith("error: timezone: unknown time zone") and bad.stderr.count("\n") == 1
    usage = kjob("list", "-o", "yaml")
    assert usage.returncode == 2 and usage.stderr.count("\n") == 1
    preview = kjob(
        "next", "30 2 * * *", "--tz", "America/New_York", "--after", "2026-03-07T00:00:00Z", "-n", "3", "-o", "json"
    )
    assert json.loads(preview.stdout) == ["2026-03-07T07:30:00Z", "2026-03-08T07:00:00Z", "2026-03-09T06:30:00Z"]


def test_a_broken_config_file_is_one_line(base_env: dict[str, str | None], home: Path) -> None:
    (home / "config.toml").write_text('api_url = "http://unterminated\n')
    message = one_line_error(runner_for(base_env)("list"), "configuration")
    assert "config.toml is not valid TOML" in message
    (home / "config.toml").unlink()
    assert "port" in one_line_error(runner_for(base_env)("list", KJOB_PORT="eighty"), "configuration")


def test_bad_warm_start_settings_are_one_line(base_env: dict[str, str | None]) -> None:
    run = runner_for(base_env)
    for name, value in (("WARM_STARTS", "-1"), ("WARM_STARTS", "10001"), ("WARM_STARTS", "many"),
                        ("WARM_AHEAD_S", "0"), ("WARM_AHEAD_S", "61")):
        message = one_line_error(run("list", **{f"KJOB_EXECUTOR__{name}": value}), "configuration")
        assert name.lower() in message, (name, value, message)


def test_help_lists_the_job_and_serving_commands(offline: Run) -> None:
    result = offline("--help")
    assert result.exit_code == 0
    for command in ("create", "apply", "list", "inspect", "enable", "disable", "delete", "next", "up", "server", "db"):
        assert f" {command} " in result.stdout
