#!/usr/bin/env bash
# Train on a SLURM allocation: one task per node, each running launch/single_node.sh for that
# node's GPUs (or CPUs). Preempted or out of time, the job checkpoints and requeues itself;
# when the ranks of a node die without a word, it requeues itself without that node. As a task
# of slurm/sweep.sh's job array (DENOISE_SWEEP set), it trains its task's point of the sweep.
# Submit from the repository root (SLURM runs a copy of this script, so it finds the
# repository as the submit folder, or $DENOISE_REPO):
#   sbatch slurm/denoise.sh --config configs/default.yaml data.root=/shared/mnist
#   sbatch --nodes=4 --gpus-per-node=8 slurm/denoise.sh output_dir=/shared/runs/big
# Settings: #SBATCH lines below (or sbatch flags), and these environment variables:
#   OUTPUT_DIR (over the config file's output_dir; an output_dir=... argument wins), MIXED_PRECISION, NGPU, NPROC_CPU,
#   MASTER_PORT, MAX_REQUEUES (default 5: preemptions and time limits),
#   MAX_NODE_REQUEUES (default 2: bad nodes, each requeue without the node), PYTHON.
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
if [ -n "${DENOISE_SWEEP:-}" ] && [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then  # a task of slurm/sweep.sh
    task=$("${PYTHON:-python}" "$REPO/slurm/sweep.py" args "$DENOISE_SWEEP" "$SLURM_ARRAY_TASK_ID" "$@") || exit 2
    mapfile -t args <<< "$task"
    set -- "${args[@]}"  # the sweep's config and overrides, this task's point, then output_dir
fi
# The run's folder, as train/main.py reads it: an output_dir= argument, else OUTPUT_DIR, else the
# config file's output_dir (a config mistake ends the job here, in one line).
OUTPUT_DIR=$("${PYTHON:-python}" "$REPO/slurm/output_dir.py" ${OUTPUT_DIR:+"output_dir=$OUTPUT_DIR"} "$@") || exit 2
MAX_REQUEUES=${MAX_REQUEUES:-5}
MAX_NODE_REQUEUES=${MAX_NODE_REQUEUES:-2}
RESTARTS=${SLURM_RESTART_COUNT:-0}
NODES=${SLURM_JOB_NUM_NODES:-1}
FIRST_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# The node's address as SLURM knows it (its name, unless the cluster sets NodeAddr).
MASTER_ADDR=${MASTER_ADDR:-$(scontrol show node "$FIRST_NODE" | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)}
MASTER_ADDR=${MASTER_ADDR:-$FIRST_NODE}
MASTER_PORT=${MASTER_PORT:-$((15000 + SLURM_JOB_ID % 20000))}  # per job: jobs sharing a node don't collide
export NUM_MACHINES=$NODES MASTER_ADDR MASTER_PORT
# Each rank records this job's outcome in a file of its own (the launcher's exit status cannot
# tell "preempted"), from the first line on, config errors included, so a rank that died without
# a word shows; OUTPUT_DIR/status.json keeps the run's own record, which a job refused at
# start-up must not touch.
JOB_DIR=$OUTPUT_DIR/.job-$SLURM_JOB_ID
export DENOISE_STATUS_FILE="$JOB_DIR/rank-{rank}.json"
rm -rf "$JOB_DIR"
mkdir -p "$JOB_DIR"
# Requeue this array task alone, or this job; count requeues by cause (the job id stays).
REQUEUE_ID=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}
REQUEUE_ID=${REQUEUE_ID:-$SLURM_JOB_ID}
REQUEUES=$OUTPUT_DIR/.requeues-$SLURM_JOB_ID
[ "$RESTARTS" -gt 0 ] || rm -f "$REQUEUES"
requeued() { local n; n=$(grep -cx "$1" "$REQUEUES" 2>/dev/null); echo "${n:-0}"; }

