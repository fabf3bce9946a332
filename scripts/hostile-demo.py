#!/usr/bin/env python3
"""Run the sandbox attacks of issue 10 against a running node and print what each got.

    scripts/hostile-demo.py $KJOB_HOME      # a `kjob up` home: its api.url and admin.token

As a tenant `beta` editor (a token made with the admin token), it submits one `shell` job
per attack (process backend), runs it now and prints one line per attack: what the attacker
got. Run as root on a node that has Docker, like `kjob up` in CI. For the automated version,
with assertions and the docker backend: tests/security/hostile/.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import httpx

PY = "/usr/bin/python3"


def main(home: Path) -> None:
    url = (home / "api.url").read_text().strip()
    admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {(home / 'admin.token').read_text().strip()}"})
    made = admin.post("/v1/tokens", json={"role": "editor", "tenant": "beta", "name": "hostile demo"})
    made.raise_for_status()
    beta = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {made.json()['secret']}"}, timeout=30)
    token = (home / "admin.token").read_text().strip()

    def run(prompt: str, sandbox: dict | None = None, timeout: str = "20s") -> str:
        slug = f"demo-{secrets.token_hex(4)}"
        body = {"slug": slug, "prompt": prompt, "agent": "shell", "schedule": "0 0 1 1 *", "timeout": timeout,
                "output": {"channel": "none"}, "sandbox": sandbox or {}}
        created = beta.post("/v1/jobs", json=body)
        if created.status_code != 201:
            return f"refused at create: {created.status_code} {created.json().get('error')}"
        run_id = beta.post(f"/v1/jobs/{slug}/run").json()["id"]
        while (state := beta.get(f"/v1/runs/{run_id}").json())["status"] in ("pending", "queued", "running",
                                                                               "scheduled", "claimed"):
            time.sleep(0.2)
        return f"[{state['status']}] " + beta.get(f"/v1/runs/{run_id}/logs").text.strip().replace("\n", " | ")[:300]

    def report(name: str, got: str, leaked: bool) -> None:
        print(f"{'LEAK ' if leaked else 'ok   '} {name}: {got}")

    # 1. LD_PRELOAD for the host-side launcher.
    evil = Path(tempfile.mkdtemp(prefix="kjob-evil-"))
    evil.chmod(0o755)
    (evil / "marks").mkdir(mode=0o777)
    (evil / "marks").chmod(0o777)
    (evil / "evil.c").write_text(textwrap.dedent(f"""
        #include <stdio.h>
        #include <unistd.h>
        __attribute__((constructor)) static void init(void) {{
            char exe[256] = {{0}}, path[512]; readlink("/proc/self/exe", exe, 255);
            snprintf(path, 512, "{evil}/marks/%d", (int)getpid());
            FILE *f = fopen(path, "w"); if (f) {{ fprintf(f, "uid=%d %s", (int)getuid(), exe); fclose(f); }}
        }}
    """))
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(evil / "evil.so"), str(evil / "evil.c")], check=True)
    got = run("echo ran", {"env": {"LD_PRELOAD": str(evil / "evil.so")}})
    marks = [p.read_text() for p in (evil / "marks").iterdir()]
    report("LD_PRELOAD in sandbox.env", f"{got}; host-side marks: {marks}", bool(marks))

    # 2. The Docker socket (and every unix socket under /run, /var/run, /tmp).
    probe = (f"{PY} -c \"import socket,glob,os,stat; [print('CONNECTED', p) for p in glob.glob('/run/**', recursive=True)"
             "+glob.glob('/var/run/*')+glob.glob('/tmp/**', recursive=True) if os.path.exists(p) and "
             "stat.S_ISSOCK(os.stat(p).st_mode) and socket.socket(socket.AF_UNIX).connect_ex(p) == 0]\"; echo probed")
    got = run(probe)
    report("host unix sockets (docker.sock)", got, "CONNECTED" in got)

    # 3. The kjob home and the executor's environment.
    got = run(f"cat {home}/admin.token {home}/secret.key; env | grep -i kjob_; echo done")
    report("$KJOB_HOME (admin token)", got, token in got)

    # 4. NATS and PostgreSQL of the node with network = "host".
    ports = (home / "nats.port").read_text().strip() if (home / "nats.port").exists() else "4222"
    got = run(f"{PY} -c \"import socket; socket.create_connection(('127.0.0.1', {ports}), 2); print('CONNECTED nats')\"",
              {"network": "host"})
    report("NATS over host network", got, "CONNECTED" in got)

    # 5. A disk filler through the work dir (more than the default executor.sandbox_disk, 512m).
    got = run("dd if=/dev/zero of=fill bs=1M count=700 2>&1 | grep -i -e space -e copied; df -h . | tail -1")
    report("disk filler (700 MB)", got, "No space left" not in got)

    # 6. An env key no process can get.
    got = run("echo x", {"env": {"A=B": "x"}})
    report("env key 'A=B'", got, not got.startswith("refused"))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("KJOB_HOME", "")))
