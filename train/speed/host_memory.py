"""Keep the host memory that a training step frees for the next step (glibc's malloc).

A step on the CPU allocates and frees the same activations every time. glibc serves blocks
above its mmap threshold (128 KiB at first, raised to the size of such a block when one is
freed) with fresh mappings that it unmaps on free, and trims free memory off the top of its
heap, so a step can touch new pages again, which the kernel zeroes one page fault at a
time; how many depends on the batch and on what the process freed before. With both
thresholds raised the pages stay in the process and the faults drop to none for every block
under the mmap cap (docs/performance.md has the counts and what they cost).
The cost: memory freed after a peak stays in the process instead of going back to the
system, which for a training loop, whose every step peaks alike, changes its resident size
little.
"""

from __future__ import annotations

import ctypes
import platform

# mallopt's parameter numbers, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks under this come from the heap: glibc's own cap for its threshold on 64-bit, which
# holds a 32-channel 28x28 fp32 activation up to batch 334.
MMAP_THRESHOLD_BYTES = 32 << 20
TRIM_THRESHOLD_BYTES = 1 << 30  # free memory kept at the heap's top before any goes back


def keep_freed_host_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process. Returns False, changing
    nothing, where the C library is not glibc (macOS, musl) or refuses the values."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success, 0 for a value it refuses.
    return mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
