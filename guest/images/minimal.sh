#!/usr/bin/env bash
# Recipe of the "minimal" image: the host's static busybox and its applet
# links, nothing else. Needs no network.
#
#   guest/images/minimal.sh ROOTDIR
#
# Inputs that change the result (and so the cache key): this file, common.sh
# and the version of the host package busybox-static. Image builds (server
# images::build) may set FORKD_EXTRA_PACKAGES (comma-separated Debian
# packages): those and their dependencies are unpacked from the Debian
# archive (FORKD_DEBIAN_MIRROR) first, without dpkg or maintainer scripts,
# and busybox fills in only the commands they lack. FORKD_APT_CACHE keeps
# the downloaded packages across builds. scripts/build-guest.sh sets
# neither.
set -euo pipefail
root=$1
here=$(cd "$(dirname "$0")" && pwd)
. "$here/common.sh"

busybox=/bin/busybox
# ldd succeeds only on dynamically linked programs.
if ! "$busybox" --list-full >/dev/null 2>&1 || ldd "$busybox" >/dev/null 2>&1; then
  echo "minimal.sh: $busybox is missing or not static; install busybox-static" >&2
  exit 1
fi

if [ -n "${FORKD_EXTRA_PACKAGES:-}" ]; then
  suite=bookworm
  mirror=${FORKD_DEBIAN_MIRROR:-http://deb.debian.org/debian}
  # The extract variant runs only setup and extract hooks; never `apt-get
  # clean` the bound cache.
  cache_opts=()
  if [ -n "${FORKD_APT_CACHE:-}" ]; then
    cache_opts=(--skip=cleanup/apt/cache
      --setup-hook='mkdir -p "$1/var/cache/apt/archives" && mount --bind "$FORKD_APT_CACHE" "$1/var/cache/apt/archives"'
      --extract-hook='umount "$1/var/cache/apt/archives"')
  fi
  mmdebstrap --variant=extract --mode=root --format=directory \
    --include="$FORKD_EXTRA_PACKAGES" \
    "${FORKD_DPKG_OPTS[@]}" \
    "${cache_opts[@]}" \
    "$suite" "$root" "deb $mirror $suite main" </dev/null
  rm -rf "$root"/var/cache/apt/*.bin "$root"/var/lib/apt/lists/* "$root"/var/log/*.log
fi

mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin}
install -m 0755 "$busybox" "$root/bin/busybox"
# --list-full prints paths like usr/bin/awk; link each to /bin/busybox unless
# an unpacked package has put a real command there.
"$busybox" --list-full | while read -r applet; do
  [ "$applet" = bin/busybox ] && continue
  [ -e "$root/$applet" ] || [ -L "$root/$applet" ] && continue
  mkdir -p "$root/$(dirname "$applet")"
  ln -s /bin/busybox "$root/$applet"
done
forkd_base_files "$root"
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > "$root/etc/passwd"
printf 'root:x:0:\ntty:x:5:\nnogroup:x:65534:\n' > "$root/etc/group"
