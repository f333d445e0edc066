#!/usr/bin/env bash
# Issue 15's device check, one prepared run on a lent GPU machine (<= 8 minutes there):
#   1. a --like-metadata synthetic Adience at 256 px (the real users, folds and labels; never
#      real images) and its cache;
#   2. benchmarks/gpu_suite.py on it: K = 1, 2, 4, 8 folds at once at batch 50 and 227 (threads,
#      and fold-batched), fp32 and bf16, the FLOP bound, the projected paper suite, and whether a
#      step waits for the device;
#   3. benchmarks/train_throughput.py at batch 50: the loader ratio (target >= 0.95);
#   4. fold 0 with the paper preset for ITERATIONS steps (10k), its validation curve;
#   5. a tiny suite through Prefect with folds on cuda: in-process slots (4 folds at once), and
#      through a process worker where the stack can start there (it needs SeaweedFS's binary).
# Figures go to $OUT as JSON, with the whole log (device_check.log).
#
# Here first:  benchmarks/device_wheels.sh        (Prefect, MLflow, pydantic: cp312 wheels, .whl)
#              mkdir -p .devdata && cp -r ../shared/adience/metadata .devdata/   (never committed)
# There:       run(command="OUT=$OUT bash benchmarks/device_check.sh", carry=[".whl", ".devdata/metadata"])
# A CPU smoke run here: SMOKE=1 PY=.venv/bin/python bash benchmarks/device_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/device-check}
PY=${PY:-python3}
ITERATIONS=${ITERATIONS:-10000}
WORK=${WORK:-/tmp/agegender-device}
SMOKE=${SMOKE:-0}
mkdir -p "$OUT" "$WORK"
LOG="$OUT/device_check.log"
: >"$LOG"
say() { echo "[$(date +%T)] $*" | tee -a "$LOG"; }
step() {  # step NAME SECONDS CMD...: run it bounded, keep its output, go on when it fails
    local name=$1 limit=$2
    shift 2
    say "== $name (limit ${limit} s)"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    say "== $name: exit $rc after $((SECONDS - start)) s"
    echo "{\"step\": \"$name\", \"exit\": $rc, \"seconds\": $((SECONDS - start))}" >>"$OUT/steps.jsonl"
}

if [ -d .whl ] && compgen -G ".whl/*.whl" >/dev/null; then
    say "installing $(ls .whl/*.whl | wc -l) carried wheels"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$WORK/site" .whl/*.whl 2>&1 | tail -3 | tee -a "$LOG"
    export PYTHONPATH="$WORK/site:$PWD"
else
    export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1 AGEGENDER_SYSTEM_METRICS=0
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$LOG"
fi
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())' |
    tee -a "$LOG"

if [ "$SMOKE" = 1 ]; then  # tiny sizes: proves the script, measures nothing
    SIZE=56 CROP=48 ITERATIONS=20 BENCH=(--iterations 3 --warmup 1 --folds-at-once 1 2)
    SYNTH=(--per-fold 30) SUITE_IT=4 DEVICE=cpu
else
    SIZE=256 CROP=227 BENCH=() SYNTH=(--like-metadata .devdata/metadata) SUITE_IT=200 DEVICE=cuda
fi

step synth 180 "$PY" -m agegender.cli synth --out "$WORK/adience" --size "$SIZE" "${SYNTH[@]}"
step cache 180 "$PY" -m agegender.cli prepare --data-root "$WORK/adience" --cache "$WORK/cache" \
    --image-size "$SIZE"

step gpu_suite_fp32 180 "$PY" benchmarks/gpu_suite.py --cache "$WORK/cache" --crop "$CROP" \
    --image-size "$SIZE" --check-sync --fold-batch --json "$OUT/gpu_suite_fp32.json" "${BENCH[@]}"
step gpu_suite_bf16 120 "$PY" benchmarks/gpu_suite.py --cache "$WORK/cache" --crop "$CROP" \
    --image-size "$SIZE" --bf16 --json "$OUT/gpu_suite_bf16.json" --folds-at-once 1 8 "${BENCH[@]}"
step loader_ratio 60 "$PY" benchmarks/train_throughput.py --crop "$CROP" --image-size "$SIZE" \
    --batch-size 50 --iterations "$([ "$SMOKE" = 1 ] && echo 2 || echo 50)"
step paper_fold0 240 "$PY" benchmarks/convergence.py --cache "$WORK/cache" --crop "$CROP" \
    --image-size "$SIZE" --iterations "$ITERATIONS" --json "$OUT/paper_fold0.json"

if "$PY" -c "import prefect, mlflow" 2>/dev/null; then
    export PREFECT_HOME="$WORK/prefect" MLFLOW_TRACKING_URI="sqlite:///$WORK/mlflow.db"
    TINY=(suite.variants="[multitask, age]" suite.folds="[0, 1]" suite.image_size="$SIZE"
        data.crop="$CROP" train.iterations="$SUITE_IT" train.device="$DEVICE" train.tencrop=false)
    step suite_slots 150 "$PY" -m flows.cli suite --cache "$WORK/cache" \
        --run-root "$WORK/suite" suite.slots=4 suite.name=device-slots "${TINY[@]}"
    if command -v weed >/dev/null; then
        unset MLFLOW_TRACKING_URI
        step stack_up 120 "$PY" -m flows.cli stack up --run-dir "$WORK/stack"
        eval "$("$PY" -m flows.cli stack env --run-dir "$WORK/stack")"
        step suite_worker 150 "$PY" -m flows.cli suite --cache "$WORK/cache" \
            --run-root "$WORK/suite-worker" suite.mode=deployments suite.name=device-worker \
            "${TINY[@]}"
        "$PY" -m flows.cli stack down --run-dir "$WORK/stack" 2>&1 | tee -a "$LOG"
    else
        say "process worker: skipped (no SeaweedFS binary 'weed' here for the stack's S3)"
    fi
    "$PY" - "$WORK" "$OUT/suite_runs.json" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
from pathlib import Path
runs = []
for result in sorted(Path(sys.argv[1]).glob("suite*/*/*/fold*/result.json")):
    r = json.loads(result.read_text())
    runs.append({"run": str(result.parent), "device": r["device"], "seconds": r["seconds"],
                 "iterations": r["iterations"], "test": {k: v for k, v in r["test"].items()
                                                         if isinstance(v, float)}})
    print(f"{result.parent}: {r['device']}, {r['iterations']} iterations, {r['seconds']:.0f} s")
Path(sys.argv[2]).write_text(json.dumps(runs, indent=1))
EOF
else
    say "suite through Prefect: skipped (prefect / mlflow not importable: carry benchmarks/device_wheels.sh's .whl)"
fi
say "done; figures in $OUT"
