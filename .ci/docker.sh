#!/usr/bin/env bash
# Install and start what the sandbox tests need on a fresh Debian machine:
# a Docker engine, bubblewrap (process isolation), busybox-static (the test image's rootfs),
# Chromium (the dashboard's browser test drives Debian's build through Playwright), passt
# (pasta: the process sandbox's egress network), iproute2 and iptables (egress rules),
# gcc (the hostile-job tests build a preload library) and dbus (tests/dbus start their own
# dbus-daemon).
# Idempotent: installs only what is missing and starts dockerd only when no engine answers.
set -euo pipefail

DEADLINE_S="${KJOB_DOCKER_DEADLINE_S:-60}"
LOG="${KJOB_DOCKERD_LOG:-/var/log/kjob-dockerd.log}"

sudo_() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
command -v bwrap >/dev/null 2>&1 || missing+=(bubblewrap)
[ -x /bin/busybox ] || missing+=(busybox-static)
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v pasta >/dev/null 2>&1 || missing+=(passt)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v iptables >/dev/null 2>&1 || missing+=(iptables)
command -v setpriv >/dev/null 2>&1 || missing+=(util-linux)
command -v gcc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
command -v dbus-daemon >/dev/null 2>&1 || missing+=(dbus)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "docker.sh: installing ${missing[*]}"
    sudo_ env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if docker info >/dev/null 2>&1; then
    echo "docker.sh: engine already answering"
    exit 0
fi

# No systemd in containers/CI sandboxes: run dockerd directly, detached from this shell,
# unless one is already starting up.
if pgrep -x dockerd >/dev/null 2>&1; then
    echo "docker.sh: dockerd is running but not answering yet; waiting"
else
    echo "docker.sh: starting dockerd (log: $LOG)"
    sudo_ sh -c "nohup dockerd >'$LOG' 2>&1 &"
fi

end=$(( $(date +%s) + DEADLINE_S ))
until docker info >/dev/null 2>&1; do
    if [ "$(date +%s)" -ge "$end" ]; then
        echo "docker.sh: dockerd did not answer within ${DEADLINE_S}s; last log lines:" >&2
        tail -n 30 "$LOG" >&2 || true
        exit 1
    fi
    sleep 0.2
done
echo "docker.sh: engine ready ($(docker info --format '{{.ServerVersion}} {{.Driver}}'))"
