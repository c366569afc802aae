"""One run per output_dir: an OS lock on OUTPUT_DIR/run.lock, held by the global main process
for the run's whole life and released by the kernel however that process ends.

It is a POSIX record lock (`fcntl.lockf`): local filesystems and NFS (v4, or v3 with lockd)
honour it across hosts, and a crashed host's lock is freed when its NFS lease runs out.
Where the filesystem has no locks (NFS mounted `nolock`, Lustre without `-o flock`) the run
says so and goes on unlocked. The lock file itself is never deleted: a second file of the
same name would be a second lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from train.errors import UserError
from train.files import open_no_link

LOCK_FILE = "run.lock"
_BUSY = (errno.EAGAIN, errno.EACCES)  # what lockf says when another process holds the lock


class OutputDirInUse(UserError):
    """Another live run holds this output_dir."""


class FolderLost(UserError):
    """The run's folder, or its run.lock, was deleted or replaced while the run held it."""


class RunLock:
    """Held from `acquire()` until this process ends."""

    def __init__(self, output_dir: Path) -> None:
        self.path = Path(output_dir) / LOCK_FILE
        self.identity: tuple[int, int] | None = None  # (device, inode) of the file locked

    def acquire(self, wait_s: float = 1.0) -> str | None:
        """Take the lock, or raise OutputDirInUse naming the holder. Returns a warning when the
        filesystem cannot lock (the run then goes on unlocked), else None. `wait_s` rides out
        a status probe (`python -m train.status`), which holds the lock for microseconds."""
        fd = open_no_link(self.path, os.O_RDWR | os.O_CREAT)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in _BUSY:
                    os.close(fd)
                    return (f"warning: cannot lock {self.path} ({os.strerror(e.errno)}; the filesystem has no locks): "
                            f"nothing stops a second run from using {self.path.parent} at the same time")
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise OutputDirInUse(
                        f"output_dir {self.path.parent} is in use by another run ({describe_holder(self.path)}): "
                        f"wait for it to end or stop it, or choose another output_dir"
                    ) from None
                time.sleep(0.05)
        # fd is never closed: the lock lives as long as this process (closing it would drop it).
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        st = os.fstat(fd)
        self.identity = (st.st_dev, st.st_ino)
        return None

    def check(self) -> None:
        """Raise FolderLost unless run.lock is still the file this process locked. A lock lives
        on the file, not its name: a deleted lock file (or `rm -rf output_dir`) would let a
        second run in, so the holder checks before each write it makes."""
        if self.identity is None:
            return  # the filesystem has no locks: nothing to keep
        try:
            st = os.stat(self.path, follow_symlinks=False)
            same = (st.st_dev, st.st_ino) == self.identity
        except OSError:
            same = False
        if not same:
            raise FolderLost(
                f"{self.path} was deleted or replaced while this run held it (output_dir removed, or the lock file "
                f"deleted): another run may be using {self.path.parent}; this run stopped without writing there "
                f"again. Check the folder, then run the same command to resume from its last intact checkpoint")


def describe_holder(path: Path) -> str:
    """'host H, pid P, started T' from a lock file, as far as it can be read."""
    try:
        holder = json.loads(path.read_text())
        return f"host {holder['host']}, pid {holder['pid']}, started {holder['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


def is_held(output_dir: Path) -> bool | None:
    """Whether a live process holds output_dir's lock (None: no lock file, or no locks here).

    Probing takes the lock for an instant; never call it from the process that holds it
    (closing the probe's descriptor would drop that process's own lock)."""
    path = Path(output_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError as e:
        return True if e.errno in _BUSY else None
    finally:
        os.close(fd)
