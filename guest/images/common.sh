# Shared by the image recipes: files every forkd root needs. Sourced with
# $root set to the directory being populated.

forkd_base_files() {
  local root=$1
  mkdir -p "$root"/{proc,sys,dev,run,tmp,root,etc,mnt,var/tmp}
  chmod 1777 "$root/tmp" "$root/var/tmp"
  chmod 0700 "$root/root"
  echo forkd > "$root/etc/hostname"
  printf '127.0.0.1\tlocalhost\n127.0.1.1\tforkd\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' > "$root/etc/hosts"
  # No network by default; Reinit writes a real one when a sandbox gets one.
  : > "$root/etc/resolv.conf"
}

# Documentation, manuals and translations are dead weight in a sandbox image.
FORKD_DPKG_OPTS=(
  --dpkgopt='path-exclude=/usr/share/man/*'
  --dpkgopt='path-exclude=/usr/share/doc/*'
  --dpkgopt='path-include=/usr/share/doc/*/copyright'
  --dpkgopt='path-exclude=/usr/share/locale/*'
  --dpkgopt='path-exclude=/usr/share/info/*'
)
