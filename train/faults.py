"""Fault injection for the crash tests, and nothing else: DENOISE_FAULT kills or hangs the run at
an exact point, so a test need not race a timer.

    DENOISE_FAULT=[hang_]<point>:<step>[@<rank>]    point = after_step | in_save | in_resave

`after_step`: once optimizer step `step` is done; `in_save`: while every rank has written its
part of that step's checkpoint; `in_resave`: while a checkpoint of the same step is set aside.
Plain: SIGKILL (an OOM kill, a lost node). `hang_`: stuck as in native code, deaf to every
signal but SIGKILL. Once per run: not again after a torchrun or SLURM restart. Unset (always,
outside tests) a call costs one environment lookup, at optimizer steps and saves only.
"""

from __future__ import annotations

import os
import signal
import time


def fault_point(point: str, step: int, rank: int) -> None:
    """Kill or hang this process here if DENOISE_FAULT names this point, step and rank."""
    spec = os.environ.get("DENOISE_FAULT")  # read here, not at import: tests fork runs from a warm interpreter
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
