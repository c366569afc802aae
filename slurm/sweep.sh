#!/usr/bin/env bash
# Run a sweep (a grid of overrides in a YAML file; see slurm/sweep.py) as one SLURM job array of
# slurm/denoise.sh: one task per point, each in its own output_dir with its own wandb run, each
# requeued alone when preempted. Submit from the repository root:
#   slurm/sweep.sh configs/sweeps/lr_batch.yaml data.root=/shared/mnist      # overrides for every task
#   SBATCH_FLAGS="--gpus-per-node=8 --partition=gpu" MAX_PARALLEL=4 slurm/sweep.sh configs/sweeps/lr_batch.yaml
#   python slurm/sweep.py summary configs/sweeps/lr_batch.yaml                # outcomes and best PSNR, any time
# Settings: SBATCH_FLAGS (passed to sbatch), MAX_PARALLEL (tasks at once; default all), and
# slurm/denoise.sh's (NPROC_CPU, MAX_REQUEUES, ...), which every task inherits.
set -euo pipefail
[ $# -ge 1 ] || { echo "error: usage is slurm/sweep.sh SWEEP.yaml [section.key=value ...]" >&2; exit 2; }
REPO=$(cd "$(dirname "$0")/.." && pwd)
SWEEP=$(realpath "$1"); shift
# Every task's config is checked before anything is submitted (a typo fails here, in one line).
n=$("${PYTHON:-python}" "$REPO/slurm/sweep.py" count "$SWEEP" "$@") || exit 2
export DENOISE_SWEEP=$SWEEP DENOISE_REPO=$REPO
# shellcheck disable=SC2086  # SBATCH_FLAGS is a list of flags
exec sbatch --array="0-$((n - 1))${MAX_PARALLEL:+%$MAX_PARALLEL}" --job-name="sweep-$(basename "$SWEEP" .yaml)" \
    --output="%x-%A_%a.out" ${SBATCH_FLAGS:-} "$REPO/slurm/denoise.sh" "$@"
