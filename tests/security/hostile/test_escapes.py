"""Hostile jobs of tenant beta that try to leave their sandbox: loader variables for the
host-side launcher, host sockets, the kjob home, acme's work dir, the executor's environment,
symlinks out of the work dir. Each must fail, and nothing of acme or of the node may leak."""

from __future__ import annotations

import os
import shlex
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.security.hostile.conftest import PY, Acme, Leaks, Node, Tenant

#: The loader variables a job could use to run code in a host-side program.
LOADER_VARS = ("LD_PRELOAD", "LD_LIBRARY_PATH", "LD_AUDIT", "GCONV_PATH", "LD_DEBUG_OUTPUT", "LD_PROFILE",
               "MALLOC_TRACE", "GLIBC_TUNABLES")


@pytest.fixture(scope="module")
def evil_library(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A shared library whose constructor (and LD_AUDIT hook) writes a marker file named after
    the program it was loaded into, and reads the admin token if it can: (library, marker dir)."""
    base = tmp_path_factory.mktemp("evil")
    base.chmod(0o755)
    marks = base / "marks"
    marks.mkdir(mode=0o777)
    marks.chmod(0o777)  # whatever uid the library runs as may write there
    source = base / "evil.c"
    source.write_text(textwrap.dedent(f"""
        #include <stdio.h>
        #include <stdlib.h>
        #include <string.h>
        #include <unistd.h>
        static void mark(const char *how) {{
            char exe[512] = {{0}}, path[1024];
            readlink("/proc/self/exe", exe, sizeof exe - 1);
            const char *name = strrchr(exe, '/');
            snprintf(path, sizeof path, "{marks}/%s-%s-%d", how, name ? name + 1 : "unknown", (int)getpid());
            FILE *f = fopen(path, "w");
            if (f) {{ fprintf(f, "uid=%d exe=%s\\n", (int)getuid(), exe); fclose(f); }}
        }}
        __attribute__((constructor)) static void init(void) {{ mark("ctor"); }}
        unsigned int la_version(unsigned int v) {{ mark("audit"); return v; }}
    """))
    library = base / "evil.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(library), str(source)], check=True, capture_output=True)
    library.chmod(0o755)
    return library, marks


def test_loader_variables_never_reach_a_host_side_program(
    beta: Tenant, leaks: Leaks, evil_library: tuple[Path, Path]
) -> None:
    library, marks = evil_library
    # The library works: loaded into a host program it leaves its mark (so an absent mark means something).
    subprocess.run(["/bin/true"], env={"LD_PRELOAD": str(library), "PATH": "/usr/bin:/bin"}, check=True)
    assert any(m.name.startswith("ctor-true-") for m in marks.iterdir())
    for m in marks.iterdir():
        m.unlink()
    env = {var: str(library) for var in LOADER_VARS if var not in ("LD_LIBRARY_PATH", "GCONV_PATH", "GLIBC_TUNABLES")}
    env.update(LD_LIBRARY_PATH=str(library.parent), GCONV_PATH=str(library.parent),
               GLIBC_TUNABLES="glibc.malloc.check=3")

    attack = beta.run("echo ran; echo pid1: $(tr '\\0' ' ' < /proc/1/environ)", sandbox={"env": env})

    assert attack.run["status"] == "succeeded", attack
    assert "ran" in attack.lines()
    assert sorted(m.name for m in marks.iterdir()) == []  # not prlimit, setpriv, pasta, bwrap nor the agent
    # bwrap (pid 1 in the sandbox) ran with the launcher's fixed environment, not the job's
    assert "pid1: PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C" in attack.lines(), attack.output
    leaks.assert_none_in(attack.output)


def test_loader_variables_in_the_egress_launcher_too(
    beta: Tenant, leaks: Leaks, evil_library: tuple[Path, Path]
) -> None:
    library, marks = evil_library
    attack = beta.run("echo ran", sandbox={"network": "egress", "env": {"LD_PRELOAD": str(library),
                                                                         "LD_AUDIT": str(library)}})

    assert "ran" in attack.lines(), attack
    assert [m.name for m in marks.iterdir()] == []  # pasta and the shell that sets its routes included
    leaks.assert_none_in(attack.output)


def host_sockets() -> list[str]:
    """Every unix socket path on this host (from /proc/net/unix), and those under /run,
    /var/run, /tmp found by walking them: the engine's socket, the node's PostgreSQL..."""
    found = {cols[7] for cols in (line.split() for line in Path("/proc/net/unix").read_text().splitlines()[1:])
             if len(cols) >= 8 and cols[7].startswith("/")}
    for top in ("/run", "/var/run", "/tmp"):
        for root, _, files in os.walk(top):
            for name in files:
                path = os.path.join(root, name)
                try:
                    if os.path.exists(path) and os.stat(path).st_mode & 0o170000 == 0o140000:
                        found.add(path)
                except OSError:
                    continue
    found.add("/var/run/docker.sock")
    return sorted(found)


def abstract_sockets() -> list[str]:
    """Abstract unix socket names on the host (containerd's shims, dbus, ...): a shared network
    namespace would reach them, whatever the filesystem shows."""
    names = {cols[7][1:] for cols in (line.split() for line in Path("/proc/net/unix").read_text().splitlines()[1:])
             if len(cols) >= 8 and cols[7].startswith("@")}
    return sorted(names)[:20]


def connect_unix_script(paths: list[str], abstract: list[str]) -> str:
    program = textwrap.dedent(f"""
        import socket
        for name, addr in [(p, p) for p in {paths!r}] + [("@" + a, "\\0" + a) for a in {abstract!r}]:
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(addr)
                print("CONNECTED", name)
            except OSError as e:
                print("refused", name, type(e).__name__)
    """)
    return f"{PY} -c {shlex.quote(program)}"


@pytest.mark.parametrize("network", ["none", "egress"])
def test_no_host_socket_is_reachable(beta: Tenant, leaks: Leaks, node: Node, network: str) -> None:
    paths, abstract = host_sockets(), abstract_sockets()
    assert "/var/run/docker.sock" in paths and os.path.exists("/var/run/docker.sock")
    paths += node.listeners()[1]  # the node's own (its PostgreSQL listens on TCP only: test_network)

    attack = beta.run(f"ls -la /run /var/run /tmp; {connect_unix_script(paths, abstract)}",
                      sandbox={"network": network})

    assert attack.run["status"] == "succeeded", attack
    assert "CONNECTED" not in attack.output, attack.output
    assert attack.output.count("refused") == len(paths) + len(abstract)
    leaks.assert_none_in(attack.output)


def test_no_engine_socket_in_a_container(beta: Tenant, leaks: Leaks) -> None:
    attack = beta.run("ls -la /run /var/run / 2>&1; cat /proc/mounts; ls /var/run/docker.sock && echo FOUND",
                      sandbox={"backend": "docker", "image": "kjob-test-busybox:latest"})

    assert attack.run["status"] in ("succeeded", "failed"), attack
    assert "FOUND" not in attack.lines()
    assert "docker.sock" not in attack.output.replace("ls: /var/run/docker.sock: No such file or directory", "")
    leaks.assert_none_in(attack.output)


def test_the_kjob_home_and_acme_work_dir_are_out_of_reach(
    beta: Tenant, leaks: Leaks, node: Node, acme: Acme, backend: dict[str, Any]
) -> None:
    home, work = node.home, acme.live_workdir
    script = (f"ls -la {home} {home}/work {work}; cat {home}/admin.token {home}/secret.key {work}/key; "
              f"cat {home}/*/* 2>&1 | head -c 2000; ls -la $HOME/.. $HOME/../..; cat $HOME/../*/key; "
              f"find /etc /opt /tmp $HOME/.. -name admin.token -o -name secret.key -o -name key 2>/dev/null; echo end")

    attack = beta.run(script, sandbox=backend)

    assert "end" in attack.lines(), attack
    assert attack.output.count("No such file") >= 3  # the home and acme's work dir are not there at all
    leaks.assert_none_in(attack.output)


def test_the_executor_environment_is_out_of_reach(
    beta: Tenant, leaks: Leaks, node: Node, backend: dict[str, Any]
) -> None:
    pid = node.proc.pid
    script = (f"cat /proc/{pid}/environ /proc/{pid}/cmdline; for p in /proc/[0-9]*; do echo $p; "
              "cat $p/environ $p/cmdline 2>&1 | tr '\\0' ' '; echo; done; env; echo end")

    attack = beta.run(script, sandbox=backend)

    assert "end" in attack.lines(), attack
    leaks.assert_none_in(attack.output)  # the canary of kjob up's environment above all


def test_symlinks_out_of_the_work_dir_lead_nowhere(
    beta: Tenant, leaks: Leaks, node: Node, acme: Acme, backend: dict[str, Any]
) -> None:
    home = node.home
    script = (f"ln -s / root; ln -s {home}/admin.token tok; ln -s {acme.live_workdir}/key acme; ln -s /proc/1/root r1; "
              "cat tok acme; ls root/ r1/; cat r1/etc/shadow root/etc/shadow; "
              f"ls r1{home} root{home}; cat r1{home}/admin.token; echo end")

    attack = beta.run(script, sandbox=backend)

    assert "end" in attack.lines(), attack
    leaks.assert_none_in(attack.output)
    assert "root:" not in attack.output  # /etc/shadow stays unreadable


@pytest.mark.parametrize("env", [{"A=B": "x"}, {"": "x"}, {"A\x00B": "x"}, {"OK": "nul\x00inside"}, {"1ABC": "x"}],
                         ids=["equals", "empty", "nul-key", "nul-value", "digit-first"])
def test_env_that_no_process_could_get_is_refused_when_written(beta: Tenant, env: dict[str, str]) -> None:
    created = beta.create(f"h-env-{os.urandom(3).hex()}", "echo x", sandbox={"env": env})

    assert created.status_code == 422, created.text
    assert created.json()["error"]["field"].startswith("sandbox.env")
