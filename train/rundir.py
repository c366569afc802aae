"""The run's folder (output_dir), owned by this module for the run's whole life.

- **Claim.** Before anything in the folder is read or changed, the main process refuses a
  folder that holds files no run of ours wrote, creates it, and takes its lock.
- **Lock.** One run per folder: an OS lock on OUTPUT_DIR/run.lock (`fcntl.lockf`, a POSIX
  record lock), held by the main process and released by the kernel however it ends. Local
  filesystems and NFS (v4, or v3 with lockd) honour it across hosts; where the filesystem
  has no locks (NFS mounted `nolock`, Lustre without `-o flock`) the run says so and goes on
  unlocked. A lock lives on a file, not its name: before each write the holder checks that
  run.lock is still the file it locked, and stops (FolderLost) when it was deleted or
  replaced (`rm run.lock`, `rm -rf output_dir`). The lock file itself is never deleted by a
  run that was accepted: a second file of that name would be a second lock.
- **Writes.** Every file is written whole or not at all (a temporary file renamed over it),
  and never through a symbolic link: a link planted in the folder must not turn a write
  into an overwrite elsewhere. A linked file is replaced; a linked folder (samples/,
  checkpoints/, wandb/, where the run writes and prunes), a file in a folder's place, or a
  folder in a file's place, is refused. A file is read only when it is a plain file, never through a link (`read_own`).
- **Who writes what.** The main process writes every file here, except the checkpoints,
  which every rank writes its part of (train/checkpoint.py), and a `failed` status record,
  which any rank may write over a `running` one: the launcher may kill the main process before it can
  (train/lifecycle.py decides what is recorded).
- **status.json**, for scripts: outcome = running | completed | preempted | failed, with the
  exit code, the last logged step and the node. A `running` whose holder is gone (no process
  holds the lock) belongs to a killed run: `settle` records it as failed.

Light on imports (no torch): `python -m train.status` and the SLURM script use it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import stat
import time
from pathlib import Path
from typing import Iterator

from train.errors import UserError

LOCK_FILE = "run.lock"
STATUS_FILE = "status.json"
FOLDERS = ("checkpoints", "samples", "wandb")  # the subfolders a run writes
WEIGHTS = "model.safetensors"  # the trained weights, written as the run ends
STALE_RUN = ("the run ended without recording an outcome (killed: SIGKILL, out of memory or a lost node); "
             "its checkpoints are intact: run the same command to resume from the last one")
_BUSY = (errno.EAGAIN, errno.EACCES)  # what lockf says when another process holds the lock
_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
# The umask, read once at import, before any thread starts: setting it is the only way to read
# it, and it is the whole process's. A new file gets 0o666 less it, as with open().
_UMASK = os.umask(0o022)
os.umask(_UMASK)


class OutputDirInUse(UserError):
    """Another live run holds this output_dir."""


class FolderLost(UserError):
    """The run's folder, or its run.lock, was deleted or replaced while the run held it."""


class LinkRefused(UserError):
    """A file of the run's is a symbolic link."""


# -- writing files -------------------------------------------------------------------------
def _refused(path: Path) -> LinkRefused:
    return LinkRefused(f"{path} is a symbolic link: the run writes its own files only, never through a "
                       f"link; remove the link (or choose another output_dir), then run the same command")


def _misplaced(path: Path) -> UserError:
    """The refusal of a file where the run writes a folder, or of a folder where it writes a file."""
    return UserError(f"{path} is {'a folder' if path.is_dir() else 'not a folder'}, and the run writes its "
                     f"{path.name} there: move it away (or choose another output_dir), then run the same command")


def _open_plain(path: Path, flags: int) -> int:
    """os.open(path, flags) of a plain file only: OSError ELOOP for a symbolic link, EINVAL for
    anything else (a FIFO planted there would block the run, a device would never end)."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "a symbolic link", str(path)) from None
        if e.errno == errno.ENXIO:  # a FIFO opened for writing, with no reader
            raise OSError(errno.EINVAL, "not a plain file", str(path)) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a plain file", str(path))
    return fd


def open_no_link(path: Path, flags: int) -> int:
    """os.open(path, flags) of a plain file, refusing a symbolic link or anything else in one line."""
    try:
        return _open_plain(path, flags)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _refused(path) from None
        if e.errno == errno.EINVAL:
            raise UserError(f"{path} is not a plain file: remove it, then run the same command") from None
        if e.errno == errno.EISDIR:  # a folder put in its place (metrics.jsonl is appended to mid-run)
            raise _misplaced(path) from None
        raise


def chunks_of(path: Path, size: int = 1 << 20) -> Iterator[bytes]:
    """The run's file at `path` in pieces of `size` bytes; OSError for a link or anything but a plain file."""
    fd = _open_plain(path, os.O_RDONLY)
    try:
        while piece := os.read(fd, size):
            yield piece
    finally:
        os.close(fd)


RECORD_BYTES = 1 << 20  # status.json, run.lock and a checkpoint's JSON files are a few KiB at most


