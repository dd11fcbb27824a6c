#!/bin/sh
# The serving install, exactly as the images perform it (Dockerfile and
# Dockerfile.gpu run this script; tests/deploy runs it in a fresh venv):
#
#   install-serving.sh VENV LOCKFILE SOURCE EXTRA
#
# 1. a venv with the hash-locked closure of the serving dependencies (no
#    resolver decisions at build time, no sdists, nothing unpinned);
# 2. a wheel of svertka built from SOURCE (only this step may fetch the build
#    backend, setuptools, into an isolated build env that is thrown away);
# 3. `pip install --no-index 'svertka[EXTRA]'` from that wheel: with no index,
#    pip can only succeed if the locked set already satisfies every
#    requirement of the project and its extra, so a lock that drifted from
#    pyproject.toml fails the build instead of shipping;
# 4. pip check, and a refusal to ship torch: the serving image never needs it.
set -eu
if [ "$#" -ne 4 ]; then
    echo "usage: $0 VENV LOCKFILE SOURCE EXTRA" >&2
    exit 2
fi
venv=$1
lock=$2
src=$3
extra=$4
python=${PYTHON:-python3}

"$python" -m venv "$venv"
pip="$venv/bin/python -m pip --disable-pip-version-check --no-input"
$pip install --require-hashes --only-binary=:all: -r "$lock"
wheels=$(mktemp -d)
$pip wheel --no-deps --wheel-dir "$wheels" "$src"
$pip install --no-index --find-links "$wheels" "svertka[$extra]"
rm -rf "$wheels"
$pip check
if "$venv/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)"; then
    echo "install-serving: torch ended up in the serving environment" >&2
    exit 1
fi
# Compile bytecode now: the container's root filesystem is read-only at run time.
"$venv/bin/python" -m compileall -q "$venv/lib" >/dev/null
