"""Gaussian pixel noise that is a pure function of (seed, epoch, sample index).

A stateful generator would give a sample different noise depending on which process drew
it, in which batch, after how many draws. Instead each pixel's noise comes from a
counter-based hash of (seed, epoch, sample index, pixel), computed with integer tensor ops
on the device that trains the batch: identical for 1 or 64 processes, any batch size, and
after a resume, with nothing to checkpoint.
"""

from __future__ import annotations

import math

import torch

_MASK32 = 0xFFFFFFFF
EVAL_EPOCH = -1  # the stream of the fixed evaluation noise; training epochs count from 0


def _signed32(v: int) -> int:
    """The int32 with the same 32 bits as unsigned `v`."""
    v &= _MASK32
    return v - (1 << 32) if v >= (1 << 31) else v


_M1, _M2 = _signed32(0x7FEB352D), _signed32(0x846CA68B)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """Wellons' 'lowbias32' integer hash on int32 tensors (as 32-bit patterns).

    int32 keeps it ~8x faster than int64 on the CPU. Multiplies wrap mod 2**32, as the hash
    wants; `>>` is arithmetic on signed ints, so each shift is masked to make it logical.
    """
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _M1
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _M2
    return x ^ ((x >> 16) & 0xFFFF)


def stream_key(seed: int, epoch: int) -> int:
    """Fold (seed, epoch) into one 32-bit key (host-side, once per batch or epoch)."""
    key = _mix32(torch.tensor(_signed32(seed), dtype=torch.int32))
    key = _mix32(key ^ _signed32(seed >> 32))
    return int(_mix32(key ^ _signed32(epoch)))


def gaussian(indices: torch.Tensor, shape: tuple[int, ...], seed: int, epoch: int) -> torch.Tensor:
    """Standard normal noise of shape (len(indices), *shape), float32, on `indices.device`.

    Row i depends only on (seed, epoch, indices[i]): the same sample gets the same noise in
    any batch, on any process. Box-Muller over two hashed uniforms per value. Epoch
    EVAL_EPOCH is kept for the fixed evaluation noise.
    """
    return keyed_gaussian(indices, shape, stream_key(seed, epoch))


def keyed_gaussian(indices: torch.Tensor, shape: tuple[int, ...], key: int | torch.Tensor) -> torch.Tensor:
    """`gaussian` for the stream `key` = stream_key(seed, epoch): an int, or an int32 scalar
    tensor on the device (so a captured CUDA graph can change epochs without re-capture)."""
    numel = math.prod(shape)
    # Counter of each value: 2 per pixel (two uniforms), numel pixels per sample; for MNIST
    # (60,000 x 784 x 2) it stays below 2**27, well inside int32 (index < 2**30 / (2 numel)).
    pixel = torch.arange(numel, device=indices.device, dtype=torch.int32)
    counter = (indices.to(torch.int32)[:, None] * numel + pixel[None, :]) * 2
    bits1 = _mix32(_mix32(counter ^ key) + key)
    bits2 = _mix32(_mix32((counter + 1) ^ key) + key)
    # 24 high bits -> uniform in (0, 1), excluding 0 so the log is finite.
    u1 = (((bits1 >> 8) & 0xFFFFFF).to(torch.float32) + 0.5) * (1.0 / (1 << 24))
    u2 = (((bits2 >> 8) & 0xFFFFFF).to(torch.float32) + 0.5) * (1.0 / (1 << 24))
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)
    return z.view(len(indices), *shape)


def add_noise(clean: torch.Tensor, indices: torch.Tensor, factor: float, seed: int, epoch: int) -> torch.Tensor:
    """The reference corruption: clean + factor * N(0, 1), clipped back to [0, 1]."""
    return keyed_add_noise(clean, indices, factor, stream_key(seed, epoch))


def keyed_add_noise(clean: torch.Tensor, indices: torch.Tensor, factor: float, key: int | torch.Tensor) -> torch.Tensor:
    """`add_noise` for the stream `key` (see keyed_gaussian)."""
    z = keyed_gaussian(indices, tuple(clean.shape[1:]), key)
    return (clean + factor * z).clamp_(0.0, 1.0)
