#!/usr/bin/env bash
# Set up (first run only), lint (ruff), type-check (mypy) and run every test suite: engine, training, golden model, benchmark
# machinery, Slicer logic on real MRML (slicer-core) and the headless panel.
# Real data is read from ../shared/data (or $UNETSEG_DATA); tests that need it skip, saying why,
# when it is absent. GPU tests skip without CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export QT_QPA_PLATFORM=offscreen
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
.venv/bin/ruff check --quiet SlicerUNetSeg Testing scripts
.venv/bin/mypy  # the configuration is in pyproject.toml ([tool.mypy])
exec .venv/bin/python -m pytest -ra "$@"
