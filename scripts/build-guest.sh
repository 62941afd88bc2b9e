#!/usr/bin/env bash
# Build everything a forkd guest boots from:
#
#   <out>/vmlinux               uncompressed guest kernel (Debian cloud 6.12)
#   <out>/initramfs.img         forkd-agent as /init + the modules it loads
#   <out>/images/minimal.ext4   busybox root (read-only in the guest)
#   <out>/images/python.ext4    Debian root with python3 + numpy
#   <out>/manifest.json         versions, sha256 of every file, per-image runtime
#   <out>/recipes/*.sh          the image recipes, for the daemon's image builds
#
#   scripts/build-guest.sh [--out DIR] [--only minimal|python|none]
#
# out defaults to $FORKD_GUEST_DIR or /var/lib/forkd/guest. Heavy products
# (kernel, images) are cached under ${FORKD_CACHE_DIR:-/var/cache/forkd},
# keyed by a sha256 of their inputs, so a repeated run takes seconds. Every
# output is written under a temporary name and renamed into place. Run as
# root (mmdebstrap and image ownership need it); see scripts/setup-host.sh.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
out=${FORKD_GUEST_DIR:-/var/lib/forkd/guest}
cache=${FORKD_CACHE_DIR:-/var/cache/forkd}
only=all

while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=$2; shift 2 ;;
    --out=*) out=${1#--out=}; shift ;;
    --only) only=$2; shift 2 ;;
    --only=*) only=${1#--only=}; shift ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "build-guest.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
case "$only" in
  all) images=(minimal python) ;;
  minimal|python) images=("$only") ;;
  none) images=() ;;
  *) echo "build-guest.sh: --only takes minimal, python or none" >&2; exit 2 ;;
esac

# Only the daemon's image builds add packages or a download cache to a recipe.
unset FORKD_EXTRA_PACKAGES FORKD_APT_CACHE

started=$(date +%s%N)
log() { printf 'build-guest: [%5.1fs] %s\n' "$(( ($(date +%s%N) - started) / 1000000 ))e-3" "$*"; }
die() { echo "build-guest.sh: $*" >&2; exit 1; }

for tool in python3 sha256sum cpio mke2fs cargo apt-get dpkg-deb zstd; do
  command -v "$tool" >/dev/null || die "$tool is missing (run scripts/setup-host.sh)"
done
[ "$(id -u)" -eq 0 ] || die "must run as root (image files must hold root-owned trees)"

mkdir -p "$out/images" "$cache/images"
out=$(cd "$out" && pwd)
exec 9>"$cache/.build-guest.lock"
flock 9

