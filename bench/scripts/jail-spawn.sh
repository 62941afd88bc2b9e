#!/usr/bin/env bash
# Spawn time with VMM confinement (--vmm-jail on, the default) and without
# (--vmm-jail off), measured in one run on this host: for each mode a fresh
# daemon bakes a `minimal` snapshot, then forks one child and deletes it
# ROUNDS times (default 15). Prints min / median / max of the daemon's own
# spawn_ms (VMM start, state load, identity, answering) and their ratio.
#
#   bench/scripts/jail-spawn.sh [ROUNDS]
#
# Needs root, the built forkd-server ($FORKD_SERVER_BIN, else
# $CARGO_TARGET_DIR/debug or target/debug) and the guest assets.
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-15}
bin=${FORKD_SERVER_BIN:-${CARGO_TARGET_DIR:-target}/debug/forkd-server}
guest=${FORKD_GUEST_DIR:-/var/lib/forkd/guest}
port=18931
out=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$out"' EXIT

api() { curl -sf -H 'content-type: application/json' "$@"; }

run_mode() {
  local mode=$1 data="$out/data-$1"
  mkdir -p "$data"
  "$bin" --bind 127.0.0.1:$port --data-dir "$data" --guest-dir "$guest" --vmm-jail "$mode" --log warn \
    > "$out/$mode.log" 2>&1 &
  local pid=$!
  for _ in $(seq 100); do api "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
  api -XPOST "http://127.0.0.1:$port/v1/snapshots" -d '{"tag":"b","image":"minimal"}' >/dev/null
  for _ in $(seq 600); do
    s=$(api "http://127.0.0.1:$port/v1/snapshots/b/info" | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"])')
    [ "$s" = ready ] && break
    [ "$s" = failed ] && { echo "bake failed ($mode)" >&2; exit 1; }
    sleep 0.5
  done
  for _ in $(seq "$rounds"); do
    api -XPOST "http://127.0.0.1:$port/v1/sandboxes" -d '{"snapshot_tag":"b","n":1}' \
      | python3 -c 'import json,sys; s=json.load(sys.stdin)[0]; print(s["id"], s["spawn_ms"])' > "$out/one"
    read -r id ms < "$out/one"
    echo "$ms" >> "$out/$mode.ms"
    api -XPOST "http://127.0.0.1:$port/v1/sandboxes/delete" -d "{\"ids\":[\"$id\"]}" >/dev/null
  done
  kill "$pid"; wait "$pid" 2>/dev/null || true
}

run_mode on
run_mode off
python3 - "$out/on.ms" "$out/off.ms" "$rounds" <<'PY'
import statistics, sys
on = [float(x) for x in open(sys.argv[1])]
off = [float(x) for x in open(sys.argv[2])]
print(f"\nspawn(1) of a minimal child, {sys.argv[3]} rounds each (ms)\n")
print("| VMM confinement | min | median | max |")
print("|---|---|---|---|")
for name, v in (("jail on", on), ("jail off", off)):
    print(f"| {name} | {min(v):.1f} | {statistics.median(v):.1f} | {max(v):.1f} |")
print(f"\nratio of medians (on / off): {statistics.median(on) / statistics.median(off):.2f} (target ≤ 1.10)")
PY
