"""Writing the run's own files in output_dir: whole or not at all, and never through a symbolic
link (a link planted in the folder must not turn a run's write into an overwrite elsewhere)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from train.errors import UserError

_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW


class LinkRefused(UserError):
    """A file of the run's is a symbolic link."""


def _refuse_link(path: Path) -> None:
    raise LinkRefused(f"{path} is a symbolic link: the run writes its own files only, never through a link; "
                      f"remove the link (or choose another output_dir), then run the same command") from None


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` by renaming a new temporary file over it: a reader sees the old
    file or the new one, and a link at `path` is replaced, never followed."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)  # a leftover, or a planted link: unlink removes the link itself
    fd = os.open(tmp, _NEW, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def append_line(path: Path, line: str) -> None:
    """Append one line to `path` (created if missing), refusing a link."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            _refuse_link(path)
        raise
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def open_no_link(path: Path, flags: int) -> int:
    """os.open(path, flags) that refuses a symbolic link at `path` in one line."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            _refuse_link(path)
        raise
