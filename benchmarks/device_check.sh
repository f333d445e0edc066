#!/usr/bin/env bash
# Issue 22's device check: one prepared run on a lent GPU machine, at most 6 minutes there
# (BUDGET seconds; each step gets what is left of it, at most its own limit, and the steps go in
# order of importance, so the first results survive whatever happens later):
#   0. a --like-metadata synthetic Adience at 256 px (the real users, folds and labels; never
#      real images) and its cache;
#   1. the K table: benchmarks/gpu_suite.py, K = 1, 2, 4, 8 folds at once x {eager, compiled}
#      x {fp32, bf16} at batch 50 and 227, each arm in a process of its own, rows as they come
#      (gpu_rows.jsonl), whether a step waits for the device;
#   2. the paper preset's fold 0 for 10k iterations in fp32 and in bf16 (compiled, at once):
#      their test accuracies decide train.precision's default (within one point, or fp32 stays);
#   3. benchmarks/projection.py: the paper suite's time from 1 and 2;
#   4. the loader ratio: benchmarks/train_throughput.py, the compiled step against its
#      model-only bound (target >= 0.95);
#   5. a short real suite through Prefect on cuda with suite.slots=4: its wall time against the
#      sum of its folds' training.
# Everything goes to $OUT (JSON, the log device_check.log, steps.jsonl: each step's exit and time).
#
# Here first:  benchmarks/device_wheels.sh        (Prefect, MLflow, pydantic: cp312 wheels, .whl)
#              mkdir -p .devdata && cp -r ../shared/adience/metadata .devdata/   (never committed)
#              (carried with the tree: 59 MiB of the 64 allowed, measured at this commit)
# There:       run(kind="nvidia-h200", command="OUT=$OUT bash benchmarks/device_check.sh",
#                  carry=[".whl", ".devdata/metadata"], timeout_s=420)
# What a budget cut left out runs next, on the same warm machine (the data stay in $WORK):
#              run(command="OUT=$OUT STEPS='ratio suite' bash benchmarks/device_check.sh", ...)
# A CPU smoke run here (tiny sizes, proves the script, measures nothing):
#              SMOKE=1 PY=.venv/bin/python bash benchmarks/device_check.sh
# Only some steps: STEPS="table folds" ... (names: table folds projection ratio suite).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/device-check}
PY=${PY:-python3}
WORK=${WORK:-/tmp/agegender-device}
SMOKE=${SMOKE:-0}
BUDGET=${BUDGET:-345}  # seconds for the whole script, the wheels' install included
STEPS=${STEPS:-table folds projection ratio suite}
mkdir -p "$OUT" "$WORK"
LOG="$OUT/device_check.log"
: >"$LOG"
: >"$OUT/steps.jsonl"
T0=$SECONDS
say() { echo "[$(date +%T) +$((SECONDS - T0))s] $*" | tee -a "$LOG"; }
wanted() { case " $STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
step() {  # step NAME LIMIT CMD...: bounded by LIMIT and by what is left of BUDGET; goes on after
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - (SECONDS - T0)))
    if [ "$left" -lt 15 ]; then
        say "== $name: skipped, ${left} s of the ${BUDGET} s budget left"
        echo "{\"step\": \"$name\", \"exit\": null, \"skipped\": \"budget\"}" >>"$OUT/steps.jsonl"
        return 1
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    say "== $name (limit ${limit} s)"
    local start=$SECONDS
    timeout --kill-after=5 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    say "== $name: exit $rc after $((SECONDS - start)) s"
    echo "{\"step\": \"$name\", \"exit\": $rc, \"seconds\": $((SECONDS - start))}" >>"$OUT/steps.jsonl"
    return "$rc"
}

if [ -d .whl ] && compgen -G ".whl/*.whl" >/dev/null; then
    say "installing $(ls .whl/*.whl | wc -l) carried wheels"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$WORK/site" .whl/*.whl 2>&1 | tail -3 | tee -a "$LOG"
    export PYTHONPATH="$WORK/site:$PWD"
else
    export PYTHONPATH="$PWD"
fi
# compiled code is cached on disk: the step compiles once per shape and precision, for all steps
export PYTHONUNBUFFERED=1 AGEGENDER_SYSTEM_METRICS=0 TORCHINDUCTOR_CACHE_DIR="$WORK/inductor"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$LOG"
fi
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())' |
    tee -a "$LOG"

