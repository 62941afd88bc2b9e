#!/usr/bin/env bash
# Regenerates the language clients' generated code from proto/:
#   clients/python/src/forkd/_gen/      grpcio-tools (messages, .pyi stubs, gRPC stubs)
#   clients/typescript/src/gen/         buf + protoc-gen-es (messages and service descriptors)
#
#   scripts/gen-clients.sh            rewrite the committed generated files
#   scripts/gen-clients.sh --check    generate into a temp dir and fail, naming
#                                     each file, when a committed one is stale
#
# The generators are pinned (clients/python/requirements-gen.txt and
# clients/typescript/package-lock.json) because their output embeds their
# version: an unpinned generator would make --check fail on every upgrade.
#
# Python: FORKD_PYTHON names an interpreter that has grpcio-tools (default:
# the venv scripts/test-clients.sh builds, else python3).
# TypeScript: needs clients/typescript/node_modules (npm ci).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

check=0
langs="python typescript"
for arg in "$@"; do
  case "$arg" in
    --check) check=1 ;;
    --python-only) langs="python" ;;
    --typescript-only) langs="typescript" ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "gen-clients.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done

cache_dir="${FORKD_CACHE_DIR:-/var/cache/forkd}"
python="${FORKD_PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x "$cache_dir/venv/bin/python" ]; then python="$cache_dir/venv/bin/python"; else python=python3; fi
fi

# The public API and the HTTP annotations it imports; proto/forkd/agent is the
# host <-> guest protocol, which no client speaks.
protos=(proto/forkd/v1/*.proto proto/google/api/*.proto)

# gen_python OUT: writes the package tree forkd/_gen under OUT.
gen_python() {
  local out="$1/_gen"
  local want
  want=$(sed -n 's/^grpcio-tools==//p' "$root/clients/python/requirements-gen.txt")
  local have
  have=$("$python" -c 'import importlib.metadata as m; print(m.version("grpcio-tools"))' 2>/dev/null || true)
  if [ "$have" != "$want" ]; then
    echo "gen-clients.sh: $python has grpcio-tools ${have:-none}, need $want (pip install -r clients/python/requirements-gen.txt)" >&2
    return 1
  fi
  mkdir -p "$out"
  "$python" -m grpc_tools.protoc -I proto \
    --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
    "${protos[@]}"
  # protoc writes absolute imports (`from forkd.v1 import common_pb2`) that
  # would resolve against the top-level `forkd` package and against any
  # installed googleapis `google.api`; point them at the private copies.
  find "$out" -name '*.py' -o -name '*.pyi' | while read -r f; do
    sed -i -E \
      -e 's/^from forkd\.v1 import /from forkd._gen.forkd.v1 import /' \
      -e 's/^from google\.api import /from forkd._gen.google.api import /' \
      -e 's/^import forkd\.v1\./import forkd._gen.forkd.v1./' \
      "$f"
  done
  for d in "$out" "$out/forkd" "$out/forkd/v1" "$out/google" "$out/google/api"; do
    printf '"""Generated from proto/ by scripts/gen-clients.sh; do not edit."""\n' > "$d/__init__.py"
  done
}

# gen_typescript OUT: writes src/gen under OUT.
gen_typescript() {
  local ts="$root/clients/typescript"
  if [ ! -x "$ts/node_modules/.bin/buf" ] || [ ! -x "$ts/node_modules/.bin/protoc-gen-es" ]; then
    echo "gen-clients.sh: run 'npm ci' in clients/typescript first" >&2
    return 1
  fi
  (cd "$ts" && PATH="$ts/node_modules/.bin:$PATH" buf generate "$root/proto" \
    --path "$root/proto/forkd/v1" --path "$root/proto/google/api" \
    --template buf.gen.yaml --output "$1")
}

if [ "$check" = 0 ]; then
  for lang in $langs; do
    case "$lang" in
      python)
        tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
        gen_python "$tmp"
        rm -rf clients/python/src/forkd/_gen
        cp -r "$tmp/_gen" clients/python/src/forkd/_gen
        rm -rf "$tmp"; trap - EXIT
        echo "gen-clients.sh: wrote clients/python/src/forkd/_gen"
        ;;
      typescript)
        rm -rf clients/typescript/src/gen
        gen_typescript "$root/clients/typescript"
        echo "gen-clients.sh: wrote clients/typescript/src/gen"
        ;;
    esac
  done
  exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
stale=0
# compare FRESH COMMITTED: names every file that differs, is missing or is extra.
compare() {
  local fresh="$1" committed="$2" f
  while read -r f; do
    if [ ! -f "$committed/$f" ]; then
      echo "stale: $committed/$f is missing"; stale=1
    elif ! cmp -s "$fresh/$f" "$committed/$f"; then
      echo "stale: $committed/$f differs from what proto/ generates"; stale=1
    fi
  done < <(cd "$fresh" && find . -type f -not -path '*/__pycache__/*' | sed 's|^\./||' | sort)
  if [ -d "$committed" ]; then
    while read -r f; do
      if [ ! -f "$fresh/$f" ]; then
        echo "stale: $committed/$f is not generated from proto/ any more"; stale=1
      fi
    done < <(cd "$committed" && find . -type f -not -path '*/__pycache__/*' -not -name '*.pyc' | sed 's|^\./||' | sort)
  fi
}
for lang in $langs; do
  case "$lang" in
    python)
      mkdir -p "$tmp/py"
      gen_python "$tmp/py"
      compare "$tmp/py/_gen" clients/python/src/forkd/_gen
      ;;
    typescript)
      mkdir -p "$tmp/ts"
      gen_typescript "$tmp/ts"
      compare "$tmp/ts/src/gen" clients/typescript/src/gen
      ;;
  esac
done
if [ "$stale" != 0 ]; then
  echo "gen-clients.sh: generated client code is stale; run scripts/gen-clients.sh" >&2
  exit 1
fi
echo "gen-clients.sh: generated client code is up to date ($langs)"
