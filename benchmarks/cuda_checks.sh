#!/usr/bin/env bash
# The CUDA checks in one run, for a machine with a GPU and the package installed:
# the cuda-marked tests, the end-to-end benchmark with --cuda (metagpt vs task_arithmetic),
# and the pre-pass alone on CPU and CUDA (pinned staging vs plain copies).
# Logs go to $OUT (default /tmp/cuda-checks); sizes with SIZES (default 100m,1b).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/cuda-checks}
SIZES=${SIZES:-100m,1b}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
python3 - <<'PY' 2>&1 | tee -a "$OUT/gpu.txt"
import os, torch, mergekit.merge_methods as mm
print("metagpt registered by the hook:", mm.get("metagpt"))
print("torch", torch.__version__, "cpus", os.cpu_count(), "cuda", torch.cuda.is_available() and torch.cuda.get_device_name(0))
PY
rc=0
python3 -m pytest -m cuda -q -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest-cuda.txt" || rc=1
python3 benchmarks/run.py --sizes "$SIZES" --runs 3 --cuda 2>&1 | tee "$OUT/run-cuda.txt" || rc=1
python3 benchmarks/prepass.py --sizes "$SIZES" --devices cpu,cuda --runs 3 2>&1 | tee "$OUT/prepass.txt" || rc=1
exit $rc
