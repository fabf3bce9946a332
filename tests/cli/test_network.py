"""`kjob create --network none|egress|host`: the sandbox's network on the command line, checked
as the API and job files check it (the error names `sandbox.network`), and shown by `kjob
inspect`. Before, `create` had no `--network` and `inspect` did not say the network, which is
`none` by default: a job that fetched a URL failed with a bare connection error.
(The hint a failed run then gets: the probe example of docs/cli.md, run by tests/docs.)"""

from __future__ import annotations

import json

import httpx
import pytest

from kjob.model.hints import network_hint
from tests.cli.conftest import Run, one_line_error
from tests.support.gateway import GatewayServer

CREATE = ["create", "--slug", "probe", "--prompt", "curl -fsS https://example.com", "--agent", "shell",
          "--schedule", "@hourly"]


def test_network_is_set_by_create_and_shown_by_inspect(kjob: Run) -> None:
    assert kjob(*CREATE, "--network", "egress").exit_code == 0
    assert kjob(*CREATE[:2], "plain", *CREATE[3:]).exit_code == 0
    shown = kjob("inspect", "probe").stdout
    assert any(line.split()[:2] == ["network", "egress"] for line in shown.splitlines()), shown
    assert json.loads(kjob("inspect", "probe", "-o", "json").stdout)["sandbox"]["network"] == "egress"
    plain = kjob("inspect", "plain").stdout
    assert "none (no network: set --network egress to reach the internet)" in plain, plain
    # with a backend too
    assert kjob(*CREATE[:2], "boxed", *CREATE[3:], "--sandbox", "docker:alpine:3", "--network", "none").exit_code == 0
    boxed = json.loads(kjob("inspect", "boxed", "-o", "json").stdout)["sandbox"]
    assert (boxed["backend"], boxed["image"], boxed["network"]) == ("docker", "alpine:3", "none")


@pytest.mark.parametrize("value", ["wifi", "bridge", "", "None"])
def test_a_bad_network_is_refused_like_the_api_refuses_it(kjob: Run, server: GatewayServer, token: str,
                                                          value: str) -> None:
    error = one_line_error(kjob(*CREATE, "--network", value), "sandbox.network")
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}) as api:
        body = {"slug": "probe", "prompt": "p", "agent": "shell", "schedule": "@hourly", "sandbox": {"network": value}}
        answer = api.post("/v1/jobs", json=body)
    assert answer.status_code == 422 and answer.json()["error"]["field"] == "sandbox.network"
    assert error == f"error: sandbox.network: {answer.json()['error']['message']}"
    assert json.loads(kjob("list", "-o", "json").stdout) == []


def test_host_needs_the_operators_leave(kjob: Run) -> None:
    error = one_line_error(kjob(*CREATE, "--network", "host"), "sandbox.network")
    assert "executor.host_network_tenants" in error


@pytest.mark.parametrize(("network", "output", "hinted"), [
    ("none", "OSError: [Errno 101] Network is unreachable", True),
    ("none", "curl: (6) Could not resolve host: example.com", True),
    ("none", "wget: bad address 'example.com'", True),
    ("none", "Traceback: KeyError: 'x'", False),  # another failure: no hint
    ("egress", "curl: (6) Could not resolve host: example.com", False),  # it had a network
])
def test_the_hint_names_the_setting_only_when_the_network_is_the_cause(network: str, output: str,
                                                                       hinted: bool) -> None:
    hint = network_hint(network, [None, output])
    assert (hint is not None) == hinted
    if hinted:
        assert "sandbox.network = none" in hint and "--network egress" in hint