echo "[slurm] job $SLURM_JOB_ID run $((RESTARTS + 1)) on $NODES node(s) ($SLURM_JOB_NODELIST)," \
     "rendezvous $MASTER_ADDR:$MASTER_PORT, output $OUTPUT_DIR"

# SLURM_NODEID must be read inside each task (in this shell it is the first node's). Since SLURM
# 22.05 srun does not take --cpus-per-task from the job: without it, a node's launcher and all
# its workers would share one core.
srun --kill-on-bad-exit=1 --nodes="$NODES" --ntasks-per-node=1 ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} \
    bash -c 'MACHINE_RANK=$SLURM_NODEID exec "$0" "$@"' "$REPO/launch/single_node.sh" output_dir="$OUTPUT_DIR" "$@" &
step=$!
# A signal to this shell (e.g. SIGTERM at the time limit) must not stop us from reading the outcome.
trap 'echo "[slurm] batch shell got a signal; waiting for training to checkpoint"' TERM USR1
while true; do
    wait "$step"
    rc=$?
    kill -0 "$step" 2>/dev/null || break  # wait returned because of a trapped signal: wait again
done

# Every rank has ended: read their records together (a stale "running" in status.json becomes
# "failed"; a node whose ranks died without a word is named there).
read -r outcome code nodes < <("${PYTHON:-python}" "$REPO/slurm/job_outcome.py" "$JOB_DIR" "$OUTPUT_DIR" \
    2>/dev/null || echo missing 1 -)
rm -rf "$JOB_DIR"
echo "[slurm] training ended: $outcome (srun status $rc)"
case "$outcome" in
    completed)
        exit 0 ;;
    preempted)
        if [ "$(requeued preempted)" -ge "$MAX_REQUEUES" ]; then
            echo "[slurm] not requeued: already requeued $MAX_REQUEUES times after a preemption (MAX_REQUEUES)"
            exit "$PREEMPTED_EXIT"
        fi
        echo preempted >> "$REQUEUES"
        echo "[slurm] requeueing job $REQUEUE_ID to resume from its checkpoint"
        scontrol requeue "$REQUEUE_ID"
        exit 0 ;;
    node_failure)
        if [ "$(requeued node_failure)" -ge "$MAX_NODE_REQUEUES" ]; then
            echo "[slurm] not requeued: ranks on $nodes died, and $MAX_NODE_REQUEUES bad nodes were already left out (MAX_NODE_REQUEUES)"
            exit 1
        fi
        echo node_failure >> "$REQUEUES"
        excluded=$(scontrol show job "$SLURM_JOB_ID" | grep -o 'ExcNodeList=[^ ]*' | cut -d= -f2)
        excluded=$( [ "$excluded" = "(null)" ] || [ -z "$excluded" ] && echo "$nodes" || echo "$excluded,$nodes")
        echo "[slurm] ranks on $nodes died without recording an outcome: requeueing job $REQUEUE_ID without $excluded"
        # A job cannot change its own node list while it runs: it waits in the queue, held, until
        # a small job of ours (on any node) has set the list and released it.
        if sbatch --job-name=denoise-exclude --nodes=1 --ntasks=1 --time=5 --output=/dev/null \
                ${SLURM_JOB_PARTITION:+--partition="$SLURM_JOB_PARTITION"} ${SLURM_JOB_ACCOUNT:+--account="$SLURM_JOB_ACCOUNT"} \
                "$REPO/slurm/release_without.sh" "$REQUEUE_ID" "$excluded"; then
            scontrol requeuehold "$REQUEUE_ID"
        else
            echo "[slurm] could not submit the job that leaves $excluded out: requeueing as it is"
            scontrol requeue "$REQUEUE_ID"
        fi
        exit 1 ;;
    failed)
        exit "$code" ;;
    *)  # no rank recorded anything: the whole job was killed (scancel, OOM of every rank) - not requeued
        echo "[slurm] training ended without recording an outcome: not requeued"
        exit $(( rc == 0 ? 1 : rc )) ;;
esac
