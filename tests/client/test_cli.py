"""The CLI, rebuilt on kjob.client, against a real `kjob up` with real runs: every listing at
80 columns (one line a row, values whole where they name something), `--wide`, short run
ids, why a run failed (`runs`, `logs`), `update`, `--version`."""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from kjob.cli.main import app
from kjob.client import Client
from tests.client.conftest import tenant_token
from tests.support.up import KjobUp

LONG_SLUG = "weekly-stack-audit-for-finance"
LONG_ZONE = "America/Argentina/Buenos_Aires"


class Kjob:
    def __init__(self, up: KjobUp, token: str, home: Path) -> None:
        self.env = {"KJOB_API_URL": up.url, "KJOB_TOKEN": token, "KJOB_HOME": str(home),
                    "KJOB_CONFIG": str(home / "none.toml"), "COLUMNS": "80"}

    def __call__(self, *args: str, ok: bool = True, **env: str) -> Result:
        result = CliRunner().invoke(app, list(args), env={**self.env, **env})
        if ok:
            assert result.exit_code == 0, (args, result.output, result.exception)
        return result


@pytest.fixture
def kjob(up: KjobUp, admin: Client, tmp_path: Path) -> Kjob:
    return Kjob(up, tenant_token(admin), tmp_path)


def fits(result: Result, width: int = 80) -> list[str]:
    lines = result.stdout.splitlines()
    assert lines and all(len(line) <= width for line in lines), "\n" + result.stdout
    return lines


def test_every_listing_fits_80_columns_and_wide_shows_everything(kjob: Kjob) -> None:
    kjob("create", "--slug", LONG_SLUG, "--agent", "shell", "--schedule", "*/15 9-17 * * MON-FRI", "--tz", LONG_ZONE,
         "--prompt", "echo audited; exit 3", "--output", "webhook:https://hooks.example.com/kjob/finance/weekly")
    kjob("create", "--slug", "broken", "--agent", "kode", "--schedule", "@daily", "--prompt", "/k-housekeep")
    kjob("run-now", LONG_SLUG, "--wait", ok=False)
    kjob("run-now", "broken", "--wait", ok=False)
    kjob("token", "create", "--role", "viewer", "--name", "the dashboards of the finance team, read only")

    listed = fits(kjob("list"))
    assert len(listed) == 3 and listed[1].startswith("broken ") and listed[2].startswith(LONG_SLUG[:16])
    assert " kode " in listed[1] and " yes " in listed[1]  # short values stay whole
    wide = kjob("list", "--wide").stdout.splitlines()
    assert wide[2].startswith(LONG_SLUG + " ") and LONG_ZONE in wide[2]
    assert "webhook:https://hooks.example.com/kjob/finance/weekly" in wide[2] and max(map(len, wide)) > 80

    [run] = json.loads(kjob("runs", LONG_SLUG, "-o", "json").stdout)
    header, row = fits(kjob("runs", LONG_SLUG))
    assert header.split() == ["RUN", "SLOT", "(UTC)", "TRIGGER", "STATUS", "EXIT", "TOOK", "DELIVERY", "REASON"]
    assert row.split()[:1] == [run["id"][:8]] and " manual " in row and " failed " in row and " 3 " in row
    assert run["id"] in kjob("runs", LONG_SLUG, "--wide").stdout

    _, broken = fits(kjob("runs", "broken"))
    assert " error " in broken and "kode" in kjob("runs", "broken", "--wide").stdout  # the reason names the binary

    audit = fits(kjob("audit"))
    actions = [line.split()[3] for line in audit[1:]]
    assert actions.count("job.create") == 2 and actions.count("job.run") == 2 and actions[0] == "token.create"
    assert any(" job.create " in line and " job/broken " in line for line in audit)
    tokens = fits(kjob("token", "list"))
    assert any(" viewer " in line and "the dashboards" in line for line in tokens)
    assert "the dashboards of the finance team, read only" in kjob("token", "list", "--wide").stdout
    fits(kjob("quota"))
    fits(kjob("next", "*/15 9-17 * * MON-FRI", "--tz", LONG_ZONE))
    inspect = fits(kjob("inspect", LONG_SLUG))
    assert any(line.startswith("slug") and LONG_SLUG in line for line in inspect)
    prompt = "echo audited; exit 3 " + "and so on " * 10
    kjob("update", LONG_SLUG, "--set", f"prompt={prompt}")
    assert not any(prompt.strip() in line for line in fits(kjob("inspect", LONG_SLUG)))  # folded at 80
    assert any(line.startswith("prompt") and line.rstrip().endswith(prompt.strip())
               for line in kjob("inspect", LONG_SLUG, "--wide").stdout.splitlines())
    status = fits(kjob("status"))
    assert status[0].startswith("ticker leader: ") and "nodes" in status and "streams" in status


