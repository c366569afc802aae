#!/usr/bin/env bash
# The GPU checks and benchmark, for one GPU machine: about 13 minutes on an H100 for the steps
# timed so far (`full profile20 tests` alone: about 5.5); more than one device call holds, so
# name steps; most important first,
# each step under its own time limit so a slow one cannot eat the rest. Leaves JSON results
# and one log in $OUT. Needs the project's Python packages (wandb is not: it is disabled).
#   OUT=/tmp/out MNIST_ROOT=/path/to/data bash bench/gpu_check.sh [STEP...]
# STEPs (default: all, in this order): speed full profile20 tests graphs_resume exact photos restart_group epoch_order tuning profile_large
# profile_steady quality pad20 check results.
# `results` (about 9 more minutes) trains the GPU-made runs of docs/results.md into $OUT/runs
# (bench/results.py); copy them into its --work folder and run `bench/results.py report`.
# MNIST_GZ=folder-with-MNIST/raw/*.gz unpacks a gzipped copy first (what travels to the
# project's device machine; see docs/performance.md).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
LOG="$OUT/gpu.log"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
if [[ -n "${MNIST_GZ:-}" ]]; then
    MNIST_ROOT=/tmp/mnist
    mkdir -p "$MNIST_ROOT/MNIST/raw"
    for f in "$MNIST_GZ"/MNIST/raw/*.gz; do gunzip -c "$f" >"$MNIST_ROOT/MNIST/raw/$(basename "$f" .gz)"; done
fi
export MNIST_ROOT=${MNIST_ROOT:-../shared/data}
WORK=$(mktemp -d)

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log it, carry on whatever happens
    local name=$1 limit=$2
    shift 2
    echo "== $name ($(date +%T), limit ${limit}s): $*" | tee -a "$LOG"
    timeout "$limit" "$@" >>"$LOG" 2>&1
    echo "== $name: exit $? at $(date +%T)" | tee -a "$LOG"
}
bench() {  # bench NAME SECONDS SECTIONS [ARGS...]
    local name=$1 limit=$2 sections=$3
    shift 3
    step "$name" "$limit" python bench/throughput.py --data "$MNIST_ROOT" --device cuda --sections "$sections" \
        --work "$WORK" --out "$WORK/$name.json" "$@"
    cp "$WORK/$name.json" "$OUT/" 2>/dev/null
    cat "$WORK/$name.md" >>"$LOG" 2>/dev/null
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >>"$LOG" 2>&1
python -c "import torch, accelerate; print('torch', torch.__version__, 'accelerate', accelerate.__version__)" >>"$LOG" 2>&1
STEPS="$*"
want() { [[ -z "$STEPS" || " $STEPS " == *" $1 "* ]]; }
want speed && bench speed 230 speed,scaling,floor
GRAPHS="perf.cuda_graphs=true perf.channels_last=false"
want full && bench full 200 full \
    --full "$GRAPHS" --full "$GRAPHS perf.cudnn_benchmark=true" --full "perf.cuda_graphs=true perf.cudnn_benchmark=true"
profile() {  # profile NAME SECONDS STEPS OVERRIDES...: the kernels of a step (bench/profile_step.py)
    local name=$1 limit=$2 steps=$3
    shift 3
    step "profile_$name" "$limit" python bench/profile_step.py --data "$MNIST_ROOT" --steps "$steps" \
        --out "$OUT/profile_$name.json" "$@"
}
if want profile20; then
    profile b20_eager 60 300 perf.channels_last=false
    profile b20_graphs 90 300 $GRAPHS perf.cudnn_benchmark=true
fi
want tests && step gpu_tests 300 python -m pytest -q -m gpu -p no:cacheprovider tests
# An eager checkpoint resumed under CUDA graphs: the optimizer must come back capturable
# (checkpoint.load keeps the run's own optimizer settings), or the capture fails.
want graphs_resume && step graphs_resume 120 bash -c "python train/main.py --config configs/debug.yaml \
    data.root=$MNIST_ROOT output_dir=$WORK/graphs_resume train.epochs=1 && python train/main.py \
    --config configs/debug.yaml data.root=$MNIST_ROOT output_dir=$WORK/graphs_resume train.epochs=2 $GRAPHS"
# train.exact_reduction on one GPU: its cost beside the default reduction, and fp16's loss
# scaler through the integer sums (4 micro-steps of 5 images per step), never run on a GPU yet.
want exact && step exact 240 bash -c "python bench/exact_reduction.py --data $MNIST_ROOT --device cuda \
    --processes 1 --per-device 20 --rounds 3 --steps 600 --out $OUT/exact_reduction.json && python train/main.py \
    --config configs/debug.yaml data.root=$MNIST_ROOT output_dir=$WORK/exact_fp16 train.exact_reduction=true \
    train.global_batch_size=20 train.per_device_batch_size=5 train.mixed_precision=fp16 train.max_steps=300"
# configs/images_gpu.yaml (colour, bf16, blind sigma) on made-up pictures for 300 steps, then a
# full-size denoise of a 1500x1100 picture in tiles: never run on a GPU yet.
want photos && step photos 240 bash -c "python -c \"import sys; sys.path.insert(0, 'tests'); from pathlib import Path; \
from conftest import write_pictures; w = Path('$WORK/pictures'); write_pictures(w / 'train', [(256, 320)] * 8); \
write_pictures(w / 'test', [(300, 200)] * 3, seed=1); write_pictures(w / 'big', [(1500, 1100)], seed=2)\" && \
    python train/main.py --config configs/images_gpu.yaml data.train_dir=$WORK/pictures/train \
    data.test_dir=$WORK/pictures/test output_dir=$WORK/photos train.max_steps=300 && python -m train.denoise \
    --checkpoint $WORK/photos --noise-sigma 25 --out $OUT/photos_denoised $WORK/pictures/big"
# NCCL's side of the group a worker of torchrun (and of accelerate launch) forms on the agent's
# store (train/distributed.py: maybe_join_restart_group), never run on a GPU before.
want restart_group && step restart_group 120 python -m torch.distributed.run --nproc-per-node=1 --max-restarts=1 \
    train/main.py --config configs/debug.yaml "data.root=$MNIST_ROOT" train.max_steps=50 "output_dir=$WORK/restart_group"
BEST="train.mixed_precision=bf16 perf.channels_last=true perf.cudnn_benchmark=true perf.compile=true perf.pad_thin_convs=true"
AUTOTUNE="perf.compile_mode=max-autotune-no-cudagraphs"
want epoch_order && step epoch_order 30 python bench/epoch_order.py --out "$OUT/epoch_order.json"  # host time (~5 s)
want tuning && bench tuning 240 tuning,floor --batch 16384 --tuning "$BEST" --tuning "$BEST $AUTOTUNE"
want profile_large && profile b16384 100 40 train.per_device_batch_size=16384 $BEST
if want profile_steady; then  # steady-state steps only, each kernel named with the layer that launched it
    LARGE="train.per_device_batch_size=16384 train.mixed_precision=bf16 perf.channels_last=true perf.cudnn_benchmark=true"
    profile steady_eager 80 6 --skip 8 $LARGE
    profile steady_compiled 120 6 --skip 12 $LARGE perf.compile=true
    profile steady_padded 120 6 --skip 12 $LARGE perf.compile=true perf.pad_thin_convs=true
fi
want quality && bench quality 70 quality --reference-ttq estimate
# Not yet measured: padded thin convs at batch 20 under a CUDA graph, the whole-run setting
# (fast_gpu.yaml's), against the same without them, side by side.
want pad20 && bench pad20 120 tuning --batch 20 --tuning "$GRAPHS perf.cudnn_benchmark=true" \
    --tuning "$GRAPHS perf.cudnn_benchmark=true perf.pad_thin_convs=true" \
    --tuning "perf.cuda_graphs=true perf.cudnn_benchmark=true perf.pad_thin_convs=true"
if want check; then
    step gpu_check 90 python bench/gpu_check.py --data-root "$MNIST_ROOT" --out "$WORK/gpu_check"
    cp "$WORK/gpu_check/gpu_check.json" "$OUT/" 2>/dev/null
    cat "$WORK/gpu_check/gpu_check.md" >>"$LOG" 2>/dev/null
fi
if want results; then
    results() {  # results NAME SECONDS [--set OVERRIDES...]
        local name=$1 limit=$2
        shift 2
        step "results_$name" "$limit" python bench/results.py --work "$OUT/runs" --data-root "$MNIST_ROOT" train "$name" "$@"
    }
    # The reference recipe as written (60,000 steps of batch 20), each step one CUDA graph.
    results reference_recipe 150 --set perf.cuda_graphs=true perf.channels_last=false
    results unet_levels 240  # ~7 ms per eager step (deterministic cuDNN at batch 32): ~2.5 minutes
    results unet_salt_pepper 240
    rm -rf "$OUT"/runs/*/checkpoints  # the report needs model.safetensors, config and metrics only
fi
echo "done $(date +%T)" | tee -a "$LOG"
