"""Pixel noise (Gaussian or salt-and-pepper) that is a pure function of (seed, epoch, sample index).

A stateful generator would give a sample different noise depending on which process drew
it, in which batch, after how many draws. Instead each pixel's noise comes from a
counter-based hash of (seed, epoch, sample index, pixel), computed with integer tensor ops
on the device that trains the batch: identical for 1 or 64 processes, any batch size, and
after a resume, with nothing to checkpoint. A per-sample noise level comes from the same
hash of (seed, epoch, sample index). The hash and its uniforms are equal to the bit on any
machine; the Gaussians go through log, sqrt and cos, which other kinds of CPU (AVX2 against
AVX-512) or a GPU round differently, by about one float32 ulp.
"""

from __future__ import annotations

import math

import torch

from train.config import NoiseSpec  # noqa: F401 (the spec is config; noise.NoiseSpec for the callers)

_MASK32 = 0xFFFFFFFF
EVAL_EPOCH = -1  # the stream of the fixed evaluation noise; training epochs count from 0


def _signed32(v: int) -> int:
    """The int32 with the same 32 bits as unsigned `v`."""
    v &= _MASK32
    return v - (1 << 32) if v >= (1 << 31) else v


_M1, _M2 = _signed32(0x7FEB352D), _signed32(0x846CA68B)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """Wellons' 'lowbias32' integer hash on int32 tensors (as 32-bit patterns).

    int32 because the CPU hashes it faster than int64. Multiplies wrap mod 2**32, as the hash
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


def _uniforms(counter: torch.Tensor, key: int | torch.Tensor) -> torch.Tensor:
    """A uniform in (0, 1) per int32 counter value, for the stream `key`."""
    bits = _mix32(_mix32(counter ^ key) + key)
    # 24 high bits -> uniform in (0, 1), excluding 0 so a log of it is finite.
    return (((bits >> 8) & 0xFFFFFF).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def _pixel_uniforms(indices: torch.Tensor, numel: int, key: int | torch.Tensor,
                    wide: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent uniforms per pixel, shape (len(indices), numel) each."""
    # Counter of each value: 2 per pixel, numel pixels per sample; for MNIST
    # (60,000 x 784 x 2) it stays below 2**27, well inside int32 (index < 2**30 / (2 numel)).
    # `wide` (pictures, whose index x numel may pass 2**30): the index goes into each sample's
    # key instead, and the counter is the pixel's alone.
    # Both values of a pixel are hashed in one pass over a (..., 2) tensor: half the eager
    # kernels of two passes (each kernel is a launch, which dominates small GPU batches).
    pixel = torch.arange(numel, device=indices.device, dtype=torch.int32)
    pair = torch.arange(2, device=indices.device, dtype=torch.int32)
    if wide:
        key = _mix32(torch.as_tensor(key, dtype=torch.int32, device=indices.device) ^ _mix32(indices.to(torch.int32)))
        u = _uniforms((pixel[None, :, None] * 2) + pair, key.view(-1, 1, 1))
    else:
        counter = ((indices.to(torch.int32)[:, None] * numel + pixel[None, :]) * 2)[:, :, None] + pair
        u = _uniforms(counter, key)
    return u[..., 0], u[..., 1]


def keyed_gaussian(indices: torch.Tensor, shape: tuple[int, ...], key: int | torch.Tensor,
                   wide: bool = False) -> torch.Tensor:
    """Standard normal noise of shape (len(indices), *shape), float32, on `indices.device`, for
    the stream `key` = stream_key(seed, epoch): an int, or an int32 scalar tensor on the device
    (so a compiled function serves every epoch without recompiling). Row i depends only on
    (key, indices[i]): the same sample gets the same noise in any batch, on any process."""
    u1, u2 = _pixel_uniforms(indices, math.prod(shape), key, wide)
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)  # Box-Muller
    return z.view(len(indices), *shape)


_LEVEL_SALT = _signed32(0x9E3779B9)  # separates the per-sample level stream from the pixels'


def sample_levels(indices: torch.Tensor, key: int | torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Each sample's noise level, uniform in [low, high], float32 of shape (len(indices),)."""
    level_key = _mix32(torch.as_tensor(key, dtype=torch.int32, device=indices.device) ^ _LEVEL_SALT)
    return low + (high - low) * _uniforms(indices.to(torch.int32), level_key)


def add_noise(clean: torch.Tensor, indices: torch.Tensor, spec: NoiseSpec | float, seed: int, epoch: int,
              wide: bool = False) -> torch.Tensor:
    """Corrupt `clean` (N, C, H, W) in [0, 1] by `spec` (a float: the reference Gaussian
    level), with the noise of (seed, epoch, indices); `wide` for pictures (see _pixel_uniforms)."""
    return keyed_add_noise(clean, indices, spec, stream_key(seed, epoch), wide)


def keyed_add_noise(clean: torch.Tensor, indices: torch.Tensor, spec: NoiseSpec | float,
                    key: int | torch.Tensor, wide: bool = False) -> torch.Tensor:
    """`add_noise` for the stream `key` (see keyed_gaussian).

    gaussian: clean + level x N(0, 1), clipped back to [0, 1] (the reference corruption).
    salt_pepper: each pixel, with probability level, becomes 0 or 1 (half each).
    """
    if not isinstance(spec, NoiseSpec):
        spec = NoiseSpec("gaussian", float(spec), float(spec))
    if spec.low == spec.high:
        level: float | torch.Tensor = spec.low
    else:
        level = sample_levels(indices, key, spec.low, spec.high).view(-1, *([1] * (clean.dim() - 1)))
    if spec.kind == "gaussian":
        z = keyed_gaussian(indices, tuple(clean.shape[1:]), key, wide)
        return (clean + level * z).clamp_(0.0, 1.0)
    if spec.kind == "salt_pepper":
        u1, u2 = _pixel_uniforms(indices, math.prod(clean.shape[1:]), key, wide)
        hit, salt = u1.view_as(clean) < level, (u2.view_as(clean) < 0.5).to(clean.dtype)
        return torch.where(hit, salt, clean)
    raise ValueError(f"unknown noise kind {spec.kind!r}")
