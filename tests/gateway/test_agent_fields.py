"""The agent fields of a job (limits, workspace, output.notify/quiet) at the API: a bad value is
a 422 naming the field and stores nothing; good values round-trip."""

from __future__ import annotations

import httpx
import pytest

from tests.support.gateway import assert_error, job_body

BAD = [
    ("negative cost", {"limits": {"max_cost_usd": -1}}, "limits.max_cost_usd"),
    ("zero cost", {"limits": {"max_cost_usd": 0}}, "limits.max_cost_usd"),
    ("zero turns", {"limits": {"max_turns": 0}}, "limits.max_turns"),
    ("turns as text", {"limits": {"max_turns": "many"}}, "limits.max_turns"),
    ("unknown limit", {"limits": {"max_tokens": 5}}, "limits.max_tokens"),
    ("relative workspace", {"workspace": {"git": "repo"}}, "workspace.git"),
    ("workspace with spaces", {"workspace": {"git": "https://x.example/a b"}}, "workspace.git"),
    ("ref as an option", {"workspace": {"git": "https://x.example/r.git", "ref": "--upload-pack=x"}}, "workspace.ref"),
    ("ref with ..", {"workspace": {"git": "https://x.example/r.git", "ref": "a..b"}}, "workspace.ref"),
    ("workspace without git", {"workspace": {"ref": "main"}}, "workspace.git"),
    ("unknown notify", {"output": {"channel": "none", "notify": "sometimes"}}, "output.notify"),
    ("quiet too long", {"output": {"channel": "none", "quiet": "x" * 201}}, "output.quiet"),
]


@pytest.mark.parametrize("name,change,field", BAD, ids=[b[0] for b in BAD])
async def test_bad_agent_fields_are_refused_naming_the_field(api: httpx.AsyncClient, name, change, field) -> None:
    assert_error(await api.post("/v1/jobs", json=job_body(**change)), 422, field)
    assert (await api.get("/v1/jobs")).json() == []


async def test_agent_fields_round_trip(api: httpx.AsyncClient) -> None:
    body = job_body(limits={"max_cost_usd": 0.5, "max_turns": 20},
                    workspace={"git": "git@github.example:team/app.git", "ref": "release/1.2"},
                    output={"channel": "none", "notify": "on_change", "quiet": "HEARTBEAT_OK"})
    created = (await api.post("/v1/jobs", json=body)).json()
    got = (await api.get(f"/v1/jobs/{created['slug']}")).json()
    assert got["limits"] == {"max_cost_usd": 0.5, "max_turns": 20}
    assert got["workspace"] == {"git": "git@github.example:team/app.git", "ref": "release/1.2"}
    assert got["output"] == {"channel": "none", "notify": "on_change", "quiet": "HEARTBEAT_OK"}
