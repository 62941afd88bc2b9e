#!/usr/bin/env bash
# Snapshot transfer throughput: how fast forkd moves a snapshot between hosts,
# next to a plain `tar | zstd -3 -T1` of the same files.
#
# One run starts an S3 stand-in (moto_server) and two daemons, A and B, that
# share it as their --remote. For each guest memory size (default 256 and
# 1024 MiB) A boots a `minimal` snapshot, forks a child, fills ~60% of the
# guest's RAM (/dev/shm, half random bytes, half repetitive text) and branches
# the child into a flat ("full") snapshot. Then it measures, RUNS times each
# (default 3), reporting the median wall time:
#
#   pack/unpack   forkd pack --flat on A and forkd unpack on B, against
#                 tar -cf - mem state | zstd -3 -T1 and zstd -dc | tar -xf -
#   push/pull     forkd push on A (first upload, then a re-push that should
#                 upload nothing) and forkd pull on B, through the remote
#   remote fork   on B, fork + first exec of a tag only the remote has
#                 (pulled by the fork itself), next to a tag B already has
#
# MiB/s is the snapshot's logical size (mem + state files) over wall time.
# The page cache stays warm between runs, and moto keeps objects in memory,
# so push/pull is bounded by the daemons and moto, not by a network.
#
#   MOTO=/path/to/moto_server bench/scripts/transfer.sh
#
# Time a release build (the debug build the tests use compresses and hashes
# at a fraction of the speed):
#
#   cargo build --release -p forkd-server -p forkd
#   FORKD_SERVER_BIN=target/release/forkd-server FORKD_BIN=target/release/forkd \
#     bench/scripts/transfer.sh
#
# Environment: MOTO (moto_server; default /var/cache/forkd/s3-venv/bin/moto_server),
# FORKD_SERVER_BIN and FORKD_BIN (default $CARGO_TARGET_DIR/debug or
# target/debug), FORKD_GUEST_DIR (default /var/lib/forkd/guest), SIZES
# (guest MiB, default "256 1024"), RUNS (default 3).
# Needs root, the built daemon and CLI, the guest assets, curl, zstd, tar and
# python3. Everything lives in a temporary directory removed on exit.
set -euo pipefail
cd "$(dirname "$0")/../.."

target=${CARGO_TARGET_DIR:-target}
server=${FORKD_SERVER_BIN:-$target/debug/forkd-server}
cli=${FORKD_BIN:-$target/debug/forkd}
guest=${FORKD_GUEST_DIR:-/var/lib/forkd/guest}
moto=${MOTO:-/var/cache/forkd/s3-venv/bin/moto_server}
sizes=${SIZES:-256 1024}
runs=${RUNS:-3}

for f in "$server" "$cli" "$moto"; do
  [ -x "$f" ] || { echo "transfer.sh: $f is missing or not executable" >&2; exit 1; }
done
[ -d "$guest" ] || { echo "transfer.sh: guest assets $guest missing" >&2; exit 1; }
for t in curl zstd tar python3; do
  command -v "$t" >/dev/null || { echo "transfer.sh: $t not found" >&2; exit 1; }
done

work=$(mktemp -d "${TMPDIR:-/tmp}/forkd-transfer.XXXXXX")
pids=()
aport= bport= moto_port=

