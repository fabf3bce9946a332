"""The network of a hostile job: with `none` nothing, with `egress` the outside but never the
node's own API, NATS or PostgreSQL (on loopback or any address of the host), and `host`
only for tenants the operator lists: beta is not one of them.

"The outside" is a network namespace behind a veth pair in 198.51.100.0/30 (conftest
`outside`): a host that is not this one, at an address in no private range. What this
proves: egress traffic leaves through the host to a non-private address and arrives; what
it does not: a route over a real internet uplink (CI has none)."""

from __future__ import annotations

import secrets
import shlex
import textwrap
from typing import Any

import pytest

from kjob.executor.sandbox.process import host_addresses
from tests.security.hostile.conftest import DOCKER, PY, Leaks, Node, Outside, Tenant


def targets(node: Node) -> list[tuple[str, int]]:
    """The node's listening ports (API, NATS, its cluster and monitor ports, PostgreSQL), at
    loopback and at every address of this host."""
    ports = sorted({port for _, port in node.listeners()[0]})
    assert len(ports) >= 3, f"expected the API, NATS and PostgreSQL to listen: {node.listeners()}"
    return [(ip, port) for ip in ["127.0.0.1", *host_addresses()] for port in ports]


def python_probe(hosts: list[tuple[str, int]], outside: Outside, tag: str) -> str:
    program = textwrap.dedent(f"""
        import socket
        for host, port in {hosts!r}:
            try:
                socket.create_connection((host, port), 2).close()
                print("CONNECTED", host, port)
            except OSError as e:
                print("refused", host, port, type(e).__name__)
        try:
            c = socket.create_connection(({outside.address!r}, {outside.port}), 3)
            c.sendall(b"{tag}")
            c.close()
            print("outside reached")
        except OSError as e:
            print("outside unreachable", type(e).__name__)
    """)
    return f"{PY} -c {shlex.quote(program)}"


def busybox_probe(hosts: list[tuple[str, int]], outside: Outside, tag: str) -> str:
    # In parallel: a dropped SYN costs the whole -w timeout.
    probes = " ".join(f"(nc -w 2 {h} {p} </dev/null >/dev/null 2>&1 && echo CONNECTED {h} {p} || echo refused {h} {p}) &"
                      for h, p in hosts)
    reach = (f"(echo {tag} | nc -w 3 {outside.address} {outside.port} && echo outside reached "
             "|| echo outside unreachable) &")
    return f"{probes} {reach} wait"


@pytest.mark.parametrize("network", ["none", "egress"])
def test_the_node_is_out_of_reach_and_only_egress_reaches_outside(
    beta: Tenant, leaks: Leaks, node: Node, outside: Outside, backend: dict[str, Any], network: str
) -> None:
    hosts = targets(node)
    tag = f"hello-{secrets.token_hex(4)}"
    probe = busybox_probe if backend else python_probe

    attack = beta.run(probe(hosts, outside, tag), sandbox={**backend, "network": network})

    assert attack.run["status"] == "succeeded", attack
    assert "CONNECTED" not in attack.output, attack.output
    assert attack.output.count("refused") == len(hosts), attack.output
    received = outside.received.read_text() if outside.received.exists() else ""
    if network == "egress":
        assert "outside reached" in attack.lines() and tag in received, attack.output
    else:
        assert "outside unreachable" in attack.output and tag not in received
    leaks.assert_none_in(attack.output)


@pytest.mark.parametrize("sandbox", [{}, DOCKER], ids=["process", "docker"])
def test_host_network_is_refused_to_a_tenant_the_operator_did_not_list(beta: Tenant, sandbox: dict[str, Any]) -> None:
    created = beta.create(f"h-host-{secrets.token_hex(3)}", "echo x", sandbox={**sandbox, "network": "host"})

    assert created.status_code == 422, created.text
    error = created.json()["error"]
    assert error["field"] == "sandbox.network" and "executor.host_network_tenants" in error["message"]

    slug = f"h-later-{secrets.token_hex(3)}"
    assert beta.create(slug, "echo x", sandbox=sandbox).status_code == 201
    changed = beta.client.patch(f"/v1/jobs/{slug}", json={"sandbox": {"network": "host"}})
    assert changed.status_code == 422 and changed.json()["error"]["field"] == "sandbox.network", changed.text
    assert beta.client.get(f"/v1/jobs/{slug}").json()["sandbox"]["network"] == "none"  # nothing changed


def test_a_named_docker_network_is_not_a_job_decision(beta: Tenant) -> None:
    created = beta.create(f"h-bridge-{secrets.token_hex(3)}", "echo x", sandbox={**DOCKER, "network": "bridge"})

    assert created.status_code == 422 and created.json()["error"]["field"] == "sandbox.network", created.text
