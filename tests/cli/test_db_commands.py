"""`kjob db upgrade` and `kjob db admin-token` against a real PostgreSQL, as an operator runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from kjob.store.tokens import TokenStore
from tests.support.servers import head_revision

KJOB = str(Path(sys.executable).with_name("kjob"))


def run(*args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KJOB_")}
    return subprocess.run([KJOB, *args], env={**clean, **env}, capture_output=True, text=True, timeout=60)


async def test_admin_token_is_written_once_and_verifies(tmp_path, database_url, engine):
    token_file = tmp_path / "secrets" / "admin.token"
    first = run("db", "admin-token", "--file", str(token_file), KJOB_DATABASE_URL=database_url)
    assert first.returncode == 0, first.stderr
    secret = token_file.read_text().strip()
    assert oct(token_file.stat().st_mode & 0o777) == "0o600"
    principal = await TokenStore(engine).verify(secret)
    assert principal is not None and principal.role == "admin"
    again = run("db", "admin-token", "--file", str(token_file), KJOB_DATABASE_URL=database_url)
    assert again.returncode == 0 and token_file.read_text().strip() == secret  # still valid: kept


def test_admin_token_without_a_database_url_says_what_to_do(tmp_path):
    result = run("db", "admin-token", "--file", str(tmp_path / "t"), KJOB_HOME=str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error: kjob db admin-token needs KJOB_DATABASE_URL")
    assert not (tmp_path / "t").exists()


def test_db_upgrade_reports_the_revision(database_url):
    result = run("db", "upgrade", KJOB_DATABASE_URL=database_url)
    assert result.returncode == 0, result.stderr
    assert f"database at revision {head_revision()}" in result.stdout
