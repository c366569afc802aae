"""Launched by tests/integration/test_fault_tolerance.py under `accelerate launch` with several CPU processes.

The ranks' stop vote alone: rank R raises SIGUSR1 on itself just before call C of
StopFlag.any_rank_stopping, and every rank records what each of N calls returned, then what
N calls of a flag that no rank raised returned. Writes vote-rank<rank>.json into OUT_DIR.

    python tests/probes/stop_vote_probe.py OUT_DIR R C N
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[2])  # the repository root

from train.distributed import build_accelerator  # noqa: E402
from train.lifecycle import StopFlag  # noqa: E402


def main() -> None:
    out, signalled_rank, at_call, calls = Path(sys.argv[1]), *map(int, sys.argv[2:5])
    accelerator = build_accelerator("no")
    rank = accelerator.process_index
    flag = StopFlag()
    flag.install()
    flag.deferred = True  # as in the training loop: a signal waits for the vote
    answers = []
    for call in range(calls):
        if rank == signalled_rank and call == at_call:
            signal.raise_signal(signal.SIGUSR1)  # the handler runs before raise_signal returns
        answers.append(flag.any_rank_stopping(accelerator))
    quiet = StopFlag()
    unsignalled = [quiet.any_rank_stopping(accelerator) for _ in range(calls)]
    record = {"rank": rank, "world": accelerator.num_processes, "answers": answers, "unsignalled": unsignalled,
              "signum": flag.signum}
    (out / f"vote-rank{rank}.json").write_text(json.dumps(record))
    accelerator.end_training()


if __name__ == "__main__":
    main()
