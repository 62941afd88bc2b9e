#!/usr/bin/env bash
# Runs forkd's whole test suite on this machine: prepares the host, builds
# the workspace and the guest assets, then runs unit tests and the
# integration tests, which start real daemons and boot real microVMs.
# Needs root (QEMU, image building). Fails, never skips, when no accelerator
# can run the guest.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "test.sh: run as root (sudo scripts/test.sh)" >&2
  exit 1
fi

step() { printf '\n==> %s\n' "$*"; }

step "host setup"
scripts/setup-host.sh

step "build"
cargo build --workspace --all-targets --locked

step "guest assets"
scripts/build-guest.sh

step "S3 API server for the remote tests"
FORKD_MOTO_SERVER=$(scripts/setup-s3.sh)
export FORKD_MOTO_SERVER

step "OCI registry and skopeo for the image-pull tests"
scripts/setup-registry.sh

step "accelerator"
target_dir="${CARGO_TARGET_DIR:-target}"
"$target_dir/debug/forkd-server" --help >/dev/null
if ! qemu-system-x86_64 -accel help 2>/dev/null | grep -qx tcg && [ ! -r /dev/kvm ]; then
  echo "test.sh: FAIL: neither KVM nor TCG is available to run the guest" >&2
  exit 1
fi

step "guest runtime unit tests"
python3 -m unittest discover -s guest/runtime -v 2>&1 | tail -n 3

step "tests"
# Integration tests boot real VMs; two at a time is what two cores sustain.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# --no-fail-fast: one failing test binary must not hide the others' results.
rust_status=0
cargo test --workspace --locked --no-fail-fast -- --test-threads=2 2>&1 | tee "$log" || rust_status=$?
rust_passed=$(awk '/^test result:/ {s += $4} END {print s + 0}' "$log")
rust_failed=$(awk '/^test result:/ {s += $6} END {print s + 0}' "$log")

step "clients (python, typescript) against a real daemon"
FORKD_E2E=1 FORKD_SERVER_BIN="$target_dir/debug/forkd-server" FORKD_CLI_BIN="$target_dir/debug/forkd" \
  scripts/test-clients.sh

step "deployment files"
scripts/check-deploy.sh

step "summary"
echo "rust: ${rust_passed} passed, ${rust_failed} failed"
if [ "$rust_status" -ne 0 ]; then
  echo "test.sh: FAIL: cargo test exited with $rust_status" >&2
  grep -E '^(test .* FAILED|error: test failed)' "$log" >&2 || true
  exit "$rust_status"
fi
