"""How a run ends, in one module: stop requests, the ranks' agreement on them, a dead launcher,
a lost peer, and the outcome record. `train/main.py` holds one `RunStatus` and one `StopFlag`
and hands every exception that ends the run to `ended`, which records it and picks the exit
status: 0 done, 75 stopped on request after a checkpoint (run the same command to resume),
2 a mistake to fix (one line on stderr), 1 anything else.

Stop requests are SIGTERM, SIGINT, SIGUSR1 (SLURM's warning before the time limit) and SIGHUP
(a closed terminal; left alone under nohup). Before training a request ends the process at
once: there is nothing to save. During training it only sets a flag; at each optimizer step
the ranks vote on it (one all-reduce), so every rank stops at the same step and saves.
Either way the run raises `Stopped`, the one exception for "stop".

Requests within BURST_S of the first are the same request: SLURM and Kubernetes signal the
launcher and its workers together, and the launcher forwards its copy. A request after that
stops at once, recorded first. A worker whose launcher dies (SIGKILL, OOM) takes that as a
request too. It is noticed by a thread that polls the parent pid, not by PR_SET_PDEATHSIG: a
worker blocked in a collective runs no Python signal handler, and the same thread has to end
it after LAUNCHER_GONE_GRACE_S.

The outcome goes to OUTPUT_DIR/status.json (its format: train/rundir.py) and, for a
job script, to $DENOISE_STATUS_FILE. Light on imports: torch is imported only to vote.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from train.errors import UserError, brief, write_failure
from train.rundir import STATUS_FILE, FolderLost, RunDir, read_status, write_status

if TYPE_CHECKING:
    from accelerate import Accelerator

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: "try again later" - the job should be resumed
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)
BURST_S = 1.0  # seconds after a stop request in which further signals count as the same request
LAUNCHER_GONE_GRACE_S = 60.0  # seconds an orphaned worker gets to checkpoint before it exits regardless


class Stopped(BaseException):
    """The run stopped on request: after saving the checkpoint of step `step`, or during
    start-up (`step` None) with nothing to save. A BaseException, like KeyboardInterrupt, so
    that no `except Exception` turns it into an error."""

    def __init__(self, what: str, step: int | None = None, resume: str = "auto") -> None:
        self.step = step
        again = "the same command" + (" and checkpoint.resume=auto" if resume == "none" else "")  # none refuses it
        super().__init__(f"stopped by {what} during start-up, before training began: nothing to save; run the same "
                         f"command to start again" if step is None else
                         f"stopped by {what} at step {step}; checkpoint saved, resume with {again}")


class RunStatus:
    """Records the outcome of this process's run.

    - $DENOISE_STATUS_FILE (slurm/denoise.sh sets it, with `{rank}` for the rank), from the
      start, so even a config error is recorded where the script looks: each rank records
      there all that happens to it, so the job can tell which ranks died without a word;
    - OUTPUT_DIR/status.json only once the run is accepted (it holds the folder and its
      checkpoint is compatible): a run refused at start-up leaves the last run's record.
    Into a shared file only the main process records, except `failed`, which any rank may
    record while the file still says `running`: the launcher may kill the main process before
    it can. When the main process fails it records first (its peers learn of it as it exits),
    and its record names the cause, where theirs would say only that they lost it. Until the accelerator says
    which process is the main one (`is_main`, and of its node `is_local_main`), the launcher's
    RANK (and LOCAL_RANK) does."""

    def __init__(self) -> None:
        from_env = os.environ.get("DENOISE_STATUS_FILE", "")
        rank = os.environ.get("RANK", "0")
        self.own = Path(from_env.replace("{rank}", rank)) if from_env else None
        if self.own is not None:
            self.own.parent.mkdir(parents=True, exist_ok=True)  # the job's folder; never output_dir (see disown)
        self.is_main = rank == "0"
        self.is_local_main = os.environ.get("LOCAL_RANK", "0") == "0"  # this node's main process
        self.step: int | None = None
        self.rundir: RunDir | None = None  # the claimed folder, until the run loses it
        self.accepted = False  # from then on OUTPUT_DIR/status.json is recorded too

    def disown(self) -> None:
        """Touch nothing in OUTPUT_DIR from now on: the folder is no longer this run's (deleted,
        or its lock taken), and writing could recreate it or speak for another run."""
        self.rundir = None

    def remove_unaccepted(self) -> None:
        """A run refused at start-up in a folder it created leaves no folder behind."""
        if self.rundir is not None and not self.accepted:
            self.rundir.abandon()

    def _shared_outcome(self) -> str | None:
        """The outcome OUTPUT_DIR/status.json holds, once the run is accepted there; else None."""
        if self.rundir is None or not self.accepted:
            return None
        return (read_status(self.rundir.path / STATUS_FILE) or {}).get("outcome")

    def main_recorded(self) -> bool:
        """True on a rank other than the main one once the main process has recorded how the run
        ended in status.json: it failed first, and said why."""
        return not self.is_main and self._shared_outcome() not in (None, "running")

    def record(self, outcome: str, exit_code: int, message: str = "", stuck: bool = False) -> None:
        shared = self.rundir is not None and self.accepted and (
            self.is_main or outcome == "failed" and self._shared_outcome() == "running")
        for path in ([self.rundir.path / STATUS_FILE] if shared else []) + ([self.own] if self.own else []):
            try:
                write_status(path, outcome, exit_code, self.step, message, stuck=stuck)
            except OSError as e:  # never let the record of a failure hide the failure itself
                print(f"warning: could not record '{outcome}' in {path} ({e.strerror})", file=sys.stderr, flush=True)


class StopFlag:
    """Catches the stop requests of this process and agrees on them across ranks. Set
    `deferred` once the training loop polls `any_rank_stopping` at every step."""

    def __init__(self, status: RunStatus | None = None) -> None:
        self.status = status  # where a second request records that it ended the run at once
        self.signum: int | None = None
        self.reason: str | None = None  # what asked, when it was not a signal from outside
        self.deferred = False
        self.installed = False
        self._first_at = 0.0

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            if sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN:
                continue  # started under nohup: the user asked to outlive the terminal
            signal.signal(sig, self._handle)
        self.installed = True
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # what main.py held arrives now, here

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first_at = signum, now
            if not self.deferred:
                raise Stopped(self.name)
            return
        if now - self._first_at < BURST_S:
            return  # the same request, delivered twice
        if self.status is not None:  # asked again: stop now, the default way, once it is recorded
            self.status.record("failed", 128 + signum, f"stopped at once by a second stop signal "
                               f"({signal.Signals(signum).name}); run the same command to resume from the last "
                               f"intact checkpoint")
        signal.signal(signum, signal.SIG_DFL)  # dies of the signal, as if no handler had been set
        signal.raise_signal(signum)

    def any_rank_stopping(self, accelerator: Accelerator) -> bool:
        """True on every rank, from the same call on, once any rank has been asked to stop.
        Call once per optimizer step, at the same steps on all ranks: one all-reduce of one
        number, and on a GPU a host sync."""
        local = self.signum is not None
        if accelerator.num_processes == 1:
            return local
        import torch

        # torch.full fills on the device: no host-to-device copy before the all-reduce.
        votes = accelerator.reduce(torch.full((1,), float(local), device=accelerator.device), reduction="sum")
        return votes.item() > 0

    @property
    def name(self) -> str:
        if self.reason is not None:
            return self.reason
        return signal.Signals(self.signum).name if self.signum is not None else "a signal on another rank"


def launcher_args(pid: int) -> list[str]:
    """The command line of process `pid` (on Linux; elsewhere, and for a gone process, [])."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def watch_launcher(stop: StopFlag, grace_s: float = LAUNCHER_GONE_GRACE_S) -> None:
    """End this worker when the launcher that started it (accelerate launch, torchrun) dies
    without stopping it first: a stop request as a signal would make, then, if the process
    still runs `grace_s` later (a peer died in a collective), a recorded failure and an exit."""
    parent = os.getppid()
    cmdline = " ".join(launcher_args(parent))  # empty without /proc: nothing to watch
    if not any(name in cmdline for name in ("accelerate", "torchrun", "torch.distributed.run",
                                             "torch/distributed/run")):
        return

    def watch() -> None:
        while os.getppid() == parent:  # its death reparents this process
            time.sleep(0.5)
        if stop.signum is None:  # else a stop is already under way: let it finish
            stop.reason = f"the death of its launcher (pid {parent})"
            os.kill(os.getpid(), signal.SIGTERM)  # runs the handler in the main thread, where it can stop the work
        time.sleep(grace_s)
        if stop.status is not None:
            stop.status.record("failed", 1, "the launcher died and this worker could not stop cleanly in time",
                               stuck=True)
        os._exit(1)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


