"""`kjob token`, `kjob secret`, `kjob audit` and `kjob quota` against a real gateway, and the
CLI's view of another tenant: one-line errors, nothing of theirs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from kjob.store.secrets import SecretBox, SecretStore, ensure_key_file
from kjob.store.tokens import TokenStore
from tests.cli.conftest import base_env, home, kjob, one_line_error, runner_for, token  # noqa: F401 (fixtures)
from tests.support.gateway import GatewayServer


@pytest.fixture
def server(database_url: str, home: Path) -> Iterator[GatewayServer]:  # noqa: F811
    """The CLI tests' gateway, with a secret key file in its home (as `kjob up` makes one)."""
    ensure_key_file(home / "secret.key")
    with GatewayServer(database_url, home) as running:
        yield running


def test_token_create_prints_the_secret_alone_once(kjob, base_env, server) -> None:  # noqa: F811
    created = kjob("token", "create", "--role", "viewer", "--name", "dashboards")
    assert created.exit_code == 0, created.output
    secret = created.stdout.strip()
    assert secret.startswith("kjob_") and "\n" not in secret
    assert "shown only this once" in created.stderr
    as_viewer = runner_for({**base_env, "KJOB_API_URL": server.url, "KJOB_TOKEN": secret})
    assert as_viewer("list").exit_code == 0
    one_line_error(as_viewer("create", "--slug", "x", "--prompt", "p", "--schedule", "@daily", "--agent", "shell"))

    listed = json.loads(kjob("token", "list", "-o", "json").stdout)
    assert "secret" not in json.dumps(listed) and secret not in json.dumps(listed)
    token_id = next(t["id"] for t in listed if t["name"] == "dashboards")
    assert kjob("token", "revoke", token_id).stdout.strip() == f"revoked token {token_id}"
    assert "not valid" in one_line_error(as_viewer("list"))


def test_token_create_refuses_a_bad_role_in_one_line(kjob) -> None:  # noqa: F811
    assert "role" in one_line_error(kjob("token", "create", "--role", "root"), field="role")


async def test_secret_set_reads_stdin_and_list_shows_names_only(kjob, home, engine, tmp_path) -> None:  # noqa: F811
    result = kjob("secret", "set", "api-key", input="s3cr3t-from-stdin\n")
    assert result.exit_code == 0, result.output
    assert 'secret:api-key' in result.stdout
    box = SecretBox((home / "secret.key").read_text())
    assert await SecretStore(engine, box).values("acme", {"api-key"}) == {"api-key": "s3cr3t-from-stdin"}
    listed = kjob("secret", "list", "-o", "json")
    assert [s["name"] for s in json.loads(listed.stdout)] == ["api-key"]
    assert "s3cr3t" not in listed.stdout
    jobfile = tmp_path / "jobs.toml"
    jobfile.write_text('[job]\nslug = "uses"\nprompt = "echo"\nagent = "shell"\nschedule = "@daily"\n'
                       'sandbox = { env = { K = "secret:api-key" } }\n')
    created = kjob("apply", "-f", str(jobfile))
    assert created.exit_code == 0, created.output
    assert "nightly" not in kjob("secret", "delete", "api-key").stderr
    assert "uses" in one_line_error(kjob("secret", "delete", "api-key"))
    one_line_error(kjob("secret", "set", "empty", input=""), field="value")
    one_line_error(kjob("secret", "set", "bad/name", input="v"), field="name")


def test_secret_keygen_prints_a_fernet_key(kjob) -> None:  # noqa: F811
    key = kjob("secret", "keygen").stdout.strip()
    Fernet(key)  # raises if it is not one


def test_audit_and_quota(kjob) -> None:  # noqa: F811
    kjob("create", "--slug", "nightly", "--prompt", "echo", "--schedule", "@daily", "--agent", "shell")
    kjob("disable", "nightly")
    entries = json.loads(kjob("audit", "--slug", "nightly", "-o", "json").stdout)
    assert [e["action"] for e in entries] == ["job.disable", "job.create"]
    table = kjob("audit")
    assert table.exit_code == 0 and "job.disable" in table.stdout
    one_line_error(kjob("audit", "--slug", "Not A Slug"), field="slug")
    quota = json.loads(kjob("quota", "-o", "json").stdout)
    assert quota["tenant"] == "acme" and quota["usage"]["jobs"] == 1


async def test_the_cli_shows_nothing_of_another_tenant(kjob, base_env, server, engine) -> None:  # noqa: F811
    kjob("create", "--slug", "acme-job", "--prompt", "echo", "--schedule", "@daily", "--agent", "shell")
    _, other = await TokenStore(engine).create("globex", "admin")
    globex = runner_for({**base_env, "KJOB_API_URL": server.url, "KJOB_TOKEN": other})
    for args in (["inspect", "acme-job"], ["runs", "acme-job"], ["run-now", "acme-job"], ["disable", "acme-job"]):
        assert "no job named 'acme-job'" in one_line_error(globex(*args))
    assert "acme" not in globex("list", "-o", "json").stdout
    assert json.loads(globex("audit", "-o", "json").stdout) == []
