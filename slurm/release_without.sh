#!/usr/bin/env bash
# Run by slurm/denoise.sh as a small job of its own: wait until job JOB is back in the queue,
# held, then leave NODES out of its node list and release it. (A job cannot change its own
# node list while it runs.)
#   sbatch --nodes=1 --time=5 slurm/release_without.sh JOB NODES
set -uo pipefail
job=$1 nodes=$2
for _ in $(seq 150); do  # up to 5 minutes
    if scontrol show job "$job" | grep -q 'Reason=job_requeued_in_held_state'; then
        scontrol update JobId="$job" ExcNodeList="$nodes" || echo "could not leave out $nodes: released as it is" >&2
        exec scontrol release "$job"
    fi
    sleep 2
done
echo "job $job never came back to the queue held: nothing changed" >&2
exit 1