# What gloo and NCCL say when the other end of a collective died or stopped answering.
_PEER_GONE = ("connection reset by peer", "connection closed by peer", "timed out", "timeout",
              "communicator was aborted", "connection refused")


def lost_peer(e: BaseException) -> str | None:
    """The one-line report of a collective that failed because another rank died or hung, else None."""
    names = {cls.__name__ for cls in type(e).__mro__}  # torch.distributed's errors, without importing torch
    text = str(e).lower()
    if not ("DistError" in names or (isinstance(e, RuntimeError) and ("gloo" in text or "nccl" in text)
                                     and any(p in text for p in _PEER_GONE))):
        return None
    return (f"lost contact with another rank ({brief(e)}): a process or its node died or hung; the checkpoints are "
            f"intact: run the same command to resume from the last one (slurm/denoise.sh requeues the job "
            f"without the node whose ranks died)")


def ended(e: BaseException, status: RunStatus, debug: bool) -> int:
    """Record how the exception `e` ended the run and say so in one line; return the exit status.
    A bug keeps its traceback (re-raised, as is everything under `debug`). Call it from the
    `except` block that caught `e`."""
    if isinstance(e, Stopped):
        status.step = e.step if e.step is not None else status.step
        status.record("preempted", PREEMPTED_EXIT, str(e))
        if status.is_main:
            print(f"stopped: {e}", file=sys.stderr, flush=True)
        return PREEMPTED_EXIT
    peer = lost_peer(e)
    if peer is not None:  # not this rank's fault: one line from each survivor (any may be alone)
        quiet = status.main_recorded()  # the main process failed first and printed the cause
        status.record("failed", 1, peer)
        if debug:
            raise
        if not quiet:
            print(f"error: {peer}", file=sys.stderr, flush=True)
        return 1
    if isinstance(e, FolderLost):
        status.disown()
    error = e if isinstance(e, UserError) else write_failure(e, status.rundir.path if status.rundir else None)
    if error is None:  # a bug or a crash: keep the traceback, but record the outcome
        status.record("failed", 1, brief(e))
        raise
    status.record("failed", 2, str(error))
    if debug:
        raise
    if status.is_main or (error.node_local and status.is_local_main):  # once, or once a node
        print(f"error: {error}", file=sys.stderr, flush=True)
    return 2


START_ERROR_WAIT_S = 10.0  # seconds a rank that failed at start-up gives the main process to print why


def wait_for_the_main_process(wait_s: float = START_ERROR_WAIT_S) -> None:
    """After a start-up error that every rank meets and only the main process prints (a bad
    config): wait for the main process before exiting. A launcher ends the other ranks as soon
    as one exits (torchrun, srun), and a main process still starting (a slower node, a slow
    filesystem), before main.py holds its stop signals, would die of that without a word. The
    launcher's stop signal, once the main process is done, ends the wait at once."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    time.sleep(wait_s)


def ignore_stop_signals() -> None:
    """Once the outcome is recorded, later copies of a stop request are moot. Python's
    shutdown would reset our handlers to the default, and a late copy would then kill a
    process whose work is safe, with the wrong exit status. SIGKILL still ends it."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
