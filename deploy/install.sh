#!/usr/bin/env bash
# Install or upgrade Koder Scheduler on this host (an LXC node such as s.sched-1), as root:
#
#   deploy/install.sh [--source DIR|WHEEL] [--with-nats] [--start] [--no-systemctl]
#
#   --source       what to pip-install: a checkout (default: the one this script is in) or a wheel
#   --with-nats    also install kjob-nats.service, a NATS JetStream node from kjob's venv
#   --start        (re)start the services after installing (default: enable only)
#   --no-systemctl install the unit files but do not call systemctl (images, chroots)
#
# What it does, every step idempotent (an upgrade is the same command):
#   - a system user and group `kjob`, home /var/lib/kjob (state: work dirs, NATS data);
#   - a venv in /opt/koder/scheduler/venv with kjob installed, /usr/local/bin/kjob linked to it;
#   - /etc/koder/scheduler/{kjob.env,config.toml} (and nats.conf, nats.env) from templates,
#     only where missing: an upgrade never overwrites configuration;
#   - the systemd units, enabled.
# docs/deploy.md walks through a two-node pair. Paths can be moved for a dry run with
# KJOB_PREFIX, KJOB_ETC, KJOB_STATE, KJOB_UNITS, KJOB_BIN and the account with KJOB_USER.
set -euo pipefail

PREFIX=${KJOB_PREFIX:-/opt/koder/scheduler}
ETC=${KJOB_ETC:-/etc/koder/scheduler}
STATE=${KJOB_STATE:-/var/lib/kjob}
UNITS=${KJOB_UNITS:-/etc/systemd/system}
BIN=${KJOB_BIN:-/usr/local/bin}
ACCOUNT=${KJOB_USER:-kjob}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SOURCE=$(dirname "$HERE")
WITH_NATS=0
START=0
SYSTEMCTL=1

die() { echo "install.sh: $*" >&2; exit 1; }
say() { echo "==> $*"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --source) [ $# -ge 2 ] || die "--source needs a directory or a wheel"; SOURCE=$2; shift 2 ;;
    --with-nats) WITH_NATS=1; shift ;;
    --start) START=1; shift ;;
    --no-systemctl) SYSTEMCTL=0; shift ;;
    -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

[ "$(id -u)" -eq 0 ] || die "run as root (it creates a user, /opt and /etc entries and systemd units)"
[ -e "$SOURCE" ] || die "--source $SOURCE does not exist"
if [ -d "$SOURCE" ] && [ ! -f "$SOURCE/pyproject.toml" ]; then
  die "$SOURCE has no pyproject.toml; pass --source with a kjob checkout or wheel"
fi
PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
  || die "kjob needs Python >= 3.11 with venv ($PYTHON is $("$PYTHON" -V 2>&1)); apt-get install python3 python3-venv"

say "account $ACCOUNT"
if ! getent passwd "$ACCOUNT" >/dev/null; then
  useradd --system --user-group --home-dir "$STATE" --no-create-home --shell /usr/sbin/nologin "$ACCOUNT"
fi
GROUP=$(id -gn "$ACCOUNT")

say "directories"
install -d -m 0755 "$PREFIX" "$PREFIX/docs"
install -d -m 0750 -o root -g "$GROUP" "$ETC"
install -d -m 0750 -o "$ACCOUNT" -g "$GROUP" "$STATE" "$STATE/nats"

say "venv $PREFIX/venv (kjob from $SOURCE)"
[ -x "$PREFIX/venv/bin/python" ] || "$PYTHON" -m venv "$PREFIX/venv"
"$PREFIX/venv/bin/pip" install --quiet --upgrade pip
"$PREFIX/venv/bin/pip" install --quiet --upgrade "$SOURCE"
install -d -m 0755 "$BIN"
ln -sfn "$PREFIX/venv/bin/kjob" "$BIN/kjob"
for doc in deploy.md observability.md; do
  if [ -f "$SOURCE/docs/$doc" ]; then install -m 0644 "$SOURCE/docs/$doc" "$PREFIX/docs/$doc"; fi
done

# A template is copied only where the file is missing: configuration belongs to the operator.
config() {  # config <template> <target> <mode>
  if [ -e "$2" ]; then
    echo "    kept $2"
  else
    install -m "$3" -o root -g "$GROUP" "$1" "$2"
    echo "    wrote $2 (edit it)"
  fi
}
say "configuration in $ETC"
config "$HERE/systemd/kjob.env" "$ETC/kjob.env" 0640
if [ ! -e "$ETC/config.toml" ]; then
  printf '# kjob settings (see docs/deploy.md); kjob.env beside this file wins over them.\n' > "$ETC/config.toml"
  chown "root:$GROUP" "$ETC/config.toml"
  chmod 0640 "$ETC/config.toml"
  echo "    wrote $ETC/config.toml"
fi

say "systemd units in $UNITS"
install -d -m 0755 "$UNITS"
install -m 0644 "$HERE/systemd/kjob.service" "$UNITS/kjob.service"
services=(kjob.service)
if [ "$WITH_NATS" -eq 1 ]; then
  config "$HERE/systemd/nats.conf" "$ETC/nats.conf" 0640
  if [ ! -e "$ETC/nats.env" ]; then
    printf 'NATS_NAME=%s\n' "$(hostname -s)" > "$ETC/nats.env"
    chown "root:$GROUP" "$ETC/nats.env"
    chmod 0640 "$ETC/nats.env"
    echo "    wrote $ETC/nats.env"
  fi
  install -m 0644 "$HERE/systemd/kjob-nats.service" "$UNITS/kjob-nats.service"
  services=(kjob-nats.service kjob.service)
fi

if [ "$SYSTEMCTL" -eq 1 ]; then
  say "enabling ${services[*]}"
  systemctl daemon-reload
  systemctl enable "${services[@]}"
  if [ "$START" -eq 1 ]; then
    systemctl restart "${services[@]}"
  fi
fi

"$PREFIX/venv/bin/kjob" --help >/dev/null || die "kjob does not run from $PREFIX/venv"
cat <<DONE
Installed kjob in $PREFIX.
Next: edit $ETC/kjob.env (node name, NATS and database URLs, Relay, secret key)$([ "$WITH_NATS" -eq 1 ] && echo " and $ETC/nats.conf"),
then: systemctl restart ${services[*]}; journalctl -u kjob -f
DONE
