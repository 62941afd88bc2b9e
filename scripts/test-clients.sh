#!/usr/bin/env bash
# Tests the language clients against a real forkd-server:
#   1. installs what they need: a Python venv under $FORKD_CACHE_DIR/venv
#      (grpcio-tools pinned, pytest, the forkd package itself) and the
#      TypeScript toolchain from clients/typescript/package-lock.json (npm ci)
#   2. checks that the generated code (clients) and docs/api.md match proto/
#   3. runs mypy and pytest (clients/python), tsc and node --test
#      (clients/typescript)
#
# The daemon binary is $FORKD_SERVER_BIN, else $CARGO_TARGET_DIR/debug or
# target/debug (built with cargo when missing); the `forkd` CLI, which the
# MCP tests run as `forkd mcp`, is $FORKD_CLI_BIN, found the same way. The
# reference's own MCP server (PyPI forkd-mcp) goes into a second venv,
# $FORKD_CACHE_DIR/reference-mcp-venv, and is passed on as $FORKD_REFERENCE_MCP.
# FORKD_E2E=1 adds the tests
# that fork real microVMs (guest assets from scripts/build-guest.sh; the
# snapshot image is $FORKD_E2E_IMAGE, default python).
#
# Every step runs even when an earlier one failed, so one run shows all
# failures; the exit status is non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD

cache_dir="${FORKD_CACHE_DIR:-/var/cache/forkd}"
venv="$cache_dir/venv"
reference_venv="$cache_dir/reference-mcp-venv"
failed=()

step() { printf '\n==> %s\n' "$*"; }
fail() { echo "test-clients.sh: FAILED: $*" >&2; failed+=("$*"); }

step "forkd-server binary"
if [ -z "${FORKD_SERVER_BIN:-}" ]; then
  FORKD_SERVER_BIN="${CARGO_TARGET_DIR:-$root/target}/debug/forkd-server"
  if [ ! -x "$FORKD_SERVER_BIN" ]; then
    cargo build -p forkd-server --locked || { echo "test-clients.sh: cannot build forkd-server" >&2; exit 1; }
  fi
fi
if [ ! -x "$FORKD_SERVER_BIN" ]; then
  echo "test-clients.sh: forkd-server not found at $FORKD_SERVER_BIN" >&2
  exit 1
fi
export FORKD_SERVER_BIN
echo "$FORKD_SERVER_BIN"

step "forkd (CLI) binary"
if [ -z "${FORKD_CLI_BIN:-}" ]; then
  FORKD_CLI_BIN="${CARGO_TARGET_DIR:-$root/target}/debug/forkd"
  if [ ! -x "$FORKD_CLI_BIN" ]; then
    cargo build -p forkd --locked || { echo "test-clients.sh: cannot build forkd" >&2; exit 1; }
  fi
fi
if [ ! -x "$FORKD_CLI_BIN" ]; then
  echo "test-clients.sh: forkd not found at $FORKD_CLI_BIN" >&2
  exit 1
fi
export FORKD_CLI_BIN
echo "$FORKD_CLI_BIN"

step "python environment ($venv)"
mkdir -p "$cache_dir"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv" || { echo "test-clients.sh: cannot create $venv" >&2; exit 1; }
fi
# mcp: the official MCP SDK, whose stdio client drives `forkd mcp` in
# tests/test_mcp.py (pinned: the tests check its protocol exchange).
# e2b: E2B's own SDK, which tests/test_e2b.py drives unchanged against
# forkd's E2B compatibility layer (pinned: the tests pin its wire protocol).
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    -r clients/python/requirements-gen.txt "pytest>=8" "mypy>=1.10" types-protobuf grpc-stubs "mcp==2.3.0" \
    "e2b==2.63.0" "e2b-code-interpreter==2.11.5" \
  || { echo "test-clients.sh: pip install failed" >&2; exit 1; }
# A real (non-editable) install, so the tests exercise the package as users
# get it: generated modules included, nothing imported from the source tree.
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps ./clients/python \
  && "$venv/bin/python" -m pip install --quiet --disable-pip-version-check ./clients/python \
  || { echo "test-clients.sh: pip install ./clients/python failed" >&2; exit 1; }

step "reference MCP server ($reference_venv)"
# tests/test_reference_mcp.py drives the published reference MCP server
# (PyPI forkd-mcp, another project of the same name) against this daemon.
# It needs mcp<2 while the venv above pins mcp 2.x, so it gets a venv of its
# own; the versions are pinned because the test checks that release's tools.
if [ ! -x "$reference_venv/bin/python" ]; then
  python3 -m venv "$reference_venv" || { echo "test-clients.sh: cannot create $reference_venv" >&2; exit 1; }
fi
"$reference_venv/bin/python" -m pip install --quiet --disable-pip-version-check "forkd-mcp==0.2.1" "mcp==1.30.0" "httpx==0.29.0" \
  || { echo "test-clients.sh: pip install forkd-mcp failed" >&2; exit 1; }
export FORKD_REFERENCE_MCP="$reference_venv/bin/forkd-mcp"
echo "$FORKD_REFERENCE_MCP"

step "typescript environment (npm ci)"
(cd clients/typescript && npm ci --no-audit --no-fund --loglevel=error) \
  || { echo "test-clients.sh: npm ci failed" >&2; exit 1; }

step "generated code and docs are up to date"
FORKD_PYTHON="$venv/bin/python" scripts/gen-clients.sh --check || fail "gen-clients.sh --check"
"$venv/bin/python" scripts/gen-docs.py --check || fail "gen-docs.py --check"

step "python client: mypy"
(cd clients/python && "$venv/bin/python" -m mypy --no-incremental --cache-dir=/dev/null) || fail "mypy"

step "python client: pytest"
(
  cd clients/python
  # Run from the tests' parent with the installed package; -p no:cacheprovider
  # keeps the source tree clean.
  "$venv/bin/python" -m pytest -ra -p no:cacheprovider tests
)
rc=$?
case $rc in
  0) ;;
  5) fail "pytest collected no tests (exit 5)" ;;
  *) fail "pytest (exit $rc)" ;;
esac

step "typescript client: tsc"
(cd clients/typescript && npm run --silent build) || fail "tsc"

step "typescript client: node --test"
(cd clients/typescript && npm run --silent test) || fail "node --test"

echo
if [ ${#failed[@]} -ne 0 ]; then
  printf 'test-clients.sh: %d step(s) failed:\n' "${#failed[@]}" >&2
  printf '  - %s\n' "${failed[@]}" >&2
  exit 1
fi
echo "test-clients.sh: all client checks passed"
