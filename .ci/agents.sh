#!/usr/bin/env bash
# Install the real agent CLIs the agent tests run (tests/agents/), pinned, into .ci/agents/
# (ignored by git). Idempotent and cached: a second run with the same pins does nothing, so CI
# pays the download (~650 MB, about a minute) once per machine. Prints the bin directory.
set -euo pipefail
cd "$(dirname "$0")"
PINS=("@anthropic-ai/claude-code@2.1.332" "@openai/codex@0.171.0")
DIR="${KJOB_AGENTS_DIR:-$PWD/agents}"
STAMP="$DIR/.pins"
want="${PINS[*]}"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$DIR/node_modules/.bin/claude" ] \
    && [ -x "$DIR/node_modules/.bin/codex" ]; then
    echo "agents.sh: agent CLIs already installed in $DIR ($want)" >&2
    echo "$DIR/node_modules/.bin"
    exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
    echo "agents.sh: installing nodejs and npm" >&2
    sudo_() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
    sudo_ env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
fi
mkdir -p "$DIR"
[ -f "$DIR/package.json" ] || echo '{"name": "kjob-ci-agents", "private": true}' >"$DIR/package.json"
echo "agents.sh: npm install $want into $DIR" >&2
npm install --prefix "$DIR" --no-audit --no-fund --loglevel=error --save-exact "${PINS[@]}" >&2
echo "$want" >"$STAMP"
echo "$DIR/node_modules/.bin"
