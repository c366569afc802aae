"""The one exception type for mistakes a user can fix (bad config, missing data, bad checkpoint).

`train.lifecycle.ended` turns it into a single line on stderr and exit status 2, without a traceback.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

_NEARLY_FULL_BYTES = 1 << 20  # a write failing with less free than this is put down to a full disk


class UserError(Exception):
    """A problem the user caused and can fix; the message names the problem and the fix."""

    node_local = False
    """True where another node may not see the problem (its own disk): the main process of each
    node that meets it prints it; otherwise every rank meets the same error and only rank 0 prints it"""


class DataError(UserError):
    """The training or test data missing, unreadable or not what it should be."""

    node_local = True  # nodes without a shared filesystem each read their own copy


def brief(e: BaseException) -> str:
    """An underlying exception in a few words, for inside a one-line message."""
    lines = str(e).strip().splitlines()
    text = lines[0] if lines else ""
    text = text if len(text) <= 160 else text[:157] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def counted(n: int, noun: str) -> str:
    """'1 image', '2 images', '2 processes': a count with its noun."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}{'es' if noun.endswith(('s', 'x')) else 's'}"


_UNWRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def write_failure(e: BaseException, output_dir: Path | None) -> UserError | None:
    """The one-line error for a write that failed on a full disk (or quota) or into a folder
    that became read-only, else None.

    Full disks surface as OSError(ENOSPC) from Python, but as RuntimeError("file write
    failed") from torch.save, so a failure while output_dir's filesystem is (nearly) full
    counts too."""
    path, seen, x = None, set(), e
    while x is not None and id(x) not in seen:  # the exception and what caused it
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno in _UNWRITABLE and x.filename and output_dir is not None and \
                Path(output_dir).resolve() in (Path(x.filename).resolve(), *Path(x.filename).resolve().parents):
            return UserError(f"cannot write {x.filename} ({x.strerror}): make it writable again (or move output_dir), "
                             f"then run the same command to resume from the last intact checkpoint")
        if isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT):
            path = x.filename or output_dir
            break
        x = x.__cause__ or x.__context__
    free = None
    if output_dir is not None:
        try:
            free = shutil.disk_usage(output_dir).free
        except OSError:
            pass
    if path is None and (free is None or free >= _NEARLY_FULL_BYTES):
        return None
    where = path or output_dir
    room = f"{free / 2**20:.1f} MiB free" if free is not None else "free space unknown"
    return UserError(f"disk full: writing {where} failed ({room} on its filesystem): free space there (or move "
                     f"output_dir), then run the same command to resume from the last intact checkpoint")
