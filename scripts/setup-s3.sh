#!/usr/bin/env bash
# Installs the S3 API server the remote tests (and bench/scripts/transfer.sh)
# run against: moto's server mode, from PyPI, in a venv of its own under
# $FORKD_CACHE_DIR/s3-venv. Prints the path of moto_server. Idempotent.
set -euo pipefail

cache_dir="${FORKD_CACHE_DIR:-/var/cache/forkd}"
venv="$cache_dir/s3-venv"
# Pinned: the tests depend on its S3 behaviour (multipart, listing).
moto_version="5.2.6"

mkdir -p "$cache_dir"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv" || { echo "setup-s3.sh: cannot create $venv (apt install python3-venv)" >&2; exit 1; }
fi
if ! "$venv/bin/python" -m pip show moto 2>/dev/null | grep -qx "Version: $moto_version"; then
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "moto[server]==$moto_version" \
    || { echo "setup-s3.sh: pip install moto[server]==$moto_version failed" >&2; exit 1; }
fi
"$venv/bin/moto_server" --help >/dev/null || { echo "setup-s3.sh: $venv/bin/moto_server does not run" >&2; exit 1; }
echo "$venv/bin/moto_server"
