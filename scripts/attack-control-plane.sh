#!/bin/sh
# Issue 10's control-plane attacks (3-7) against a real `kjob up`, from the host, printing what
# each one got. Run it on a checkout from before the fix and on this one to compare:
#
#   scripts/attack-control-plane.sh [SRC_DIR]     # SRC_DIR: the kjob source tree to run (default: this one)
#
# It uses this checkout's .venv (PYTHON=... to override), a fresh KJOB_HOME under /tmp, and stops kjob after.
set -eu
HERE=$(cd "$(dirname "$0")/.." && pwd)
SRC=$(cd "${1:-$HERE}" && pwd)
PY=${PYTHON:-$HERE/.venv/bin/python}
H=$(mktemp -d /tmp/kjob-attack.XXXXXX)
cd "$SRC"
PYTHONPATH="$SRC" KJOB_HOME="$H" KJOB_EXECUTOR__SANDBOXES='["process"]' \
  "$PY" -c 'from kjob.cli.main import main; main()' up --port 0 > "$H.log" 2>&1 &
PID=$!
trap 'kill -TERM $PID 2>/dev/null; wait $PID 2>/dev/null || true' EXIT
i=0; while [ ! -s "$H/api.url" ]; do i=$((i+1)); [ $i -lt 240 ] || { cat "$H.log"; exit 1; }; sleep 0.5; done
API=$(cat "$H/api.url"); T=$(cat "$H/admin.token")

echo "== 3: embedded NATS and PostgreSQL, without credentials"
"$PY" - "$H" <<'PYEOF'
import asyncio, sys
from pathlib import Path
import asyncpg, nats

async def quiet(err: Exception) -> None:
    pass

async def main(home: Path) -> None:
    nats_port = int((home / "nats.port").read_text())
    pg_port = int((home / "postgres" / "postmaster.pid").read_text().splitlines()[3])
    try:
        nc = await nats.connect(f"nats://127.0.0.1:{nats_port}", allow_reconnect=False,
                                max_reconnect_attempts=0, connect_timeout=2, error_cb=quiet)
        await nc.subscribe("kjob.log.>")
        await nc.flush()
        print("NATS: connected without credentials, subscribed to kjob.log.>   ATTACK WORKS")
        await nc.close()
    except Exception as e:
        print(f"NATS: refused ({e})")
    try:
        conn = await asyncpg.connect(host="127.0.0.1", port=pg_port, user="postgres", database="kjob", timeout=5)
        print(f"PostgreSQL: superuser without password, {await conn.fetchval('SELECT count(*) FROM api_tokens')} "
              "api_tokens rows   ATTACK WORKS")
        await conn.close()
    except Exception as e:
        print(f"PostgreSQL: refused ({type(e).__name__}: {e})")

asyncio.run(main(Path(sys.argv[1])))
PYEOF

call() { printf '%-40s' "$1"; curl -s -o "$H.body" -w '%{http_code}  ' -H "Authorization: Bearer $T" \
  -H 'content-type: application/json' -X "$2" "$API$3" ${4:+--data-binary "$4"}; head -c 100 "$H.body"; echo; }
J='"prompt":"echo hi","agent":"shell","schedule":"0 3 * * *"'
job() { call "$1" POST /v1/jobs "{\"slug\":\"$2\",$J,$3}"; }
echo "== 4: webhooks to the node's own services (want 422)"
job "webhook:http://127.0.0.1:8742/internal" a1 '"output":{"channel":"webhook:http://127.0.0.1:8742/internal"}'
job "webhook:http://localhost:8742/" a2 '"output":{"channel":"webhook:http://localhost:8742/"}'
job "webhook:http://[::ffff:127.0.0.1]/" a3 '"output":{"channel":"webhook:http://[::ffff:127.0.0.1]/"}'
job "webhook:http://2130706433/" a4 '"output":{"channel":"webhook:http://2130706433/"}'
job "webhook:http://169.254.169.254/" a5 '"output":{"channel":"webhook:http://169.254.169.254/"}'
echo "== 5-7: unbounded or unstorable input (want 4xx, never 201 or 500)"
job "catchup.window 99999999d" b1 '"catchup":{"window":"99999999d"}'
call "GET /v1/jobs/a%00b" GET /v1/jobs/a%00b
call "GET /v1/runs/a%00b" GET /v1/runs/a%00b
call "DELETE /v1/tokens/a%00b" DELETE /v1/tokens/a%00b
call "token name with NUL" POST /v1/tokens '{"role":"viewer","name":"a\u0000b"}'
job "sandbox.cpus Infinity" b2 '"sandbox":{"cpus":Infinity}'
job "(a daily job to backfill)" bf '"output":{"channel":"none"}' > /dev/null
call "backfill from 0001-01-01" POST /v1/jobs/bf/backfill '{"from":"0001-01-01T00:00:00Z","to":"2026-01-01T00:00:00Z"}'
job "sandbox.workdir /" b3 '"sandbox":{"backend":"docker","image":"x","workdir":"/"}'
job "sandbox.workdir ../etc" b4 '"sandbox":{"backend":"docker","image":"x","workdir":"../etc"}'
job "sandbox.memory 99999999999999999999G" b5 '"sandbox":{"memory":"99999999999999999999G"}'
