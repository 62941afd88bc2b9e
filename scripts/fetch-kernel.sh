#!/usr/bin/env bash
# Fetch Debian's cloud kernel (bookworm-backports) and turn it into what a
# forkd guest boots: an uncompressed ELF `vmlinux` (QEMU loads it through the
# PVH entry point, which skips the in-guest decompression that is slow under
# TCG) and the few modules the agent loads from the initramfs, decompressed and
# listed in dependency order.
#
#   scripts/fetch-kernel.sh [--package NAME]
#
# The result is cached under ${FORKD_CACHE_DIR:-/var/cache/forkd}/kernel/<key>,
# key = sha256(package name + version + this script), and the cache directory
# is printed as the last line on stdout (progress goes to stderr). Contents:
#   vmlinux  version  package  modules/*.ko  modules.list  modules.builtin
# The package is unpacked in a scratch directory; nothing is installed.
set -euo pipefail

cache_root=${FORKD_CACHE_DIR:-/var/cache/forkd}
package=${FORKD_KERNEL_PACKAGE:-}
# Modules the agent needs; optional ones are skipped when the kernel lacks them.
want_modules=(virtio_mmio virtio_blk overlay virtio_net)
optional_modules=(erofs)

while [ $# -gt 0 ]; do
  case "$1" in
    --package) package=$2; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "fetch-kernel.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

log() { echo "fetch-kernel: $*" >&2; }

script_sum=$(sha256sum "$0" | cut -d' ' -f1)

if [ -z "$package" ]; then
  package=$(apt-cache search --names-only '^linux-image-6\.12\..*-cloud-amd64-unsigned$' 2>/dev/null \
    | cut -d' ' -f1 | sort -V | tail -1 || true)
