#!/usr/bin/env bash
# Create .venv (if needed) and install the engine, its command line and the test tools into it.
# PyTorch is installed first as torch==2.13.0: on this project's machines that is a local CPU build;
# elsewhere pip takes the official wheel (CUDA on Linux). Safe to run again: it only adds what's missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "torch==2.13.0"
fi
# "fast": OpenVINO and ONNX Runtime, the faster CPU runtimes (``unetseg segment --runtime``)
# "cluster": Dask distributed, for ``unetseg batch --cluster``
# Keep the installed PyTorch: without this pin, a newer torchvision (which timm, a test dependency,
# asks for) makes pip replace it with a newer CUDA build of several GB (seen on 2026-12-02).
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
.venv/bin/python -c "import torch; print('torch==' + torch.__version__)" > "$constraints"
.venv/bin/python -m pip install -q -c "$constraints" -e ".[test,fast,int8,server,cluster]"
