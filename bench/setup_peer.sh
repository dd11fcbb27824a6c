#!/usr/bin/env bash
# Installs the benchmark's peer: Triton Inference Server through nvidia-pytriton,
# in its own virtualenv (.bench/pytriton-venv) so that its pinned dependencies
# (numpy < 2 among them) never touch the project's .venv; and py-spy, the
# sampling profiler bench/profile.py attaches to the running server (a
# standalone binary: it needs nothing from the project). Idempotent: does
# nothing when the venv already works.
#
# The venv is made from the same base interpreter as .venv: PyTriton's
# Python-backend stub links against that interpreter's libpython (bench/peer.py
# puts its lib/ folder first on LD_LIBRARY_PATH at run time).
set -euo pipefail
cd "$(dirname "$0")/.."

PEER_VENV="${PEER_VENV:-.bench/pytriton-venv}"
PYTRITON_VERSION="${PYTRITON_VERSION:-0.7.0}"
PYSPY_VERSION="${PYSPY_VERSION:-0.4.3}"
STAMP="$PEER_VENV/.installed-$PYTRITON_VERSION-$PYSPY_VERSION"

if [[ -f "$STAMP" ]] && "$PEER_VENV/bin/python" -c "import pytriton, onnxruntime, numpy" 2>/dev/null \
    && test -x "$PEER_VENV/bin/py-spy"; then
    exit 0
fi

BASE_PY="$(.venv/bin/python -c 'import os, sys; print(os.path.join(sys.base_prefix, "bin", "python3"))')"
mkdir -p "$(dirname "$PEER_VENV")"
test -x "$PEER_VENV/bin/python" || "$BASE_PY" -m venv "$PEER_VENV"
# The same onnxruntime release as the server's, so that both run the same kernels.
ORT_VERSION="$(.venv/bin/python -c 'import onnxruntime; print(onnxruntime.__version__)')"
"$PEER_VENV/bin/python" -m pip install --quiet --upgrade pip
"$PEER_VENV/bin/python" -m pip install --quiet "nvidia-pytriton==$PYTRITON_VERSION" "onnxruntime==$ORT_VERSION" \
    "py-spy==$PYSPY_VERSION"
"$PEER_VENV/bin/python" -c "import onnxruntime; print('peer venv ready: nvidia-pytriton $PYTRITON_VERSION, onnxruntime', onnxruntime.__version__)"
touch "$STAMP"
