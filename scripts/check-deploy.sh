#!/usr/bin/env bash
# Checks the deployment files in deploy/:
#   systemd  `systemd-analyze verify` (any diagnostic fails, not only errors),
#            `systemd-analyze security --offline` under an exposure threshold,
#            and the token unit's command really producing a token the
#            daemon accepts
#   k8s      kubernetes-validate --strict (schemas ship with the package),
#            checkov's Kubernetes security policies (exceptions are inline
#            annotations with reasons), and no Secret manifest in the tree
#
# Tools: systemd (apt) and a venv under $FORKD_CACHE_DIR/deploy-venv with
# pinned kubernetes-validate and checkov (PyPI). Exits non-zero on any failure.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD

cache_dir="${FORKD_CACHE_DIR:-/var/cache/forkd}"
venv="$cache_dir/deploy-venv"
# The highest systemd exposure score accepted for forkd-server.service; it
# is 4.0 now, so a regression that drops hardening fails this check.
max_exposure=4.5
failed=()

step() { printf '\n==> %s\n' "$*"; }
fail() { echo "check-deploy.sh: FAILED: $*" >&2; failed+=("$*"); }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

step "tools"
if ! command -v systemd-analyze >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends systemd \
    || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends systemd; } \
    || { echo "check-deploy.sh: cannot install systemd" >&2; exit 1; }
fi
mkdir -p "$cache_dir"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv" || { echo "check-deploy.sh: cannot create $venv" >&2; exit 1; }
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    "kubernetes-validate==1.37.0" "checkov==3.3.30" \
  || { echo "check-deploy.sh: pip install failed" >&2; exit 1; }
systemd-analyze --version | head -1
"$venv/bin/kubernetes-validate" --version
"$venv/bin/checkov" --version

step "systemd: verify"
# verify insists that ExecStart's binary exists; point it at a stand-in so
# the check needs neither an installed daemon nor root's /usr/local.
mkdir -p "$tmp/units"
printf '#!/bin/sh\nexit 0\n' > "$tmp/forkd-server" && chmod +x "$tmp/forkd-server"
for u in deploy/systemd/*.service; do
  sed "s|/usr/local/bin/forkd-server|$tmp/forkd-server|g" "$u" > "$tmp/units/$(basename "$u")"
done
out=$(systemd-analyze verify "$tmp"/units/*.service 2>&1)
rc=$?
if [ $rc -ne 0 ] || [ -n "$out" ]; then
  # verify exits 0 on settings it ignores ("Failed to parse ..., ignoring"), so any output fails.
  echo "$out"
  fail "systemd-analyze verify"
else
  echo "deploy/systemd: $(ls deploy/systemd/*.service | xargs -n1 basename | tr '\n' ' ')verified"
fi

step "systemd: security exposure"
for u in "$tmp"/units/*.service; do
  score=$(systemd-analyze security --offline=true "$u" 2>&1 | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
  echo "$(basename "$u"): exposure $score (max $max_exposure)"
  if [ -z "$score" ] || ! awk -v s="$score" -v m="$max_exposure" 'BEGIN { exit !(s <= m) }'; then
    fail "systemd-analyze security $(basename "$u") ($score > $max_exposure)"
  fi
done

step "systemd: the token unit makes a token the daemon accepts"
cmd=$(sed -n 's/^ExecStart=\/bin\/sh -ec //p' deploy/systemd/forkd-token.service)
cmd=${cmd#\'}; cmd=${cmd%\'}
cmd=${cmd//\\\\/\\}          # systemd unescapes \\ to \ before running it
cmd=${cmd//\/etc\/forkd/$tmp}
(umask 077; /bin/sh -ec "$cmd")
token=$(cat "$tmp/token" 2>/dev/null)
mode=$(stat -c %a "$tmp/token" 2>/dev/null)
if [[ ! "$token" =~ ^[0-9a-f]{64}$ ]] || [ "$mode" != 600 ]; then
  fail "forkd-token.service wrote ${#token} characters with mode $mode, want 64 hex characters, mode 600"
else
  echo "token: 64 hex characters, mode $mode"
  bin="${FORKD_SERVER_BIN:-${CARGO_TARGET_DIR:-$root/target}/debug/forkd-server}"
  if [ -x "$bin" ]; then
    "$bin" --bind 127.0.0.1:0 --data-dir "$tmp/data" --token-file "$tmp/token" --log warn > "$tmp/server.out" 2> "$tmp/server.err" &
    pid=$!
    for _ in $(seq 1 100); do grep -q "listening on" "$tmp/server.out" && break; kill -0 $pid 2>/dev/null || break; sleep 0.1; done
    if grep -q "listening on" "$tmp/server.out"; then
      echo "forkd-server accepted it: $(cat "$tmp/server.out")"
    else
      cat "$tmp/server.err" >&2
      fail "forkd-server refused the generated token"
    fi
    kill $pid 2>/dev/null; wait $pid 2>/dev/null
  else
    echo "($bin not built: the daemon's acceptance of the token is not checked)"
  fi
fi

step "kubernetes: schemas"
"$venv/bin/kubernetes-validate" --strict deploy/k8s/*.yaml || fail "kubernetes-validate"

step "kubernetes: security policy (checkov)"
# --skip-download: no guideline or policy downloads; the bundled checks only.
"$venv/bin/checkov" --directory deploy/k8s --framework kubernetes --compact --quiet --skip-download \
  || fail "checkov"

step "kubernetes: no credentials in manifests"
if grep -l -E '^kind:[[:space:]]*Secret' deploy/k8s/*.yaml; then
  fail "a Secret manifest is in deploy/k8s (create it with kubectl create secret instead)"
else
  echo "no Secret manifests"
fi

echo
if [ ${#failed[@]} -ne 0 ]; then
  printf 'check-deploy.sh: %d check(s) failed:\n' "${#failed[@]}" >&2
  printf '  - %s\n' "${failed[@]}" >&2
  exit 1
fi
echo "check-deploy.sh: all deployment checks passed"
