"""Stopping cleanly when the cluster asks: SIGTERM, SIGINT, SIGUSR1 (SLURM's usual warning) or
SIGHUP (the terminal closed; left alone under nohup).

During training a signal only sets a flag. At each optimizer-step boundary the ranks vote on
it (one all-reduce); every rank reads the vote one step later, so all stop at the same step,
save a checkpoint and exit with PREEMPTED_EXIT. Before training starts there is nothing to
save, so a signal ends the process at once (StopRequested).

Signals that arrive within BURST_S of the first are the same request: SLURM and Kubernetes
signal the launcher and its workers together, and the launcher forwards its copy, so each
worker sees two at once. A signal after that stops at once, recording the failure first.
A worker whose launcher dies (SIGKILL, OOM) takes that as a stop request too.

Also here: fault injection for the crash tests (env DENOISE_FAULT), so a test can kill a run
at an exact point instead of racing a timer.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Callable

import torch
from accelerate import Accelerator

from train.distributed import launcher_args
from train.errors import STOP_SIGNALS, StopRequested

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: "try again later" - the job should be resumed
BURST_S = 1.0  # seconds after a stop request in which further signals count as the same request
LAUNCHER_GONE_GRACE_S = 60.0  # seconds an orphaned worker gets to checkpoint before it exits regardless


class Preempted(Exception):
    """Raised after the checkpoint of a signalled run is saved."""

    def __init__(self, signame: str, step: int) -> None:
        super().__init__(f"stopped by {signame} at step {step}; checkpoint saved, resume with the same command")
        self.signame, self.step = signame, step


class StopFlag:
    """Catches the stop signals in this process and agrees on them across ranks.

    `on_abort(signum)` runs before a second request ends the process at once (to record it).
    Set `deferred` once the training loop polls the flag at every step."""

    def __init__(self, on_abort: Callable[[int], None] | None = None) -> None:
        self.signum: int | None = None
        self.reason: str | None = None  # what asked, when it was not a signal from outside
        self.deferred = False
        self.on_abort = on_abort
        self._first_at = 0.0
        self._previous = {}
        self._vote: _Vote | None = None  # the last step's vote, maybe still in flight

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            if sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN:
                continue  # started under nohup: the user asked to outlive the terminal
            self._previous[sig] = signal.signal(sig, self._handle)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # what main.py held arrives now, here

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first_at = signum, now
            if not self.deferred:
                raise StopRequested(self.name)
            return
        if now - self._first_at < BURST_S:
            return  # the same request, delivered twice
        if self.on_abort is not None:  # asked again: stop now, the default way, once it is recorded
            self.on_abort(signum)
        self.uninstall()
        signal.raise_signal(signum)

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
        if self.reason is not None:
            return self.reason
        return signal.Signals(self.signum).name if self.signum is not None else "a signal on another rank"


def ignore_stop_signals() -> None:
    """Once a stop is saved and recorded, later copies of the request are moot. Python's
    shutdown would reset our handlers to the default, and a late copy would then kill a
    process whose work is safe, with the wrong exit status. SIGKILL still ends it."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


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
    """SIGKILL this process, or hang it, at `point` of optimizer step `step` if DENOISE_FAULT asks.

    DENOISE_FAULT=[hang_]<point>:<step>[@<rank>], point = after_step | in_save. Test-only: it
    simulates a crash (OOM kill, node loss) or a hang (stuck in native code, deaf to every
    signal but SIGKILL) at an exact place; once per run, not again after a restart or requeue.
    """
    spec = os.environ.get("DENOISE_FAULT")
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0" or \
            os.environ.get("SLURM_RESTART_COUNT", "0") != "0":
        return
    where, _, rest = spec.partition(":")
    at_step, _, at_rank = rest.partition("@")
    if where.removeprefix("hang_") != point or int(at_step) != step or (at_rank and int(at_rank) != rank):
        return
    if where.startswith("hang_"):
        signal.pthread_sigmask(signal.SIG_BLOCK, set(signal.Signals) - {signal.SIGKILL, signal.SIGSTOP})
        while True:
            time.sleep(3600)
    os.kill(os.getpid(), signal.SIGKILL)


def _launched_by(pid: int) -> bool:
    """Whether process `pid` is a launcher that starts workers: accelerate launch or torchrun."""
    cmdline = " ".join(launcher_args(pid))  # empty without /proc: nothing to watch
    return any(name in cmdline for name in ("accelerate", "torchrun", "torch.distributed.run", "torch/distributed/run"))


def watch_launcher(stop: StopFlag, on_give_up: Callable[[], None], grace_s: float = LAUNCHER_GONE_GRACE_S) -> None:
    """End this worker when the launcher that started it dies without stopping it first.

    Its death reparents this process, so a thread polls the parent pid (every 0.5 s). Then
    it asks for a stop as a signal would (a checkpoint at the next step, or an exit during
    start-up) and, if the process still runs `grace_s` later (a peer died in a collective),
    records the failure through `on_give_up` and exits."""
    parent = os.getppid()
    if not _launched_by(parent):
        return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        if stop.signum is None:  # else a stop is already under way: let it finish
            stop.reason = f"the death of its launcher (pid {parent})"
            os.kill(os.getpid(), signal.SIGTERM)  # runs the handler in the main thread, where it can stop the work
        time.sleep(grace_s)
        on_give_up()
        os._exit(1)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()
