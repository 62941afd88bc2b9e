#!/usr/bin/env bash
# forkd's main job, from a fresh Debian 12 machine: install what the host
# needs, build forkd and its guest, start the daemon, bake a warmed python
# snapshot, and fork 10 copy-on-write children that each say who they are.
#
# Leaves the daemon and the snapshot running (stop with: kill $(cat /run/forkd-server.pid));
# the 10 children are killed at the end unless --keep is given.
set -euo pipefail
cd "$(dirname "$0")/.."
keep=0
[ "${1:-}" = "--keep" ] && keep=1

if [ "$(id -u)" -ne 0 ]; then
  echo "quickstart.sh: run as root (sudo scripts/quickstart.sh)" >&2
  exit 1
fi
step() { printf '\n==> %s\n' "$*"; }

step "host setup"
scripts/setup-host.sh

step "build (release)"
cargo build --release --workspace --locked
target_dir="${CARGO_TARGET_DIR:-target}"
bin="$target_dir/release"

step "guest kernel, initramfs and images"
scripts/build-guest.sh

export FORKD_URL="${FORKD_URL:-http://127.0.0.1:8889}"
if curl -fsS "$FORKD_URL/healthz" >/dev/null 2>&1; then
  step "daemon already running at $FORKD_URL"
else
  step "starting forkd-server (log: /var/log/forkd-server.log)"
  nohup "$bin/forkd-server" --data-dir /var/lib/forkd >/var/log/forkd-server.log 2>&1 &
  echo $! > /run/forkd-server.pid
  for _ in $(seq 1 100); do
    curl -fsS "$FORKD_URL/healthz" >/dev/null 2>&1 && break
    sleep 0.1
  done
  curl -fsS "$FORKD_URL/healthz" >/dev/null
fi
"$bin/forkd" version
# The daemon wrote its token to /var/lib/forkd/token (mode 0600) on its first
# start; the CLI reads it from there because the URL is loopback. Other
# clients: FORKD_TOKEN=$(cat /var/lib/forkd/token).
echo "token: /var/lib/forkd/token ($(stat -c %a /var/lib/forkd/token 2>/dev/null || echo 'missing: --no-auth?'))"

if "$bin/forkd" snapshot-info python >/dev/null 2>&1; then
  step "snapshot 'python' already exists"
else
  step "baking a warmed python snapshot (numpy imported before the snapshot)"
  "$bin/forkd" snapshot --tag python --image python
fi

step "forking 10 children"
start=$(date +%s%N)
ids=$("$bin/forkd" fork --tag python -n 10 --quiet)
echo "forked 10 in $(( ($(date +%s%N) - start) / 1000000 )) ms"

step "each child speaks"
for id in $ids; do
  "$bin/forkd" exec "$id" -- python3 -c 'import socket, uuid, random; print(socket.gethostname(), uuid.uuid4(), round(random.random(), 6))'
done
"$bin/forkd" eval "$(echo "$ids" | head -1)" 'numpy.arange(10).sum()'

if [ "$keep" = 0 ]; then
  step "killing the children"
  "$bin/forkd" kill --tag python
fi
printf '\nDone. Try: %s/forkd ls, %s/forkd fork --tag python -n 3\n' "$bin" "$bin"
