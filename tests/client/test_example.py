"""The worked example of docs/sdk.md (tests/client/weekly_audit.py): it type-checks under
`mypy --strict` as a user's code would (kjob installed, with py.typed), mypy catches misuse of
the client, it runs against a real `kjob up` in both flavours, and the docs show it verbatim."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from kjob.client import AsyncClient, Client
from tests.client import weekly_audit
from tests.client.conftest import tenant_token
from tests.support.up import KjobUp

EXAMPLE = Path(weekly_audit.__file__)
DOCS = Path(__file__).parents[2] / "docs" / "sdk.md"

#: Misuse a type checker must refuse, and the error it must give for each line.
MISUSE = '''
from kjob.client import AsyncClient, Client

def misuse(kjob: Client, akjob: AsyncClient) -> None:
    slug: str = kjob.jobs.get("audit")
    akjob.jobs.get("audit").slug
    for run in akjob.runs.list("audit"):
        pass
    kjob.runs.logs("d05cc3de", folow=True)
'''
EXPECTED = {
    5: 'Incompatible types in assignment (expression has type "JobView", variable has type "str")',
    6: '"Awaitable[JobView]" has no attribute "slug"',
    7: '"AsyncIterator[RunView]" has no attribute "__iter__"',
    9: 'Unexpected keyword argument "folow"',
}


def test_mypy_strict_passes_the_example_and_refuses_misuse(tmp_path: Path) -> None:
    misuse = tmp_path / "misuse.py"
    misuse.write_text(MISUSE)
    # --follow-imports=silent: kjob's own modules are read for their types but not judged, as
    # for any installed package; only the files named here are checked.
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent", "--no-error-summary",
         "--cache-dir", str(tmp_path / "cache"), str(EXAMPLE), str(misuse)],
        capture_output=True, text=True, timeout=240,
    )
    errors: dict[int, str] = {}
    for line in result.stdout.splitlines():
        m = re.match(r"(.+?):(\d+): (error|note): (.*)", line)
        assert m, line
        if m[3] == "note":
            continue
        assert Path(m[1]).name == "misuse.py", f"the example fails mypy --strict: {line}"
        errors.setdefault(int(m[2]), m[4])
    assert set(errors) == set(EXPECTED), result.stdout
    for number, text in EXPECTED.items():
        assert errors[number].startswith(text), (number, errors[number])


async def test_the_example_runs_against_kjob_up(up: KjobUp, admin: Client, capsys: pytest.CaptureFixture[str]) -> None:
    token = tenant_token(admin)
    with Client(up.url, token) as kjob:
        assert weekly_audit.provision(kjob, ["acme", "globex"])
    first = capsys.readouterr().out.splitlines()
    assert [line.split(",")[0] for line in first[:2]] == ["created   audit-acme", "created   audit-globex"]
    assert first[2:] == ["  | auditing acme"]

    async with AsyncClient(up.url, token) as akjob:
        assert await weekly_audit.provision_async(akjob, ["acme", "globex", "initech"])
    again = capsys.readouterr().out.splitlines()
    assert [line.split(",")[0] for line in again[:3]] == [
        "unchanged audit-acme", "unchanged audit-globex", "created   audit-initech"]
    assert again[3:] == ["  | auditing acme"]


def test_docs_sdk_shows_the_example_verbatim() -> None:
    code = EXAMPLE.read_text()
    body = code[code.index("from __future__"):]
    assert body in DOCS.read_text(), "docs/sdk.md must show tests/client/weekly_audit.py from its imports on"
