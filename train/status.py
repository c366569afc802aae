"""How a run ended, for scripts: OUTPUT_DIR/status.json, and a reader that never reports a dead
run as running.

`accelerate launch` reports every failure as status 1, so scripts tell "preempted" from
"failed" by this file. outcome = running | completed | preempted | failed.

    python -m train.status OUTPUT_DIR    # prints "OUTCOME EXIT_CODE", e.g. "preempted 75"

A status that says `running` while no process holds the folder's run lock belongs to a run
that was killed (SIGKILL, out of memory, a lost node); the reader above, the next run in the
folder and slurm/denoise.sh all record it as `failed`. Light on imports: no torch here.

Every record names the node that wrote it. A job script gives each rank a record of its own
(DENOISE_STATUS_FILE with `{rank}` in it) and reads them together when the job ends:

    python -m train.status --job JOB_DIR OUTPUT_DIR  # "OUTCOME EXIT_CODE NODES": NODES (comma-
        # separated, or -) are those whose ranks died without recording anything
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from pathlib import Path

from train import lock
from train.files import open_no_link, write_atomic

STATUS_FILE = "status.json"
STALE_RUN = ("the run ended without recording an outcome (killed: SIGKILL, out of memory or a lost node); "
             "its checkpoints are intact: run the same command to resume from the last one")


NODE_FAILURE = "node_failure"  # a job outcome (never a run's): ranks died without a word while others recorded


def node_name() -> str:
    """This node as the scheduler knows it (SLURM's name, which --exclude takes), else the host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname().split(".")[0]


def write_status(path: Path, outcome: str, exit_code: int, step: int | None = None, message: str = "",
                 node: str | None = None, stuck: bool = False) -> None:
    """Atomically (a temporary file renamed over it) where the disk has room; on a full disk,
    in place over the previous record: a record is under 1 KiB, so it fits in the disk block
    the file already holds. `node`: the node the record is about (default: this one);
    `stuck`: the process could not stop when asked (a hang), so it ended itself."""
    record = {"outcome": outcome, "exit_code": exit_code, "step": step, "message": message[:600],
              "node": node or node_name(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if stuck:
        record["stuck"] = True
    data = (json.dumps(record) + "\n").encode()
    try:
        write_atomic(path, data)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT) or not path.exists():
            raise
        path.with_name(f".{path.name}.tmp").unlink(missing_ok=True)
        fd = open_no_link(path, os.O_WRONLY)
        try:
            os.write(fd, data)
            os.ftruncate(fd, len(data))
        finally:
            os.close(fd)


def read_status(path: Path) -> dict | None:
    """The record at `path`; None if there is none, or it is not a whole record (a torn write,
    a file edited by hand)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    whole = isinstance(record, dict) and isinstance(record.get("outcome"), str) and \
        isinstance(record.get("exit_code"), int) and not isinstance(record["exit_code"], bool)
    return record if whole else None


def settle(output_dir: Path) -> dict | None:
    """output_dir's status, with a `running` whose run is gone (no process holds the lock)
    recorded as `failed`. Not for the lock's holder: see lock.is_held."""
    path = Path(output_dir) / STATUS_FILE
    status = read_status(path)
    if status is not None and status["outcome"] == "running" and lock.is_held(output_dir) is False:
        write_status(path, "failed", 1, status.get("step"), STALE_RUN)
        status = read_status(path)
    return status


class RunStatus:
    """Records the outcome of this process's run.

    - $DENOISE_STATUS_FILE (set by slurm/denoise.sh), from the start, so even a config error
      is recorded where the script looks; with `{rank}` in it, each rank records there all
      that happens to it, so a job can tell which ranks died without a word (`job_outcome`);
    - OUTPUT_DIR/status.json only once the run is accepted (it holds the folder and its
      checkpoint is compatible): a run refused at start-up leaves the last run's record.
    Into a shared file only the global main process records, except `failed`, which any rank
    may record: the launcher may kill rank 0 before it can."""

    def __init__(self) -> None:
        from_env = os.environ.get("DENOISE_STATUS_FILE", "")
        rank = os.environ.get("RANK", "0")
        self.own = Path(from_env.replace("{rank}", rank)) if "{rank}" in from_env else None
        self.paths = [Path(from_env)] if from_env and self.own is None else []
        for path in self.paths + ([self.own] if self.own is not None else []):
            path.parent.mkdir(parents=True, exist_ok=True)  # the job's folder; never output_dir (see disown)
        self.is_main = rank == "0"
        self.step: int | None = None
        self.output_dir: Path | None = None  # known once the config is read
        self.made: Path | None = None  # the outermost folder this run created for output_dir, until accepted

    def accept(self) -> None:
        """From now on also record in OUTPUT_DIR/status.json (`output_dir` is set by then)."""
        path = self.output_dir / STATUS_FILE
        if path not in self.paths:
            self.paths.append(path)
        self.made = None

    def disown(self) -> None:
        """Stop recording in OUTPUT_DIR/status.json: the folder is no longer this run's (deleted,
        or its lock taken), and writing there could recreate it or speak for another run."""
        if self.output_dir is not None:
            self.paths = [p for p in self.paths if p != self.output_dir / STATUS_FILE]
        self.made = None

    def remove_unaccepted(self) -> None:
        """A run refused at start-up in a folder it created leaves no folder behind: its lock
        file goes, then each folder it made, from output_dir up, while it is empty."""
        if self.made is None:
            return
        (self.output_dir / lock.LOCK_FILE).unlink(missing_ok=True)
        for folder in [self.output_dir, *self.output_dir.parents]:
            try:
                folder.rmdir()
            except OSError:
                return  # not empty: someone else's files, or ours kept
            if folder == self.made:
                return

    def record(self, outcome: str, exit_code: int, message: str = "", stuck: bool = False) -> None:
        shared = self.paths if self.is_main or outcome == "failed" else []
        for path in shared + ([self.own] if self.own is not None else []):
            try:
                write_status(path, outcome, exit_code, self.step, message, stuck=stuck)
            except OSError as e:  # never let the record of a failure hide the failure itself
                print(f"warning: could not record '{outcome}' in {path} ({e.strerror})", file=sys.stderr, flush=True)


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


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 3 and args[0] == "--job":
        print(*settle_job(Path(args[1]), Path(args[2])))
        return 0
    if len(args) != 1:
        print("error: usage is python -m train.status OUTPUT_DIR (or --job JOB_DIR OUTPUT_DIR)", file=sys.stderr)
        return 2
    status = settle(Path(args[0]))
    if status is None:
        print(f"error: {Path(args[0]) / STATUS_FILE} is missing or not a whole status record (outcome and "
              f"exit_code): no run recorded there", file=sys.stderr)
        return 2
    print(status["outcome"], status["exit_code"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
