#!/usr/bin/env bash
# Train on a SLURM allocation: one task per node, each running launch/single_node.sh for that
# node's GPUs (or CPUs). Preempted or out of time, the job checkpoints and requeues itself.
# Submit from the repository root (SLURM runs a copy of this script, so it finds the
# repository as the submit folder, or $DENOISE_REPO):
#   sbatch slurm/denoise.sh --config configs/default.yaml data.root=/shared/mnist
#   sbatch --nodes=4 --gpus-per-node=8 slurm/denoise.sh output_dir=/shared/runs/big
# Settings: #SBATCH lines below (or sbatch flags), and these environment variables:
#   OUTPUT_DIR (or an output_dir=... argument), MIXED_PRECISION, NGPU, NPROC_CPU,
#   MASTER_PORT, MAX_REQUEUES (default 5), PYTHON.
#SBATCH --job-name=denoise
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --signal=USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
# Edit for your cluster:
##SBATCH --partition=gpu
##SBATCH --account=myproject
##SBATCH --gpus-per-node=8
#
# --signal=USR1@180: SLURM sends USR1 to the job *steps* (srun -> launcher -> training) 3
# minutes before the time limit (up to ~30 s earlier); training finishes its step, saves a
# checkpoint, records "preempted" in status.json, and this script requeues the job.
set -uo pipefail
cd "${SLURM_SUBMIT_DIR:-$(pwd)}"
REPO=${DENOISE_REPO:-$(pwd)}
[ -x "$REPO/launch/single_node.sh" ] || { echo "[slurm] error: $REPO/launch/single_node.sh not found: submit from the repository root or set DENOISE_REPO" >&2; exit 2; }

PREEMPTED_EXIT=75
OUTPUT_DIR=${OUTPUT_DIR:-outputs/${SLURM_JOB_NAME:-denoise}}
for arg in "$@"; do
    case "$arg" in output_dir=*) OUTPUT_DIR=${arg#output_dir=} ;; esac
done
MAX_REQUEUES=${MAX_REQUEUES:-5}
RESTARTS=${SLURM_RESTART_COUNT:-0}
NODES=${SLURM_JOB_NUM_NODES:-1}
FIRST_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# The node's address as SLURM knows it (its name, unless the cluster sets NodeAddr).
MASTER_ADDR=${MASTER_ADDR:-$(scontrol show node "$FIRST_NODE" | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)}
MASTER_ADDR=${MASTER_ADDR:-$FIRST_NODE}
MASTER_PORT=${MASTER_PORT:-$((15000 + SLURM_JOB_ID % 20000))}  # per job: jobs sharing a node don't collide
export NUM_MACHINES=$NODES MASTER_ADDR MASTER_PORT
# Training records this job's outcome here (the launcher's exit status cannot tell "preempted"),
# from the first line on, config errors included; OUTPUT_DIR/status.json keeps the run's own
# record, which a job refused at start-up must not touch.
export DENOISE_STATUS_FILE=$OUTPUT_DIR/.status-job$SLURM_JOB_ID.json
mkdir -p "$OUTPUT_DIR"
rm -f "$DENOISE_STATUS_FILE"

echo "[slurm] job $SLURM_JOB_ID run $((RESTARTS + 1)) on $NODES node(s) ($SLURM_JOB_NODELIST)," \
     "rendezvous $MASTER_ADDR:$MASTER_PORT, output $OUTPUT_DIR"

# SLURM_NODEID must be read inside each task (in this shell it is the first node's).
srun --kill-on-bad-exit=1 --nodes="$NODES" --ntasks-per-node=1 \
    bash -c 'MACHINE_RANK=$SLURM_NODEID exec "$0" "$@"' "$REPO/launch/single_node.sh" output_dir="$OUTPUT_DIR" "$@" &
step=$!
# A signal to this shell (e.g. SIGTERM at the time limit) must not stop us from reading the outcome.
trap 'echo "[slurm] batch shell got a signal; waiting for training to checkpoint"' TERM USR1
while true; do
    wait "$step"
    rc=$?
    kill -0 "$step" 2>/dev/null || break  # wait returned because of a trapped signal: wait again
done

read -r outcome code < <("${PYTHON:-python}" -c 'import json,sys; s=json.load(open(sys.argv[1])); print(s["outcome"], s["exit_code"])' \
    "$DENOISE_STATUS_FILE" 2>/dev/null || echo missing 1)
rm -f "$DENOISE_STATUS_FILE"
echo "[slurm] training ended: $outcome (srun status $rc)"
case "$outcome" in
    completed)
        exit 0 ;;
    preempted)
        if [ "$RESTARTS" -ge "$MAX_REQUEUES" ]; then
            echo "[slurm] not requeued: already requeued $RESTARTS times (MAX_REQUEUES=$MAX_REQUEUES)"
            exit "$PREEMPTED_EXIT"
        fi
        echo "[slurm] requeueing job $SLURM_JOB_ID to resume from its checkpoint"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0 ;;
    failed)
        exit "$code" ;;
    *)  # no status, or still "running": killed (OOM, node failure) - not requeued
        echo "[slurm] training ended without recording an outcome: not requeued"
        # Every rank has ended, so a "running" in the run's status.json is stale: record "failed".
        PYTHONPATH="$REPO" "${PYTHON:-python}" -m train.status "$OUTPUT_DIR" >/dev/null 2>&1
        exit $(( rc == 0 ? 1 : rc )) ;;
esac
