#!/usr/bin/env bash
# Installs what the tests need and runs them: a Docker engine, bubblewrap and busybox-static
# (.ci/docker.sh, via apt), then kjob with its test extras into .venv. The tests start their own
# nats-server and PostgreSQL. Extra arguments go to pytest (e.g. `-k ticker`, `-m "not docker"`).
# The suite runs on one worker per core, up to four (pytest-xdist, a file per worker at a time):
# most of its time is spent waiting out leases and faults, not computing. KJOB_TEST_WORKERS=0
# runs it in one process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/docker.sh
bash .ci/agents.sh >/dev/null  # the real agent CLIs for tests/agents (pinned, cached in .ci/agents/)
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test]'
cores=$(nproc)
exec .venv/bin/pytest -n "${KJOB_TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}" --dist loadfile "$@"
