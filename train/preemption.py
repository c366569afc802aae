"""Stopping cleanly when the cluster asks: SIGTERM, SIGINT or SIGUSR1 (SLURM's usual warning).

A signal only sets a flag. At each optimizer-step boundary the ranks vote on it (one
all-reduce); every rank reads the vote one step later, so all stop at the same step, save a
checkpoint and exit with PREEMPTED_EXIT. A second signal stops at once, the usual way.

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
        self._vote: _Vote | None = None  # the last step's vote, maybe still in flight

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
        """True on every rank, from the same call on, once any rank was signalled by its previous call.

        Call once per optimizer step, at the same steps on all ranks. With several ranks each
        call starts this step's vote and reads the previous step's: the host waits at most for
        the work queued before that vote, never for the step it has just queued, so a GPU
        still has that step to run while the host queues the next. The price is a stop one
        step later.
        """
        local = self.signum is not None
        if accelerator.num_processes == 1:
            return local
        previous, self._vote = self._vote, _Vote(local, accelerator)
        return previous is not None and previous.result()

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "a signal on another rank"


class _Vote:
    """One step's stop vote, summed over the ranks, read later without waiting for later work."""

    def __init__(self, local: bool, accelerator: Accelerator) -> None:
        # torch.full fills on the device: unlike torch.tensor([...], device=...) it needs no
        # blocking host-to-device copy. On a GPU the all-reduce is queued, not waited for.
        total = accelerator.reduce(torch.full((1,), float(local), device=accelerator.device), reduction="sum")
        self._done: torch.cuda.Event | None = None
        if total.device.type == "cuda":  # copy the sum out behind the all-reduce, mark the point
            self._sum = torch.empty(1, pin_memory=True).copy_(total, non_blocking=True)
            self._done = torch.cuda.Event()
            self._done.record()
        else:  # gloo on the CPU: the all-reduce has already returned the sum
            self._sum = total

    def result(self) -> bool:
        """True if any rank voted to stop. Waits only for the work queued before the vote."""
        if self._done is not None:
            self._done.synchronize()
        return self._sum.item() > 0  # a host tensor by now: no device sync


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
