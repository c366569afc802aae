#!/usr/bin/env bash
# GPU checks, for the device machine (under 5 minutes): installs the project, then runs
# bench/gpu_check.py and leaves its table in $OUT. Runs on a CPU-only machine too (GPU rows
# are then reported as skipped), which is how it is tested before spending GPU time.
#   OUT=/tmp/out MNIST_ROOT=/path/to/data bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
MNIST_ROOT=${MNIST_ROOT:-../shared/data}
python -m pip install --quiet -e . >/dev/null
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null | tee "$OUT/nvidia-smi.csv" || true
python bench/gpu_check.py --data-root "$MNIST_ROOT" --out "$OUT/gpu_check"
