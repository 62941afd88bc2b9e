#!/usr/bin/env bash
# Recipe of the "python" image: a Debian bookworm root (essential variant)
# with python3, numpy and busybox, built with mmdebstrap from the Debian
# archive. No container runtime and no loop mounts.
#
#   guest/images/python.sh ROOTDIR
#
# Inputs that change the result (and so the cache key): this file, common.sh
# and FORKD_DEBIAN_MIRROR. Image builds (server images::build) also set
# FORKD_EXTRA_PACKAGES (comma-separated Debian packages to add) and
# FORKD_APT_CACHE (a directory keeping downloaded packages across builds);
# scripts/build-guest.sh sets neither.
set -euo pipefail
root=$1
here=$(cd "$(dirname "$0")" && pwd)
. "$here/common.sh"

suite=bookworm
mirror=${FORKD_DEBIAN_MIRROR:-http://deb.debian.org/debian}
packages=python3,python3-numpy,busybox${FORKD_EXTRA_PACKAGES:+,$FORKD_EXTRA_PACKAGES}
# The cache is bound over the archive directory while mmdebstrap runs (its
# essential set is kept there too) and unbound before the final clean-up,
# which never runs `apt-get clean` on it.
cache_opts=()
if [ -n "${FORKD_APT_CACHE:-}" ]; then
  cache_opts=(--skip=essential/unlink --skip=cleanup/apt/cache
    --setup-hook='mkdir -p "$1/var/cache/apt/archives" && mount --bind "$FORKD_APT_CACHE" "$1/var/cache/apt/archives"'
    --customize-hook='umount "$1/var/cache/apt/archives"')
fi

# stdin is closed: without a mirror argument mmdebstrap would read sources from it.
mmdebstrap --variant=essential --mode=root --format=directory \
  --include="$packages" \
  "${FORKD_DPKG_OPTS[@]}" \
  "${cache_opts[@]}" \
  "$suite" "$root" "deb $mirror $suite main" </dev/null

forkd_base_files "$root"
# Busybox fills the gaps of the essential set (ps, ip, vi, wget, ...), without
# shadowing any real tool.
chroot "$root" /bin/busybox --list | while read -r applet; do
  found=
  for d in usr/local/bin usr/bin bin usr/sbin sbin; do
    if [ -e "$root/$d/$applet" ] || [ -L "$root/$d/$applet" ]; then found=1; break; fi
  done
  [ -n "$found" ] || ln -s /bin/busybox "$root/usr/local/bin/$applet"
done
rm -rf "$root"/var/cache/apt/*.bin "$root"/var/lib/apt/lists/* "$root"/var/log/*.log