def read_own(path: Path, limit: int | None = RECORD_BYTES) -> bytes:
    """The whole of the run's file at `path`; OSError for a link, anything but a plain file, or a
    file past `limit` bytes (None: any size), so a planted file of gigabytes is never held whole."""
    pieces, size = [], 0
    for piece in chunks_of(path):
        pieces.append(piece)
        size += len(piece)
        if limit is not None and size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit:,} bytes", str(path))
    return b"".join(pieces)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` by renaming a new temporary file over it: a reader sees the old
    file or the new one, and a link at `path` is replaced, never followed."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)  # a leftover, or a planted link: unlink removes the link itself
    fd = os.open(tmp, _NEW, 0o666)
    try:
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:  # a failed write (a full disk, a folder at `path`) or a Ctrl-C leaves nothing behind
        tmp.unlink(missing_ok=True)
        raise


def usual_mode(path: Path) -> None:
    """Give `path` the permissions of a file created here (0o666 less the umask): safetensors 0.8
    writes its files 0600 whatever the umask (safetensors#782), which keeps the weights from
    everyone else who shares the folder."""
    try:
        os.chmod(path, 0o666 & ~_UMASK)
    except OSError:  # a filesystem with permissions of its own (SMB, some FUSE mounts): the file is whole
        pass


# -- status.json ---------------------------------------------------------------------------
def node_name() -> str:
    """This node as the scheduler knows it (SLURM's name, which --exclude takes), else the host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname().split(".")[0]


def write_status(path: Path, outcome: str, exit_code: int, step: int | None = None, message: str = "",
                 node: str | None = None, stuck: bool = False) -> None:
    """Atomically where the disk has room; on a full disk, in place over the previous record:
    a record is under 1 KiB, so it fits in the disk block the file already holds. `node`: the
    node the record is about (default: this one); `stuck`: the process could not stop when
    asked (a hang), so it ended itself."""
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
        record = json.loads(read_own(path))
    except (OSError, ValueError):
        return None
    whole = isinstance(record, dict) and isinstance(record.get("outcome"), str) and \
        isinstance(record.get("exit_code"), int) and not isinstance(record["exit_code"], bool)
    return record if whole else None


def settle(output_dir: Path) -> dict | None:
    """output_dir's status, with a `running` whose run is gone (no process holds the lock)
    recorded as `failed`. Not for the lock's holder: see is_held."""
    path = Path(output_dir) / STATUS_FILE
    status = read_status(path)
    if status is not None and status["outcome"] == "running" and is_held(output_dir) is False:
        status = {**status, "outcome": "failed", "exit_code": 1, "message": STALE_RUN}
        try:
            write_status(path, "failed", 1, status.get("step"), STALE_RUN)
        except OSError:  # a folder this reader cannot write: reported all the same (the next run records it)
            pass
    return status


# -- the lock ------------------------------------------------------------------------------
def describe_holder(path: Path) -> str:
    """'host H, pid P, started T' from a lock file, as far as it can be read."""
    try:
        holder = json.loads(read_own(path))
        return f"host {holder['host']}, pid {holder['pid']}, started {holder['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


def is_held(output_dir: Path) -> bool | None:
    """Whether a live process holds output_dir's lock (None: no lock file, or no locks here).

    Probing takes a shared lock for an instant, which needs only read access (a read-only
    mount, another user's run); never call it from the process that holds the lock (closing
    the probe's descriptor would drop that process's own lock)."""
    try:
        fd = _open_plain(Path(output_dir) / LOCK_FILE, os.O_RDONLY)  # a FIFO planted there would block the read
    except OSError:
        return None
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError as e:
        return True if e.errno in _BUSY else None
    finally:
        os.close(fd)


# -- the folder ----------------------------------------------------------------------------
class RunDir:
    """output_dir as this process holds it. Only the main process claims it and writes through it."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.identity: tuple[int, int] | None = None  # (device, inode) of the run.lock this process locked
        self.holder: bytes | None = None  # what this process wrote into the run.lock it locked
        self.made: Path | None = None  # the outermost folder the claim created, removed by `abandon`

    def claim(self) -> list[str]:
        """Claim the folder (on the main process only: see distributed.decided_on_main). Holding the
        lock, it then records a killed run's stale `running` as failed (checkpoint.choose_resume
        clears away unfinished saves next). Returns notes for the log; every refusal is one UserError."""
        try:
            self._refuse_foreign()
            missing = [p for p in (self.path, *self.path.parents) if not p.exists()]
            self.path.mkdir(parents=True, exist_ok=True)
            self.made = missing[-1] if missing else None
            if not os.access(self.path, os.W_OK):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
            notes = self._lock()
            self.check()  # samples/, checkpoints/ or wandb/ linked, or a file and a folder swapped
            previous = read_status(self.path / STATUS_FILE)
            if previous is not None and previous["outcome"] == "running":  # its holder is gone: we hold the lock
                write_status(self.path / STATUS_FILE, "failed", 1, previous.get("step"), STALE_RUN)
                step = previous.get("step")
                at = f"at step {step}" if isinstance(step, int) and step > 0 else "before its first logged step"
                notes.append(f"the previous run in {self.path} was killed without recording an outcome (it said "
                             f"'running' {at}); recorded it as failed")
            return notes
        except OSError as e:
            raise UserError(f"cannot write to output_dir {self.path} ({e.strerror}): choose a writable folder") from None

    def _refuse_foreign(self) -> None:
        """Refuse a folder of files no run of ours wrote: one that no run of ours has claimed (no
        run.lock, no status record of ours) and that holds anything but slurm/denoise.sh's
        job records."""
        lock = self.path / LOCK_FILE
        previous = read_status(self.path / STATUS_FILE)
        if not self.path.is_dir() or lock.exists() or lock.is_symlink() or (previous is not None and "node" in previous):
            return
        foreign = sorted(p.name for p in self.path.iterdir() if not p.name.startswith((".job-", ".requeues-")))
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise UserError(f"output_dir {self.path} already holds files no run wrote ({shown}): choose an empty or "
                            f"new folder; nothing there was changed")

    def _lock(self, wait_s: float = 1.0) -> list[str]:
        """Take the lock, or raise OutputDirInUse naming the holder; a warning when the filesystem
        cannot lock. `wait_s` rides out a status probe (`python -m train.status`), which holds
        the lock for microseconds."""
        path = self.path / LOCK_FILE
        fd = open_no_link(path, os.O_RDWR | os.O_CREAT)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in _BUSY:
                    os.close(fd)
                    return [f"warning: cannot lock {path} ({os.strerror(e.errno)}; the filesystem has no locks): "
                            f"nothing stops a second run from using {self.path} at the same time"]
                if time.monotonic() >= deadline:
                    os.close(fd)
                    self.made = None  # a live run's folder, though both made it at once: nothing here is ours to undo
                    raise OutputDirInUse(f"output_dir {self.path} is in use by another run ({describe_holder(path)}): "
                                         f"wait for it to end or stop it, or choose another output_dir") from None
                time.sleep(0.05)
        # fd is never closed: the lock lives as long as this process (closing it would drop it).
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.holder = (json.dumps(holder) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, self.holder, 0)
        try:
            os.fsync(fd)  # on the server, for the other nodes to read (distributed.check_shared_folder)
        except OSError:  # a filesystem without fsync (some FUSE mounts): the others wait for the write instead
            pass
        st = os.fstat(fd)
        self.identity = (st.st_dev, st.st_ino)
        return []

    def sees(self, holder: bytes, wait_s: float = 5.0) -> bool:
        """Whether run.lock here holds `holder`, what the main process wrote into it, allowing
        `wait_s` for a network filesystem's caches to catch up (less than the shortest
        train.collective_timeout_s, for which the main process waits on the answer). Never from
        the holder: closing the read's descriptor would drop its lock."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                if read_own(self.path / LOCK_FILE) == holder:
                    return True
            except OSError:
                pass
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)

    def check(self) -> None:
        """Raise FolderLost unless run.lock is still the file this process locked; refuse a folder
        the run writes into that has become a link (LinkRefused), and a file where a folder of
        the run's goes or the reverse: the weights and status.json are written, at the end, by
        code that cannot refuse them in one line."""
        for name in (*FOLDERS, STATUS_FILE, WEIGHTS):
            entry = self.path / name
            if name in FOLDERS and entry.is_symlink():  # written into and pruned: a link would do that in its target
                raise _refused(entry)
            if entry.exists() and not entry.is_symlink() and entry.is_dir() != (name in FOLDERS):
                raise _misplaced(entry)
        if self.identity is None:
            return  # not the holder, or the filesystem has no locks: nothing to keep
        try:
            st = os.stat(self.path / LOCK_FILE, follow_symlinks=False)
            same = (st.st_dev, st.st_ino) == self.identity
        except OSError:
            same = False
        if not same:
            raise FolderLost(
                f"{self.path / LOCK_FILE} was deleted or replaced while this run held it (output_dir removed, or the "
                f"lock file deleted): another run may be using {self.path}; this run stopped without writing there "
                f"again. Check the folder, then run the same command to resume from its last intact checkpoint")

    def write(self, name: str, data: bytes) -> Path:
        """OUTPUT_DIR/name (in a subfolder, made if missing), whole, while the folder is still this run's."""
        self.check()
        path = self.path / name
        if path.parent != self.path:  # a subfolder (one of FOLDERS); never output_dir itself, which must not come back
            path.parent.mkdir(exist_ok=True)
        try:
            write_atomic(path, data)
        except IsADirectoryError:  # planted in the run's folder (samples/ is written mid-run)
            raise _misplaced(path) from None
        return path

    def append(self, name: str, line: str) -> None:
        """One line at the end of OUTPUT_DIR/name (created if missing), refusing a link."""
        self.check()
        fd = open_no_link(self.path / name, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)

    def abandon(self) -> None:
        """Undo the claim of a run refused at start-up in a folder it created: its lock file
        goes, then each folder it made, from output_dir up, while it is empty."""
        if self.made is None:
            return
        (self.path / LOCK_FILE).unlink(missing_ok=True)
        for folder in [self.path, *self.path.parents]:
            try:
                folder.rmdir()
            except OSError:
                return  # not empty: someone else's files, or ours kept
            if folder == self.made:
                return
