"""A warm interpreter for the tests: it imports what train/main.py imports once, then forks a
child per run that executes train/main.py (or a probe that calls it) as `python SCRIPT ARGS`
does, from its `__main__` block to the interpreter's own exit.

Most of a short run is a new process importing torch (seconds on one core); a fork skips
that and nothing else. The child is a process of its own: its own pid, signal handlers,
locks, exit status and interpreter shutdown. What it shares is what the imports did, which
reads no argument and no environment variable of the job (OMP_NUM_THREADS is set for both,
as run_main sets it). tests/integration/test_train_e2e.py runs one job both ways and
compares every output. Not used where CUDA is (a forked child cannot initialize it).

Protocol, one JSON object a line: stdin takes {"script", "argv", "env", "cwd", "stdout",
"stderr", "status", "new_session"}; stdout answers {"pid"}; the child's exit code (negative: killed by
that signal, as Popen says) is written to the "status" path when it ends. EOF on stdin ends
the server.
"""

from __future__ import annotations

import json
import os
import runpy
import select
import sys
from pathlib import Path

MAIN = Path(__file__).resolve().parent.parent / "train" / "main.py"


def _preload() -> None:
    sys.path[0] = str(MAIN.parent.parent)  # as main.py itself does when run
    import accelerate  # noqa: F401
    import torch
    import torch._dynamo  # noqa: F401  (torch.optim imports it at the first optimizer: a second more)

    import train.checkpoint  # noqa: F401
    import train.data  # noqa: F401
    import train.distributed  # noqa: F401
    import train.loop  # noqa: F401
    import train.main  # noqa: F401
    import train.model  # noqa: F401
    import train.perf  # noqa: F401
    import train.tracking  # noqa: F401

    assert not torch.cuda.is_initialized()


def _reap(status_files: dict[int, str]) -> None:
    """Record the exit code of every child that has ended."""
    while status_files:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            return
        path = status_files.pop(pid)
        Path(path + ".tmp").write_text(str(os.waitstatus_to_exitcode(status)))
        os.replace(path + ".tmp", path)  # whole, for a reader that polls


def serve() -> dict:
    """Answer requests until stdin ends; returns only in a forked child, with its request."""
    status_files: dict[int, str] = {}
    while True:
        ready, _, _ = select.select([sys.stdin], [], [], 0.05)
        _reap(status_files)
        if not ready:
            continue
        line = sys.stdin.readline()
        if not line:
            return {}
        job = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            return job
        status_files[pid] = job["status"]
        print(json.dumps({"pid": pid}), flush=True)


def become(job: dict) -> None:
    """Turn this forked child into `python SCRIPT ARGS` as `job` asks for it."""
    if job["new_session"]:
        os.setsid()
    os.chdir(job["cwd"])
    os.environ.clear()
    os.environ.update(job["env"])
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, fd)
        os.close(out)
    sys.argv = [job["script"]] + job["argv"]


if __name__ == "__main__":
    _preload()
    print(json.dumps({"ready": os.getpid()}), flush=True)
    request = serve()
    if not request:
        sys.exit(0)
    become(request)
    runpy.run_path(request["script"], run_name="__main__")  # its sys.exit ends this process as it ends the script
