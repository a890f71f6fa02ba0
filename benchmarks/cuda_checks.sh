#!/usr/bin/env bash
# The CUDA checks in one run, for a machine with a GPU and the package installed, in
# order of importance, ending by a deadline (one command on a lent GPU machine may run
# 600 s at most, and the machine's start counts against its time too):
#   1. the cuda-marked tests (python -m pytest -m cuda);
#   2. the pre-pass alone on CPU and CUDA (pinned staging vs plain copies), per size;
#   3. the end-to-end benchmark with --cuda (metagpt vs task_arithmetic), per size, with
#      as many runs (up to RUNS) as the time left allows, at PROC_S seconds per
#      mergekit process (one warm-up and three processes per run).
# Each step runs under `timeout` to the deadline (DEADLINE_S seconds after this script
# starts); what is skipped or stopped is printed and listed in $OUT/summary.txt.
# Logs go to $OUT (default /tmp/cuda-checks). Settings (environment): SIZES (default
# 100m,1b), RUNS (3), DEADLINE_S (360: with the machine's start and the install, a lent
# GPU's 15 minutes then leave room for a rerun), PROC_S (20), PY (python3).
# On the lent GPU machine (no network): prepare the wheels here with
# `bash benchmarks/cuda_wheels.sh`, then run, carrying `.whl`,
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl && bash benchmarks/cuda_checks.sh
# (installed into that Python's own site-packages, so the start-up hook's .pth runs).
# Exit status: 1 if a step failed (the tests included, also when stopped at the
# deadline); a benchmark stopped or skipped at the deadline is reported, not a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
OUT=${OUT:-/tmp/cuda-checks}
SIZES=${SIZES:-100m,1b}
RUNS=${RUNS:-3}
DEADLINE_S=${DEADLINE_S:-360}
PROC_S=${PROC_S:-20}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
IFS=, read -r -a SIZE_LIST <<< "$SIZES"
rc=0
notes=()

left() { echo $((START + DEADLINE_S - $(date +%s))); }
elapsed() { echo $(($(date +%s) - START)); }
note() { echo "== $*"; notes+=("$*"); }

# run_step NAME LOG MIN_S FATAL COMMAND...: COMMAND under timeout to the deadline, its
# output to the terminal and to $OUT/LOG (appended); skipped when under MIN_S seconds are
# left. A failure fails the script; with FATAL=1 a skip or a stop at the deadline too.
run_step() {
    local name=$1 log=$2 min_s=$3 fatal=$4
    shift 4
    local budget
    budget=$(left)
    if ((budget < min_s)); then
        note "SKIPPED $name: ${budget}s left before the deadline, needs ${min_s}s"
        ((fatal)) && rc=1
        return 0
    fi
    echo "== $name (at $(elapsed)s, ${budget}s to the deadline): $*" | tee -a "$OUT/$log"
    timeout -k 15 "$budget" "$@" 2>&1 | tee -a "$OUT/$log"
    local status=${PIPESTATUS[0]}
    if ((status == 124 || status == 137)); then
        note "STOPPED $name at the deadline (${DEADLINE_S}s), after $(elapsed)s; partial output in $OUT/$log"
        ((fatal)) && rc=1
    elif ((status != 0)); then
        note "FAILED $name (exit $status); see $OUT/$log"
        rc=1
    else
        echo "== done: $name (at $(elapsed)s)" | tee -a "$OUT/summary.txt"
    fi
}

: > "$OUT/summary.txt"
echo "deadline ${DEADLINE_S}s; sizes ${SIZES}; up to ${RUNS} runs" | tee -a "$OUT/summary.txt"
if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
fi
run_step "environment" gpu.txt 30 0 "$PY" - <<'PY'
import os, torch, mergekit.merge_methods as mm
print("metagpt registered by the hook:", mm.get("metagpt"))  # raises where the hook did not run
print("torch", torch.__version__, "cpus", os.cpu_count(), "cuda", torch.cuda.is_available() and torch.cuda.get_device_name(0))
assert torch.cuda.is_available(), "torch finds no CUDA device"
PY
if ((rc)); then  # nothing below can pass: stop before spending the machine's time
    why="mergekit or torch fails to import; metagpt not registered (the package not installed,"
    why+=" or installed with --target, whose .pth hook Python does not run: see cuda_wheels.sh);"
    why+=" or torch finds no CUDA device"
    echo "environment check failed (the end of $OUT/gpu.txt says which): $why" | tee -a "$OUT/summary.txt"
    exit 1
fi

# 1. the tests first: they are what a GPU run is for
run_step "pytest -m cuda" pytest-cuda.txt 60 1 \
    "$PY" -m pytest -m cuda -q -rs -p no:cacheprovider --durations=10 tests

# 2. the pre-pass alone, one size at a time (each prints its own table)
for size in "${SIZE_LIST[@]}"; do
    run_step "prepass.py $size" prepass.txt 45 0 \
        "$PY" benchmarks/prepass.py --sizes "$size" --devices cpu,cuda --runs "$RUNS"
done

# 3. end to end, one size at a time, as many runs as fit in the size's share of the time left
count=${#SIZE_LIST[@]}
for index in "${!SIZE_LIST[@]}"; do
    size=${SIZE_LIST[$index]}
    share=$(($(left) / (count - index)))
    runs=$(((share / PROC_S - 1) / 3))
    ((runs > RUNS)) && runs=$RUNS
    if ((runs < 1)); then
        note "SKIPPED run.py $size: $(left)s left before the deadline (share ${share}s), one run needs about $((4 * PROC_S))s"
        continue
    fi
    ((runs < RUNS)) && note "run.py $size: $runs of $RUNS runs fit before the deadline"
    run_step "run.py $size ($runs runs)" run-cuda.txt $((4 * PROC_S)) 0 \
        "$PY" benchmarks/run.py --sizes "$size" --runs "$runs" --cuda
done

echo "== finished in $(elapsed)s (deadline ${DEADLINE_S}s), exit $rc" | tee -a "$OUT/summary.txt"
if ((${#notes[@]})); then
    printf 'not done as planned:\n' | tee -a "$OUT/summary.txt"
    printf '  %s\n' "${notes[@]}" | tee -a "$OUT/summary.txt"
fi
exit $rc
