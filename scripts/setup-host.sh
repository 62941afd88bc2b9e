#!/usr/bin/env bash
# Take a fresh Debian 12 host to one that can build and run forkd.
# Idempotent; run as root. Installs only from Debian's package archive:
#   - QEMU 10 from bookworm-backports (pinned per-package with -t, so no other
#     package changes version: backports keep their default priority of 100),
#   - image tools (mmdebstrap, e2fsprogs, cpio, zstd, busybox-static),
#   - host tooling the daemon and tests use (iproute2, nftables, sqlite3 not needed;
#     tmux drives `forkd exec -it` in integration/tests/terminal.rs).
# The guest kernel is fetched separately by scripts/fetch-kernel.sh into forkd's data.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
  echo "setup-host.sh: must run as root" >&2
  exit 1
fi

. /etc/os-release
if [ "${ID:-}" != debian ] || [ "${VERSION_CODENAME:-}" != bookworm ]; then
  echo "setup-host.sh: warning: written for Debian 12 (bookworm), found ${PRETTY_NAME:-unknown}" >&2
fi

export DEBIAN_FRONTEND=noninteractive
backports=/etc/apt/sources.list.d/forkd-backports.sources
need_update=0
if [ ! -f "$backports" ]; then
  cat > "$backports.tmp" <<SRC
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  mv "$backports.tmp" "$backports"
  need_update=1
fi

stamp=/var/lib/apt/periodic/forkd-update-stamp
if [ "$need_update" = 1 ] || [ ! -f "$stamp" ] || [ -n "$(find "$stamp" -mmin +720 2>/dev/null)" ]; then
  apt-get update -q
  mkdir -p "$(dirname "$stamp")" && touch "$stamp"
fi

# fonts-dejavu-core: the labels of `forkd bench --plot` charts.
want_base=(mmdebstrap e2fsprogs cpio zstd xz-utils busybox-static iproute2 nftables ca-certificates tmux fonts-dejavu-core)
missing=()
for p in "${want_base[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

qemu_ver=$(dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null || true)
case "$qemu_ver" in
  1:10.*) ;;
  *) apt-get install -y -q --no-install-recommends -t bookworm-backports qemu-system-x86 ;;
esac

qemu-system-x86_64 --version | head -1
echo "setup-host.sh: host ready"
