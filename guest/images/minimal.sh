#!/usr/bin/env bash
# Recipe of the "minimal" image: the host's static busybox and its applet
# links, nothing else. Needs no network.
#
#   guest/images/minimal.sh ROOTDIR
#
# Inputs that change the result (and so the cache key): this file, common.sh
# and the version of the host package busybox-static.
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

mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin}
install -m 0755 "$busybox" "$root/bin/busybox"
# --list-full prints paths like usr/bin/awk; link each to /bin/busybox.
"$busybox" --list-full | while read -r applet; do
  [ "$applet" = bin/busybox ] && continue
  mkdir -p "$root/$(dirname "$applet")"
  ln -sf /bin/busybox "$root/$applet"
done
forkd_base_files "$root"
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > "$root/etc/passwd"
printf 'root:x:0:\ntty:x:5:\nnogroup:x:65534:\n' > "$root/etc/group"
