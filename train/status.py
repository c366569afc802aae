"""How a run ended, for scripts: `accelerate launch` reports every failure as status 1, so
scripts tell "preempted" from "failed" by OUTPUT_DIR/status.json (written by train/rundir.py).

    python -m train.status OUTPUT_DIR    # prints "OUTCOME EXIT_CODE", e.g. "preempted 75"

It never reports a dead run as running: a `running` whose run no longer holds the folder's
lock (killed: SIGKILL, out of memory, a lost node) is recorded, and printed, as `failed`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from train.rundir import STATUS_FILE, settle


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("error: usage is python -m train.status OUTPUT_DIR", file=sys.stderr)
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
