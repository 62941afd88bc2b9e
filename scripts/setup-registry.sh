#!/usr/bin/env bash
# Installs what the registry tests (integration/tests/registry.rs) run
# against, from Debian's archive: `docker-registry` (the reference OCI
# distribution server, started by the tests on a loopback port of their
# own) and `skopeo` (pushes the tests' OCI layouts to it). The packaged
# registry service is stopped and disabled: the tests start their own
# instances, nothing should listen on port 5000 for them.
# Idempotent; run as root. Prints nothing on stdout (apt's output goes to
# stderr).
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
  echo "setup-registry.sh: must run as root" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
want=(docker-registry skopeo)
missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if ! apt-get install -y -q --no-install-recommends "${missing[@]}" >&2; then
    apt-get update -q >&2
    apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
  fi
fi
# The package enables a system-wide registry on :5000; the tests never use it.
if [ -d /run/systemd/system ] && systemctl is-enabled --quiet docker-registry.service 2>/dev/null; then
  systemctl disable --now docker-registry.service >/dev/null 2>&1 || true
fi

for bin in /usr/bin/docker-registry /usr/bin/skopeo; do
  [ -x "$bin" ] || { echo "setup-registry.sh: $bin missing after install" >&2; exit 1; }
done
/usr/bin/skopeo --version >/dev/null || { echo "setup-registry.sh: skopeo does not run" >&2; exit 1; }
