"""The outcome of one SLURM job from the records its ranks wrote (slurm/denoise.sh reads it to
decide whether to requeue, and without which node). Each rank records all that happens to it in
JOB_DIR/rank-<rank>.json (DENOISE_STATUS_FILE with `{rank}` in it, train/lifecycle.py).

    python slurm/job_outcome.py JOB_DIR OUTPUT_DIR   # "OUTCOME EXIT_CODE NODES": NODES (comma-
        # separated, or -) are those whose ranks died without recording anything
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: train.rundir

from train.rundir import STATUS_FILE, read_status, settle, write_status  # noqa: E402

NODE_FAILURE = "node_failure"  # a job outcome (never a run's): ranks died without a word while others recorded


def job_outcome(records: list[dict | None]) -> tuple[str, int, list[str]]:
    """One job's (outcome, exit_code, bad nodes) from the records of its ranks (None: a rank
    that recorded nothing, or a torn record). A rank still `running` after its job ended died
    without a word (SIGKILL, a hardware fault, a hang the launcher killed), and a `stuck` one
    hung until it ended itself: when other ranks lived to record their outcome, their nodes
    are to blame (NODE_FAILURE). A mistake to fix wins over everything; when no rank recorded
    an outcome, nobody can be blamed ("missing")."""
    def lost(r: dict) -> bool:
        return r["outcome"] == "running" or bool(r.get("stuck"))

    ended = [r for r in records if r is not None and not lost(r)]
    silent = sorted({r.get("node", "?") for r in records if r is not None and lost(r)})
    if any(r["outcome"] == "failed" and r["exit_code"] == 2 for r in ended):
        return "failed", 2, []
    if not ended:
        return "missing", 1, []
    if silent:
        return NODE_FAILURE, 1, silent
    first = min(ended, key=lambda r: ("failed", "preempted", "completed").index(r["outcome"]))  # the worst
    return first["outcome"], first["exit_code"], []


def settle_job(job_dir: Path, output_dir: Path) -> tuple[str, int, str]:
    """The outcome of the job whose ranks recorded into job_dir/*.json, as (outcome, exit
    code, bad nodes or "-"). The run's status.json gets what only the job can tell: the nodes
    to blame for a NODE_FAILURE, and `failed` for a stale `running`."""
    outcome, code, nodes = job_outcome([read_status(p) for p in sorted(job_dir.glob("*.json"))])
    if outcome == NODE_FAILURE:
        previous = read_status(output_dir / STATUS_FILE) or {}
        write_status(output_dir / STATUS_FILE, "failed", 1, previous.get("step"),
                     f"ranks on {', '.join(nodes)} died without recording an outcome (killed, a hardware fault or "
                     f"a hang); the checkpoints are intact: run the job again without that node to resume",
                     node=",".join(nodes))
    elif outcome == "missing":
        settle(output_dir)
    return outcome, code, ",".join(nodes) or "-"


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print("error: usage is python slurm/job_outcome.py JOB_DIR OUTPUT_DIR", file=sys.stderr)
        sys.exit(2)
    print(*settle_job(Path(sys.argv[1]), Path(sys.argv[2])))
