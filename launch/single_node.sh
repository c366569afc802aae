#!/usr/bin/env bash
# Run train/main.py on this node: one process per GPU, or CPU processes where there is none.
#   launch/single_node.sh --config configs/default.yaml data.root=/data    # all GPUs here
#   NGPU=2 MIXED_PRECISION=bf16 launch/single_node.sh                      # 2 GPUs, bf16
#   NPROC_CPU=2 launch/single_node.sh train.global_batch_size=20          # no GPU: 2 gloo processes
# Arguments pass through to train/main.py. slurm/denoise.sh sets the multi-node variables.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)  # paths in the arguments stay relative to where you are

NUM_MACHINES=${NUM_MACHINES:-1}           # nodes in the job
MACHINE_RANK=${MACHINE_RANK:-0}           # this node's index, 0..NUM_MACHINES-1
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}     # address of machine rank 0
MASTER_PORT=${MASTER_PORT:-29500}         # rendezvous port on MASTER_ADDR
MIXED_PRECISION=${MIXED_PRECISION:-no}    # no | bf16 | fp16 (or set train.mixed_precision)
PYTHON=${PYTHON:-python}
fail() { echo "[launch] error: $*" >&2; exit 2; }
whole() { [[ "$2" =~ ^[0-9]+$ ]] && [ "$2" -ge "$3" ] || fail "$1=$2 must be a whole number >= $3"; }
whole NUM_MACHINES "$NUM_MACHINES" 1
whole MACHINE_RANK "$MACHINE_RANK" 0
[ "$MACHINE_RANK" -lt "$NUM_MACHINES" ] || fail "MACHINE_RANK=$MACHINE_RANK must be below NUM_MACHINES=$NUM_MACHINES"
# The GPUs this job may use: those it was given (CUDA_VISIBLE_DEVICES, SLURM's count), not all
# that nvidia-smi lists on a shared node.
FOUND=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
    GIVEN=$(tr ',' '\n' <<< "$CUDA_VISIBLE_DEVICES" | grep -c '^[^-]' || true)  # "" or -1: none
elif [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
    GIVEN=$SLURM_GPUS_ON_NODE
else
    GIVEN=$FOUND
fi
VISIBLE=$(( GIVEN < FOUND ? GIVEN : FOUND ))
if [ -z "${NGPU:-}" ]; then
    NGPU=$VISIBLE
fi
whole NGPU "$NGPU" 0
[ "$NGPU" -le "$VISIBLE" ] || fail "NGPU=$NGPU, but this job can use $VISIBLE GPU(s) here (nvidia-smi lists $FOUND): set NGPU to at most $VISIBLE, or NGPU=0 for CPU processes (NPROC_CPU)"

if [ "$NGPU" -gt 0 ]; then
    NPROC=$NGPU
    if [ "$NUM_MACHINES" -gt 1 ]; then CONFIG=multi_node; elif [ "$NGPU" -gt 1 ]; then CONFIG=multi_gpu; else CONFIG=single_gpu; fi
else
    NPROC=${NPROC_CPU:-1}
    whole NPROC_CPU "$NPROC" 1
    CONFIG=cpu
    export ACCELERATE_USE_CPU=true  # without it, CPU processes would each see a world of 1
fi
WORLD=$((NPROC * NUM_MACHINES))
# torchrun (inside accelerate launch) forwards only TERM/INT/HUP/QUIT to the training
# processes unless told otherwise; SLURM's early warning is USR1.
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
# NCCL errors raise into Python, so the ranks that live record the lost peer (train/distributed.py
# sets the same for launchers other than this one).
export TORCH_NCCL_ASYNC_ERROR_HANDLING=2

echo "[launch] $(hostname -s) machine_rank=$MACHINE_RANK of $NUM_MACHINES: $NPROC process(es) here, world $WORLD, $( [ "$NGPU" -gt 0 ] && echo "$NGPU GPU(s)" || echo CPU ), rendezvous $MASTER_ADDR:$MASTER_PORT"

if [ "$WORLD" -eq 1 ]; then
    # One process: no launcher in between (accelerate's single-process launcher does not
    # forward signals), so SIGTERM/SIGUSR1 reach training directly.
    export ACCELERATE_MIXED_PRECISION=$MIXED_PRECISION
    exec "$PYTHON" "$REPO/train/main.py" "$@"
fi
exec "$PYTHON" -m accelerate.commands.launch --config_file "$REPO/configs/accelerate/$CONFIG.yaml" --multi_gpu \
    --num_machines "$NUM_MACHINES" --num_processes "$WORLD" --machine_rank "$MACHINE_RANK" \
    --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" \
    --mixed_precision "$MIXED_PRECISION" --dynamo_backend no \
    "$REPO/train/main.py" "$@"