def test_secret_list_fits(kjob: Kjob) -> None:
    result = CliRunner().invoke(app, ["secret", "set", "a-rather-long-secret-name.for-the-finance-team"],
                                input="value\n", env=kjob.env)
    assert result.exit_code == 0, result.output
    assert "a-rather-long-secret-name.for-the-finance-team" in fits(kjob("secret", "list"))[1]


def test_logs_take_short_ids_and_say_why_a_run_failed(kjob: Kjob) -> None:
    kjob("create", "--slug", "fails", "--agent", "shell", "--schedule", "@daily", "--prompt", "echo trying; exit 3")
    kjob("create", "--slug", "broken", "--agent", "kode", "--schedule", "@daily", "--prompt", "/k-housekeep")
    kjob("create", "--slug", "works", "--agent", "shell", "--schedule", "@daily", "--prompt", "echo fine")
    waited = kjob("run-now", "fails", "--wait", ok=False)
    assert waited.exit_code == 1 and waited.stdout.startswith("trying\n")
    assert "failed (exit code 3): exit code 3 after 1 attempt(s)" in waited.stdout
    for slug in ("broken", "works"):
        kjob("run-now", slug, "--wait", ok=slug == "works")
    ids = {slug: json.loads(kjob("runs", slug, "-o", "json").stdout)[0]["id"] for slug in ("fails", "broken", "works")}

    failed = kjob("logs", ids["fails"][:8], ok=False)
    assert failed.exit_code == 1 and failed.stdout == "trying\n"
    assert failed.stderr == f"run {ids['fails'][:8]} failed (exit code 3): exit code 3\n"
    error = kjob("logs", ids["broken"][:6], ok=False)
    assert error.exit_code == 1 and error.stdout == ""
    assert error.stderr.startswith(f"run {ids['broken'][:8]} error: ") and "kode" in error.stderr
    assert kjob("logs", ids["works"][:5]).stdout == "fine\n"
    assert kjob("logs", "-f", ids["works"]).stdout == "fine\n"
    missing = kjob("logs", "0000", ok=False)
    assert missing.exit_code == 1 and missing.stderr == "error: no run named '0000' was found\n"


def test_update_changes_fields_and_the_duplicate_slug_error_names_it(kjob: Kjob) -> None:
    kjob("create", "--slug", "audit", "--agent", "shell", "--schedule", "@daily", "--prompt", "echo hi")
    taken = kjob("create", "--slug", "audit", "--agent", "shell", "--schedule", "@daily", "--prompt", "echo hi",
                 ok=False)
    assert taken.exit_code == 1 and "change it with `kjob update` or `kjob apply`" in taken.stderr
    updated = kjob("update", "audit", "--set", "schedule=0 8 * * *", "--set", "retries.max=2", "--set",
                   'labels.team="ops"', "--set", "timeout=1h")
    assert updated.stdout.startswith("updated audit; next fire ")
    job = json.loads(kjob("inspect", "audit", "-o", "json").stdout)
    assert (job["schedule"], job["retries"]["max"], job["labels"], job["timeout"]) == ("0 8 * * *", 2, {"team": "ops"},
                                                                                       "1h")
    bad = kjob("update", "audit", "--set", "timezone=Mars/Olympus_Mons", ok=False)
    assert bad.exit_code == 1 and bad.stderr.startswith("error: timezone: unknown time zone")
    assert json.loads(kjob("inspect", "audit", "-o", "json").stdout)["timezone"] == "UTC"  # nothing changed


def test_version(kjob: Kjob) -> None:
    assert kjob("--version").stdout == f"kjob {version('koder-scheduler')}\n"
