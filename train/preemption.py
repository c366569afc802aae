"""Stopping cleanly when the cluster asks: SIGTERM, SIGINT or SIGUSR1 (SLURM's usual warning).

A signal only sets a flag. At the next optimizer-step boundary every rank learns whether any
rank was signalled (one all-reduce), so all stop at the same step, save a checkpoint and exit
with PREEMPTED_EXIT. A second signal stops at once, the usual way.

Also here: fault injection for the crash tests (env DENOISE_FAULT), so a test can kill a run
at an exact point instead of racing a timer.
"""

from __future__ import annotations

import os
import signal

import torch
from accelerate import Accelerator

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: "try again later" - the job should be resumed
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Preempted(Exception):
    """Raised after the checkpoint of a signalled run is saved."""

    def __init__(self, signame: str, step: int) -> None:
        super().__init__(f"stopped by {signame} at step {step}; checkpoint saved, resume with the same command")
        self.signame, self.step = signame, step


class StopFlag:
    """Catches the stop signals in this process and agrees on them across ranks."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous = {}

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:  # asked twice: stop now, the default way
            self.uninstall()
            signal.raise_signal(signum)
            return
        self.signum = signum

    def any_rank_stopping(self, accelerator: Accelerator) -> bool:
        """True on every rank if any rank was signalled. Call at the same step on all ranks."""
        local = self.signum is not None
        if accelerator.num_processes == 1:
            return local
        flag = torch.tensor([1.0 if local else 0.0], device=accelerator.device)
        return accelerator.reduce(flag, reduction="sum").item() > 0  # a sync: once per optimizer step

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "a signal on another rank"


def maybe_inject_fault(point: str, step: int, rank: int) -> None:
    """SIGKILL this process at `point` of optimizer step `step` if DENOISE_FAULT asks for it.

    DENOISE_FAULT=<point>:<step>[@<rank>], point = after_step | in_save. Test-only: it
    simulates a crash (OOM kill, node loss) at an exact place.
    """
    spec = os.environ.get("DENOISE_FAULT")
    if not spec:
        return
    where, _, rest = spec.partition(":")
    at_step, _, at_rank = rest.partition("@")
    if where == point and int(at_step) == step and (not at_rank or int(at_rank) == rank):
        os.kill(os.getpid(), signal.SIGKILL)