fi
if [ -z "$package" ]; then
  # Offline or no package lists: reuse the newest kernel already in the cache.
  newest=$(ls -1dt "$cache_root"/kernel/*/ 2>/dev/null | while read -r d; do
    [ -f "$d/vmlinux" ] && [ -f "$d/modules.list" ] && { echo "${d%/}"; break; }; done || true)
  if [ -n "$newest" ]; then
    log "no kernel package visible to apt-cache; using cached $(cat "$newest/package")"
    echo "$newest"
    exit 0
  fi
  echo "fetch-kernel.sh: no linux-image-6.12.*-cloud-amd64-unsigned found; is bookworm-backports configured (scripts/setup-host.sh) and 'apt-get update' done?" >&2
  exit 1
fi

version=$(apt-cache show "$package" 2>/dev/null | sed -n 's/^Version: //p' | sort -V | tail -1)
[ -n "$version" ] || { echo "fetch-kernel.sh: apt-cache knows no version of $package" >&2; exit 1; }
key=$(printf '%s\n%s\n%s\n%s\n' "$package" "$version" "${want_modules[*]} ${optional_modules[*]}" "$script_sum" \
  | sha256sum | cut -c1-16)
dest=$cache_root/kernel/$key
if [ -f "$dest/vmlinux" ] && [ -f "$dest/modules.list" ]; then
  log "cached $package $version ($dest)"
  echo "$dest"
  exit 0
fi

mkdir -p "$cache_root/kernel"
work=$(mktemp -d "$cache_root/kernel/.work.XXXXXX")
chmod 0755 "$work"
trap 'rm -rf "$work"' EXIT

log "downloading $package=$version"
# apt drops privileges to _apt for downloads; give it a directory it may write.
mkdir -p "$work/deb"
chmod 0777 "$work/deb"
(cd "$work/deb" && apt-get download -q "$package=$version" >&2)
deb=$(ls "$work"/deb/*.deb)
log "unpacking $(basename "$deb")"
dpkg-deb -x "$deb" "$work/pkg"

kver=$(ls "$work/pkg/lib/modules")
vmlinuz=$work/pkg/boot/vmlinuz-$kver
[ -f "$vmlinuz" ] || { echo "fetch-kernel.sh: $vmlinuz missing from the package" >&2; exit 1; }

out=$work/out
mkdir -p "$out/modules"

log "extracting vmlinux from $(basename "$vmlinuz")"
# The x86 boot header says where the compressed payload sits (payload_offset
# at 0x248 and payload_length at 0x24c, relative to the protected-mode code,
# which starts after (setup_sects + 1) sectors). The payload is a zstd frame
# followed by the 4-byte decompressed size, which zstd must not see.
python3 - "$vmlinuz" "$out/vmlinux.zst" <<'PY'
import struct, sys
data = open(sys.argv[1], "rb").read()
if data[0x202:0x206] != b"HdrS":
    sys.exit("not a bzImage (no HdrS signature)")
setup_sects = data[0x1F1] or 4
pm_start = (setup_sects + 1) * 512
offset, length = struct.unpack_from("<II", data, 0x248)
start = pm_start + offset
payload = data[start:start + length - 4]
if payload[:4] != b"\x28\xb5\x2f\xfd":
    # Fall back to the first zstd magic in the file.
    at = data.find(b"\x28\xb5\x2f\xfd")
    if at < 0:
        sys.exit("no zstd payload in the kernel image")
    payload = data[at:start + length - 4] if at >= start else data[at:]
open(sys.argv[2], "wb").write(payload)
PY
zstd -q -d -f "$out/vmlinux.zst" -o "$out/vmlinux"
rm -f "$out/vmlinux.zst"
if [ "$(head -c4 "$out/vmlinux" | od -An -tx1 | tr -d ' \n')" != 7f454c46 ]; then
  echo "fetch-kernel.sh: extracted vmlinux is not an ELF file" >&2
  exit 1
fi

log "resolving modules: ${want_modules[*]} (optional: ${optional_modules[*]})"
# The package ships no modules.dep (depmod runs at install time), so the
# dependency order comes from each module's own .modinfo "depends=" list.
python3 - "$work/pkg/lib/modules/$kver" "$out" "${want_modules[*]}" "${optional_modules[*]}" >&2 <<'PY'
import lzma, os, sys

moddir, out, want, optional = sys.argv[1], sys.argv[2], sys.argv[3].split(), sys.argv[4].split()

def norm(name):
    return name.replace("-", "_")

paths = {}
for root, _, files in os.walk(os.path.join(moddir, "kernel")):
    for f in files:
        for ext in (".ko.xz", ".ko"):
            if f.endswith(ext):
                paths[norm(f[: -len(ext)])] = os.path.join(root, f)

builtin = set()
try:
    for line in open(os.path.join(moddir, "modules.builtin")):
        base = os.path.basename(line.strip())
        if base.endswith(".ko"):
            builtin.add(norm(base[:-3]))
except FileNotFoundError:
    pass

def load(name):
    p = paths[name]
    raw = open(p, "rb").read()
    return lzma.decompress(raw) if p.endswith(".xz") else raw

def depends(blob):
    # .modinfo is a run of NUL-terminated key=value strings.
    at = blob.find(b"\0depends=")
    if at < 0:
        return []
    end = blob.index(b"\0", at + 1)
    value = blob[at + len(b"\0depends="):end].decode()
    return [norm(d) for d in value.split(",") if d]

order, seen, blobs = [], set(), {}

def visit(name, chain=()):
    if name in seen or name in builtin:
        return
    if name in chain:
        sys.exit(f"module dependency cycle: {' -> '.join(chain + (name,))}")
    blob = load(name)
    for dep in depends(blob):
        if dep not in paths and dep not in builtin:
            sys.exit(f"{name} depends on {dep}, which this kernel lacks")
        visit(dep, chain + (name,))
    seen.add(name)
    blobs[name] = blob
    order.append(name)

for name in want + optional:
    name = norm(name)
    if name in builtin:
        print(f"fetch-kernel:   {name}: built in")
        continue
    if name not in paths:
        if name in optional:
            print(f"fetch-kernel:   {name}: not in this kernel, skipped")
            continue
        sys.exit(f"required module {name} not found")
    visit(name)

with open(os.path.join(out, "modules.list"), "w") as lst:
    for name in order:
        with open(os.path.join(out, "modules", name + ".ko"), "wb") as f:
            f.write(blobs[name])
        lst.write(f"/forkd/modules/{name}.ko\n")
print("fetch-kernel:   load order: " + " ".join(order))
PY

cp "$work/pkg/lib/modules/$kver/modules.builtin" "$out/modules.builtin" 2>/dev/null || true
cp "$work/pkg/boot/config-$kver" "$out/config"
echo "$kver" > "$out/version"
echo "$package=$version" > "$out/package"

rm -rf "$dest"
mv "$out" "$dest"
# Kernels fetched for other inputs are superseded.
for old in "$cache_root"/kernel/*/; do
  [ "${old%/}" = "$dest" ] || rm -rf "${old%/}"
done
log "kernel $kver ready in $dest"
echo "$dest"
