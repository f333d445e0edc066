#!/usr/bin/env bash
# The convergence check on a lent GPU machine (its image: Python 3.12, torch, no pydantic):
#   run in the repo root with .whl/ (pydantic and its needs, cp312 wheels) and .devdata/metadata
#   (a copy of the real Adience fold files, never committed) carried; figures go to $OUT.
# Trains fold 0 of a --like-metadata synthetic Adience at 227/256 with the paper preset for
# ITERATIONS steps (default 12k: past the first lr step at 10k), the std-normalised variant at
# the same budget, and two short deterministic runs.
set -euo pipefail
OUT=${OUT:-runs/device}
ITERATIONS=${ITERATIONS:-12000}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 benchmarks/convergence.py --metadata .devdata/metadata --iterations "$ITERATIONS" \
    --compare std --determinism 300 --json "$OUT/convergence.json" 2>&1 | tee "$OUT/convergence.log"