tmp=$(mktemp -d "$cache/.build-guest.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

sha_of() { sha256sum "$@" | cut -d' ' -f1; }
# Key of the current file $1 in the previous manifest ("" when unknown).
old_key() {
  [ -f "$out/manifest.json" ] || return 0
  python3 -c 'import json,sys
try:
    f = json.load(open(sys.argv[1]))["files"].get(sys.argv[2]) or {}
    print(f.get("key", ""))
except Exception:
    pass' "$out/manifest.json" "$1"
}
# Records "<relpath> <key>" for the manifest step.
: > "$tmp/keys"
note_key() { echo "$1 $2" >> "$tmp/keys"; }

# ---- 1. kernel ---------------------------------------------------------------
log "kernel: resolving the newest linux-image-6.12.*-cloud-amd64-unsigned"
kdir=$("$repo/scripts/fetch-kernel.sh" | tail -1)
[ -f "$kdir/vmlinux" ] || die "fetch-kernel.sh produced no vmlinux"
kver=$(cat "$kdir/version")
kkey=$(basename "$kdir")
if [ -f "$out/vmlinux" ] && [ "$(old_key vmlinux)" = "$kkey" ]; then
  log "kernel: $kver (unchanged)"
else
  cp "$kdir/vmlinux" "$out/.vmlinux.tmp"
  mv -f "$out/.vmlinux.tmp" "$out/vmlinux"
  log "kernel: $kver -> $out/vmlinux"
fi
note_key vmlinux "$kkey"

# ---- 2. agent ----------------------------------------------------------------
target_dir=${CARGO_TARGET_DIR:-$repo/target}
log "agent: cargo build -p forkd-agent --profile agent (static)"
# With an explicit --target, RUSTFLAGS apply to the agent but not to build
# scripts, which must stay dynamically linked host programs.
(cd "$repo" && CARGO_TARGET_DIR="$target_dir" RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build -q -p forkd-agent --profile agent --target x86_64-unknown-linux-gnu)
agent=$target_dir/x86_64-unknown-linux-gnu/agent/forkd-agent
[ -x "$agent" ] || die "no agent binary at $agent"
python3 - "$agent" <<'PY' || die "$agent is not a static executable"
import struct, sys
d = open(sys.argv[1], "rb").read()
assert d[:4] == b"\x7fELF" and d[4] == 2, "not a 64-bit ELF"
phoff, = struct.unpack_from("<Q", d, 0x20)
phentsize, phnum = struct.unpack_from("<HH", d, 0x36)
types = [struct.unpack_from("<I", d, phoff + i * phentsize)[0] for i in range(phnum)]
# PT_INTERP (3) means a dynamic loader is needed; PT_DYNAMIC (2) without it is
# a static-pie, which is fine.
sys.exit(1 if 3 in types else 0)
PY
log "agent: $(du -h "$agent" | cut -f1) static binary"

# ---- 3. initramfs --------------------------------------------------------------
# Uncompressed newc: QEMU copies it into guest RAM at host speed, while a
# gzip archive would be inflated by the guest kernel under TCG.
# This script is an input too: it decides how the archive is laid out.
ikey=$(cat "$agent" "$kdir/modules.list" "$kdir"/modules/*.ko "$0" | sha256sum | cut -d" " -f1)
if [ -f "$out/initramfs.img" ] && [ "$(old_key initramfs.img)" = "$ikey" ]; then
  log "initramfs: unchanged"
else
  stage=$tmp/initramfs
  mkdir -p "$stage"/{forkd/modules,proc,sys,dev,mnt,newroot,run,tmp}
  install -m 0755 "$agent" "$stage/init"
  cp "$kdir"/modules/*.ko "$stage/forkd/modules/"
  cp "$kdir/modules.list" "$stage/forkd/modules.list"
  find "$stage" -exec touch -h -d @0 {} +
  (cd "$stage" && find . -mindepth 1 | LC_ALL=C sort \
    | cpio -o -H newc --owner=0:0 --reproducible --quiet) > "$out/.initramfs.img.tmp"
  # QEMU's PVH loader puts the initrd flush against the top of RAM, where the
  # firmware keeps the ACPI tables (microvm reserves no room for them): only
  # the slack left by page-aligning the start protects the tables. Zero
  # padding to a whole page makes that slack a full 4 KiB; the kernel skips
  # trailing zeros in an initramfs.
  truncate -s %4096 "$out/.initramfs.img.tmp"
  mv -f "$out/.initramfs.img.tmp" "$out/initramfs.img"
  log "initramfs: $(du -h "$out/initramfs.img" | cut -f1) -> $out/initramfs.img"
fi
note_key initramfs.img "$ikey"

# ---- 4. images -----------------------------------------------------------------
# make_ext4 DIR FILE LABEL: an ext4 image holding DIR, without a journal (it
# is only ever mounted read-only) and with room for the filesystem's own
# metadata.
make_ext4() {
  local dir=$1 file=$2 label=$3
  local used_kb inodes size_kb
  used_kb=$(du -s --block-size=1K "$dir" | cut -f1)
  inodes=$(find "$dir" | wc -l)
  size_kb=$(( (used_kb * 6 / 5 + 32 * 1024 + 4095) / 4096 * 4096 ))
  rm -f "$file"
  mke2fs -q -F -t ext4 -b 4096 -m 0 -L "$label" \
    -N $(( inodes + inodes / 4 + 1024 )) \
    -O ^has_journal,^resize_inode \
    -E root_owner=0:0,lazy_itable_init=0 \
    -d "$dir" "$file" "${size_kb}k" >/dev/null
}

image_key() {
  local name=$1
  local extra=""
  case "$name" in
    minimal) extra=$(dpkg-query -W -f='${Package} ${Version}' busybox-static 2>/dev/null || echo none) ;;
    python) extra=${FORKD_DEBIAN_MIRROR:-http://deb.debian.org/debian} ;;
  esac
  { cat "$repo/guest/images/$name.sh" "$repo/guest/images/common.sh"; echo "$extra"; } | sha256sum | cut -c1-16
}

for name in "${images[@]}"; do
  recipe=$repo/guest/images/$name.sh
  [ -x "$recipe" ] || die "no recipe $recipe"
  key=$(image_key "$name")
  cached=$cache/images/$name-$key.ext4
  if [ -f "$cached" ]; then
    log "image $name: cached ($cached)"
  else
    log "image $name: building root tree with $(basename "$recipe")"
    work=$(mktemp -d "$cache/images/.work-$name.XXXXXX")
    # The recipe runs on a directory that does not exist yet (mmdebstrap
    # wants to create it itself).
    if ! "$recipe" "$work/root" > "$work/recipe.log" 2>&1; then
      tail -30 "$work/recipe.log" >&2
      rm -rf "$work"
      die "image $name: recipe failed (log above)"
    fi
    log "image $name: root tree $(du -sh "$work/root" | cut -f1), making ext4"
    make_ext4 "$work/root" "$work/image.ext4" "forkd-$name"
    mv -f "$work/image.ext4" "$cached"
    rm -rf "$work"
    # Older builds of the same image are superseded.
    find "$cache/images" -maxdepth 1 -name "$name-*.ext4" ! -name "$(basename "$cached")" -delete
  fi
  rel=images/$name.ext4
  if [ -f "$out/$rel" ] && [ "$(old_key "$rel")" = "$key" ]; then
    log "image $name: unchanged"
  else
    cp --sparse=always "$cached" "$out/images/.$name.ext4.tmp"
    mv -f "$out/images/.$name.ext4.tmp" "$out/$rel"
    log "image $name: $(du -h --apparent-size "$out/$rel" | cut -f1) -> $out/$rel"
  fi
  note_key "$rel" "$key"
done

# ---- 5. recipes ----------------------------------------------------------------
# The daemon builds derived images (`forkd image build`) from these copies, so
# it never needs the repository. Replaced only when they changed.
if ! diff -rq "$repo/guest/images" "$out/recipes" >/dev/null 2>&1; then
  rm -rf "$out/.recipes.tmp"
  mkdir -p "$out/.recipes.tmp"
  cp -p "$repo"/guest/images/*.sh "$out/.recipes.tmp/"
  rm -rf "$out/recipes"
  mv "$out/.recipes.tmp" "$out/recipes"
  log "recipes: -> $out/recipes"
fi

# ---- 6. manifest ---------------------------------------------------------------
log "manifest: hashing outputs"
python3 - "$out" "$tmp/keys" "$kver" "$(cat "$kdir/package")" \
  "$(cd "$repo" && sed -n 's/^version *= *"\(.*\)"/\1/p' Cargo.toml | head -1)" <<'PY'
import hashlib, json, os, sys, time

out, keys_file, kver, kpkg, agent_version = sys.argv[1:6]
path = os.path.join(out, "manifest.json")
try:
    old = json.load(open(path))
except Exception:
    old = {}
old_files = old.get("files", {})
keys = dict(line.split() for line in open(keys_file) if line.strip())
# How each image is run; the python image's snapshot is taken after these imports.
IMAGES = {"minimal": {"runtime": "", "warm": ""}, "python": {"runtime": "python", "warm": "numpy"}}

def sha256(p):
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

files = {}
for rel in ["vmlinux", "initramfs.img"] + ["images/%s.ext4" % n for n in IMAGES]:
    full = os.path.join(out, rel)
    if not os.path.isfile(full):
        continue
    prev = old_files.get(rel, {})
    key = keys.get(rel, prev.get("key", ""))
    size = os.path.getsize(full)
    if key and prev.get("key") == key and prev.get("size") == size and prev.get("sha256"):
        digest = prev["sha256"]  # same inputs as the last run: same bytes
    else:
        digest = sha256(full)
    files[rel] = {"sha256": digest, "size": size, "key": key}

manifest = {
    "format": 1,
    "built_unix": int(time.time()),
    "kernel": {"version": kver, "package": kpkg, "file": "vmlinux", "sha256": files["vmlinux"]["sha256"]},
    "initramfs": {"file": "initramfs.img", "sha256": files["initramfs.img"]["sha256"], "agent_version": agent_version},
    "images": {
        name: dict(meta, file="images/%s.ext4" % name, sha256=files["images/%s.ext4" % name]["sha256"])
        for name, meta in IMAGES.items()
        if "images/%s.ext4" % name in files
    },
    "files": files,
}
tmp = path + ".tmp"
with open(tmp, "w") as f:
    json.dump(manifest, f, indent=2, sort_keys=True)
    f.write("\n")
os.replace(tmp, path)
PY
log "done: $out ($(cd "$out" && ls images/*.ext4 2>/dev/null | tr '\n' ' '))"