if [ "$SMOKE" = 1 ]; then
    SIZE=56 CROP=48 ITERATIONS=12 DECAY=6 SYNTH=(--per-fold 30) DEVICE=cpu SUITE_IT=4 K=2
    TABLE=(--iterations 2 --warmup 5 --folds-at-once 1 2 --steps eager graph --precisions fp32)
    RATIO=(--iterations 2 --batch-size 8 --step graph)
    FOLD=(--step graph)
else
    SIZE=256 CROP=227 ITERATIONS=10000 DECAY=10000 DEVICE=cuda SUITE_IT=300 K=4
    SYNTH=(--like-metadata .devdata/metadata)
    TABLE=(--iterations 50 --warmup 6 --folds-at-once 1 2 4 8 --steps compiled eager
        --precisions bf16 fp32)
    RATIO=(--iterations 200 --batch-size 50 --step compiled)
    FOLD=(--step compiled)
fi

if [ -f "$WORK/data.done" ]; then  # a second call on the same warm machine
    say "data: kept from an earlier call in $WORK"
else
    step synth 90 "$PY" -m agegender.cli synth --out "$WORK/adience" --size "$SIZE" "${SYNTH[@]}"
    step cache 60 "$PY" -m agegender.cli prepare --data-root "$WORK/adience" --cache "$WORK/cache" \
        --image-size "$SIZE" && touch "$WORK/data.done"
fi

if wanted table; then
    step table 180 "$PY" benchmarks/gpu_suite.py --cache "$WORK/cache" --crop "$CROP" \
        --image-size "$SIZE" --check-sync --arm-timeout 120 --rows "$OUT/gpu_rows.jsonl" \
        --json "$OUT/gpu_suite.json" "${TABLE[@]}"
fi

if wanted folds; then  # fp32 and bf16 side by side on the one GPU: both finish in the window
    folds() {
        for p in fp32 bf16; do
            "$PY" benchmarks/convergence.py --cache "$WORK/cache" --crop "$CROP" \
                --image-size "$SIZE" --iterations "$ITERATIONS" --decay-every "$DECAY" \
                --device "$DEVICE" --precision "$p" "${FOLD[@]}" --json "$OUT/paper_$p.json" \
                >"$WORK/paper_$p.log" 2>&1 &
        done
        wait
        for p in fp32 bf16; do grep -v " epoch " "$WORK/paper_$p.log" | sed "s/^/[$p] /"; done
    }
    export -f folds
    export PY WORK CROP SIZE ITERATIONS DECAY DEVICE OUT
    export FOLD_ARGS="${FOLD[*]}"
    step folds 150 bash -c 'FOLD=($FOLD_ARGS); folds'
fi

if wanted projection && [ -f "$OUT/gpu_suite.json" ]; then
    step projection 20 "$PY" benchmarks/projection.py --suite "$OUT/gpu_suite.json" \
        --folds "$OUT"/paper_*.json --json "$OUT/projection.json"
fi

if wanted ratio; then
    step ratio 90 "$PY" benchmarks/train_throughput.py --cache "$WORK/cache" --crop "$CROP" \
        --image-size "$SIZE" "${RATIO[@]}"
fi

if wanted suite; then
    if "$PY" -c "import prefect, mlflow" 2>/dev/null; then
        export PREFECT_HOME="$WORK/prefect" MLFLOW_TRACKING_URI="sqlite:///$WORK/mlflow.db"
        TINY=(suite.variants="[multitask]" suite.folds="[0, 1, 2, 3]" suite.image_size="$SIZE"
            data.crop="$CROP" train.iterations="$SUITE_IT" train.device="$DEVICE"
            train.tencrop=false suite.register_champions=false)
        step suite 100 "$PY" -m flows.cli suite --cache "$WORK/cache" --run-root "$WORK/suite" \
            suite.slots="$K" suite.name=device-slots "${TINY[@]}"
        "$PY" benchmarks/suite_wall.py "$WORK/suite" "$OUT/steps.jsonl" "$OUT/suite_runs.json" 2>&1 | tee -a "$LOG"
    else
        say "suite through Prefect: skipped (prefect / mlflow not importable: carry benchmarks/device_wheels.sh's .whl)"
    fi
fi
say "done in $((SECONDS - T0)) s; figures in $OUT"