cleanup() {
  local rc=$? p d port
  set +e
  # Sandboxes outlive a stopped daemon, so kill them through each daemon first.
  for d in a b; do
    if [ "$d" = a ]; then port=$aport; else port=$bport; fi
    [ -n "$port" ] && [ -f "$work/$d/token" ] &&
      FORKD_TOKEN_FILE="$work/$d/token" timeout 60 "$cli" --url "http://127.0.0.1:$port" kill --all >/dev/null 2>&1
  done
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
  for p in "${pids[@]}"; do
    for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null
    wait "$p" 2>/dev/null
  done
  # Any VMM still alive that runs from this work dir (by pid).
  for p in /proc/[0-9]*; do
    if tr '\0' ' ' < "$p/cmdline" 2>/dev/null | grep -qF "$work/"; then
      kill -KILL "${p#/proc/}" 2>/dev/null
    fi
  done
  if [ "$rc" != 0 ]; then
    for f in moto.log a.log b.log; do
      [ -s "$work/$f" ] && { echo "--- last lines of $f" >&2; tail -n 20 "$work/$f" >&2; }
    done
  fi
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

say() { echo "# $*" >&2; }
die() { echo "transfer.sh: $*" >&2; exit 1; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
now() { date +%s.%N; }
since() { awk -v s="$1" -v e="$(now)" 'BEGIN { printf "%.3f", e - s }'; }
# div A B [DECIMALS]
div() { awk -v a="$1" -v b="$2" -v p="${3:-1}" 'BEGIN { if (b == 0) print "-"; else printf("%." p "f", a / b) }'; }
mib() { div "$1" 1048576 "${2:-1}"; }
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
fsize() { stat -c %s "$1"; }
json() { python3 -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }

# T=<seconds> after running "$@" (output goes to the command log; a failure aborts).
T=
timed() {
  local s
  s=$(now)
  if ! "$@" >>"$work/cmd.log" 2>&1; then
    echo "transfer.sh: failed: $*" >&2
    tail -n 5 "$work/cmd.log" >&2
    exit 1
  fi
  T=$(since "$s")
}

fa() { FORKD_TOKEN_FILE="$work/a/token" "$cli" --url "http://127.0.0.1:$aport" "$@"; }
fb() { FORKD_TOKEN_FILE="$work/b/token" "$cli" --url "http://127.0.0.1:$bport" "$@"; }

# --- object store ---------------------------------------------------------
moto_port=$(free_port)
setsid "$moto" -H 127.0.0.1 -p "$moto_port" >"$work/moto.log" 2>&1 &
pids+=($!)
for i in $(seq 300); do
  curl -s -o /dev/null "http://127.0.0.1:$moto_port/" && break
  kill -0 "${pids[0]}" 2>/dev/null || die "moto_server exited"
  [ "$i" = 300 ] && die "moto_server did not answer on port $moto_port"
  sleep 0.1
done
curl -sf -o /dev/null -X PUT "http://127.0.0.1:$moto_port/forkd" || die "could not create bucket forkd"
say "moto_server on 127.0.0.1:$moto_port, bucket forkd"

# --- daemons --------------------------------------------------------------
start_daemon() { # NAME PORT
  local name=$1 port=$2 pid
  mkdir -p "$work/$name"
  env -u FORKD_TOKEN_FILE -u FORKD_TOKENS_FILE \
    AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_REGION=us-east-1 \
    AWS_ENDPOINT="http://127.0.0.1:$moto_port" AWS_ALLOW_HTTP=true \
    setsid "$server" --bind "127.0.0.1:$port" --data-dir "$work/$name" --guest-dir "$guest" \
    --remote s3://forkd/bench --log warn >"$work/$name.log" 2>&1 &
  pid=$!
  pids+=("$pid")
  for i in $(seq 600); do
    grep -q "listening on http://127.0.0.1:$port" "$work/$name.log" && [ -s "$work/$name/token" ] && break
    kill -0 "$pid" 2>/dev/null || die "daemon $name exited"
    [ "$i" = 600 ] && die "daemon $name did not start"
    sleep 0.1
  done
  say "daemon $name on 127.0.0.1:$port (data dir $work/$name)"
}
aport=$(free_port)
start_daemon a "$aport"
bport=$(free_port)
start_daemon b "$bport"

# --- snapshots with filled memory on A ------------------------------------
branch_full() { # SANDBOX TAG
  local out code
  out=$(curl -s -w '\n%{http_code}' -X POST "http://127.0.0.1:$aport/v1/sandboxes/$1/branch" \
    -H "authorization: Bearer $(cat "$work/a/token")" -H 'content-type: application/json' \
    -d "{\"tag\":\"$2\",\"mode\":\"full\"}")
  code=${out##*$'\n'}
  [ "$code" = 201 ] || die "branch $1 -> $2 (full) answered $code: ${out%$'\n'*}"
}

declare -A logical
for m in $sizes; do
  say "snapshot m$m: boot base$m, fill ~60% of $m MiB, branch full"
  timed fa snapshot --tag "base$m" --image minimal --mem-mib "$m"
  id=$(fa fork -t "base$m" -q)
  half=$((m * 1048576 * 6 / 20))
  s=$(now)
  fa exec "$id" --timeout 20m -- sh -c "mount -o remount,size=95% /dev/shm &&
    head -c $half /dev/urandom > /dev/shm/random &&
    yes 'some line of text 12345' | head -c $half > /dev/shm/text && sync" >>"$work/cmd.log" 2>&1 ||
    die "filling $id failed (see above)"
  say "  filled $((half * 2 / 1048576)) MiB in $(since "$s") s"
  branch_full "$id" "m$m"
  fa kill "$id" >/dev/null
  d=$work/a/snapshots/m$m
  logical[$m]=$(($(fsize "$d/mem") + $(fsize "$d/state")))
  say "  m$m: logical $(mib "${logical[$m]}") MiB, $(du -sm "$d" | cut -f1) MiB on disk"
done

# --- pack / unpack --------------------------------------------------------
base_pack() { tar -C "$1" -cf - mem state | zstd -3 -T1 -q -o "$2"; }
base_unpack() { zstd -dc "$1" | tar -C "$2" -xf -; }

declare -A r
for m in $sizes; do
  say "pack/unpack m$m, $runs runs"
  fp=() bp=() fu=() bu=()
  for n in $(seq "$runs"); do
    rm -f "$work/f$m.tar.zst" "$work/b$m.tar.zst"
    timed fa pack "m$m" -o "$work/f$m.tar.zst" --flat
    fp+=("$T")
    timed base_pack "$work/a/snapshots/m$m" "$work/b$m.tar.zst"
    bp+=("$T")
    timed fb unpack "$work/f$m.tar.zst" --as "m$m-u$n"
    fu+=("$T")
    fb rmi "m$m-u$n" >/dev/null
    rm -rf "$work/out" && mkdir "$work/out"
    timed base_unpack "$work/b$m.tar.zst" "$work/out"
    bu+=("$T")
    rm -rf "$work/out"
  done
  r[$m,fp]=$(median "${fp[@]}") r[$m,bp]=$(median "${bp[@]}")
  r[$m,fu]=$(median "${fu[@]}") r[$m,bu]=$(median "${bu[@]}")
  r[$m,fz]=$(fsize "$work/f$m.tar.zst") r[$m,bz]=$(fsize "$work/b$m.tar.zst")
  say "  forkd pack ${fp[*]} / unpack ${fu[*]}; baseline pack ${bp[*]} / unpack ${bu[*]}"
  rm -f "$work/f$m.tar.zst" "$work/b$m.tar.zst"
done

# --- push / pull ----------------------------------------------------------
for m in $sizes; do
  say "push/pull m$m"
  s=$(now)
  j=$(fa --json push "m$m") || die "push m$m failed"
  r[$m,push]=$(since "$s")
  r[$m,up]=$(json uploaded_bytes <<<"$j")
  j=$(fa --json push "m$m") || die "re-push m$m failed"
  r[$m,reup]=$(json uploaded_bytes <<<"$j")
  s=$(now)
  fb --json pull "m$m" >>"$work/cmd.log" || die "pull m$m failed"
  r[$m,pull]=$(since "$s")
done

# --- remote fork ----------------------------------------------------------
set -- $sizes
rf_src=m$1
say "remote fork: branch RF from a child of $rf_src on A, push it"
id=$(fa fork -t "$rf_src" -q)
fa exec "$id" -- sh -c 'date > /dev/shm/rf-marker' >/dev/null
branch_full "$id" RF
fa kill "$id" >/dev/null
timed fa push RF

fork_ready() { # TAG -> T = seconds from fork start to the first exec answering
  local s id
  s=$(now)
  id=$(fb fork -t "$1" -q) || die "fork of $1 on B failed"
  for i in $(seq 600); do
    fb exec "$id" -- true >/dev/null 2>&1 && break
    [ "$i" = 600 ] && die "$id never answered exec"
    sleep 0.05
  done
  T=$(since "$s")
  fb kill "$id" >/dev/null
}
fork_ready RF; rf_remote=$T
fork_ready "$rf_src"; rf_local=$T
fork_ready RF; rf_again=$T

# --- tables ---------------------------------------------------------------
echo
echo "pack / unpack: median of $runs runs, MiB/s = logical snapshot size / wall time"
echo
f='%-9s %-9s %8s %11s %12s %9s %13s\n'
printf "$f" size tool "pack s" "pack MiB/s" "archive MiB" "unpack s" "unpack MiB/s"
for m in $sizes; do
  L=$(mib "${logical[$m]}" 3)
  printf "$f" "$m MiB" forkd "${r[$m,fp]}" "$(div "$L" "${r[$m,fp]}")" "$(mib "${r[$m,fz]}")" \
    "${r[$m,fu]}" "$(div "$L" "${r[$m,fu]}")"
  printf "$f" "$m MiB" tar+zstd "${r[$m,bp]}" "$(div "$L" "${r[$m,bp]}")" "$(mib "${r[$m,bz]}")" \
    "${r[$m,bu]}" "$(div "$L" "${r[$m,bu]}")"
done
echo
echo "forkd vs tar+zstd: speed = baseline s / forkd s (>1: forkd faster), size = forkd / baseline archive"
echo
f='%-9s %12s %14s %13s\n'
printf "$f" size "pack speed" "unpack speed" "archive size"
for m in $sizes; do
  printf "$f" "$m MiB" "$(div "${r[$m,bp]}" "${r[$m,fp]}" 2)" "$(div "${r[$m,bu]}" "${r[$m,fu]}" 2)" \
    "$(div "${r[$m,fz]}" "${r[$m,bz]}" 3)"
done
echo
echo "push / pull through s3://forkd/bench (moto), MiB/s = logical snapshot size / wall time"
echo
f='%-9s %8s %11s %13s %20s %8s %11s\n'
printf "$f" size "push s" "push MiB/s" "uploaded MiB" "re-push uploaded B" "pull s" "pull MiB/s"
for m in $sizes; do
  L=$(mib "${logical[$m]}" 3)
  printf "$f" "$m MiB" "${r[$m,push]}" "$(div "$L" "${r[$m,push]}")" "$(mib "${r[$m,up]}")" \
    "${r[$m,reup]}" "${r[$m,pull]}" "$(div "$L" "${r[$m,pull]}")"
done
echo
echo "fork on B until the first exec answers (${rf_src#m} MiB snapshot)"
echo
f='%-42s %8s\n'
printf "$f" case seconds
printf "$f" "RF, only on the remote (fork pulls it)" "$rf_remote"
printf "$f" "$rf_src, already on B" "$rf_local"
printf "$f" "RF again, now on B" "$rf_again"
