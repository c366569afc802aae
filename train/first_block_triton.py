"""The Triton kernels behind train/first_block.py: the first block's forward and backward.

Each program takes a block of 2x2 pooling windows (image, row, column of the pooled map) and
works on all 32 channels at once. For each of a window's four positions it loads the 3x3
input patch as a row of a [windows, 16] matrix (taps 0-8, then a 1 that multiplies the bias,
then zeros), so one product with the [16, channels] taps matrix gives the conv there.

- forward: the four products, their maximum, the ReLU; only the pooled value is stored.
- backward: the same four products again (the conv is recomputed from the one-channel input,
  not read back), the first position holding the maximum gets the window's gradient (as
  nn's max-pool does) where the ReLU passed it, and the gradient of the taps accumulates as
  patches^T x gradients. Each program sums a fixed run of blocks into one [16, channels]
  partial sum; the caller adds those up (a fixed order: the result repeats bit for bit).

The products round as cuDNN's convolutions do under torch's settings: TF32 tensor cores
where `torch.backends.cudnn.allow_tf32` (the default), full fp32 where not. Under bf16
autocast both are more precise than the bf16 conv they replace. Indices are int32: the
launchers refuse tensors of 2**31 elements or more.

Checked without a GPU too: tests/probes/first_block_probe.py runs the kernels in Triton's
interpreter (TRITON_INTERPRET=1) against the reference form.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TAPS = 16  # rows of the taps matrix: 9 weights, the bias, zeros (tl.dot needs 16)
# Tile sizes, chosen offline (ptxas for sm_90, 4 warps): the largest blocks that neither
# spill registers nor hold the occupancy under about 20 warps per SM (forward: 94
# registers; backward: 80 registers and 15 KiB of shared memory). Not yet tuned on a GPU.
FORWARD_BLOCK = 32  # pooling windows per program
BACKWARD_BLOCK = 16  # pooling windows per step of a program
BLOCKS_PER_PROGRAM = 16  # backward: 256 windows per partial sum (25 MiB of them at batch 16,384)


@triton.jit
def _patches(x_ptr, n, i, j, a, b, valid, H, W, sxn, sxh, sxw):
    """The [BLOCK, TAPS] patches of window position (a, b) (row and column within the window)."""
    t = tl.arange(0, 16)
    row = (2 * i + a - 1)[:, None] + (t // 3)[None, :]
    col = (2 * j + b - 1)[:, None] + (t % 3)[None, :]
    inside = valid[:, None] & (t < 9)[None, :] & (row >= 0) & (row < H) & (col >= 0) & (col < W)
    patch = tl.load(x_ptr + n[:, None] * sxn + row * sxh + col * sxw, mask=inside, other=0.0).to(tl.float32)
    return tl.where(valid[:, None] & (t == 9)[None, :], 1.0, patch)


@triton.jit
def _windows(q, windows, W2, HW2):
    """Image, row and column of pooling windows q, and which of them exist."""
    valid = q < windows
    n = q // HW2
    r = q % HW2
    return n, r // W2, r % W2, valid


@triton.jit
def _forward_kernel(x_ptr, taps_ptr, out_ptr, windows, H, W, sxn, sxh, sxw, son, soc, soh, sow,
                    C: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr):
    q = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    n, i, j, valid = _windows(q, windows, W // 2, (H // 2) * (W // 2))
    c = tl.arange(0, C)
    taps = tl.load(taps_ptr + tl.arange(0, 16)[:, None] * C + c[None, :])
    m = tl.dot(_patches(x_ptr, n, i, j, 0, 0, valid, H, W, sxn, sxh, sxw), taps, input_precision=PRECISION)
    m = tl.maximum(m, tl.dot(_patches(x_ptr, n, i, j, 0, 1, valid, H, W, sxn, sxh, sxw), taps, input_precision=PRECISION))
    m = tl.maximum(m, tl.dot(_patches(x_ptr, n, i, j, 1, 0, valid, H, W, sxn, sxh, sxw), taps, input_precision=PRECISION))
    m = tl.maximum(m, tl.dot(_patches(x_ptr, n, i, j, 1, 1, valid, H, W, sxn, sxh, sxw), taps, input_precision=PRECISION))
    out = out_ptr + n[:, None] * son + c[None, :] * soc + (i * soh + j * sow)[:, None]
    tl.store(out, tl.maximum(m, 0.0).to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=valid[:, None])


@triton.jit
def _backward_kernel(x_ptr, taps_ptr, grad_ptr, partial_ptr, windows, H, W, sxn, sxh, sxw, sgn, sgc, sgh, sgw,
                     C: tl.constexpr, BLOCK: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    c = tl.arange(0, C)
    t = tl.arange(0, 16)
    taps = tl.load(taps_ptr + t[:, None] * C + c[None, :])
    acc = tl.zeros((16, C), dtype=tl.float32)
    for block in range(BLOCKS_PER_PROGRAM):
        q = (pid * BLOCKS_PER_PROGRAM + block) * BLOCK + tl.arange(0, BLOCK)
        n, i, j, valid = _windows(q, windows, W // 2, (H // 2) * (W // 2))
        # The patches are loaded again for the gradient's products (from L1) rather than
        # kept: fewer registers live, no spilling.
        v0 = tl.dot(_patches(x_ptr, n, i, j, 0, 0, valid, H, W, sxn, sxh, sxw), taps, input_precision=PRECISION)
        v1 = tl.dot(_patches(x_ptr, n, i, j, 0, 1, valid, H, W, sxn, sxh, sxw), taps, input_precision=PRECISION)
        v2 = tl.dot(_patches(x_ptr, n, i, j, 1, 0, valid, H, W, sxn, sxh, sxw), taps, input_precision=PRECISION)
        v3 = tl.dot(_patches(x_ptr, n, i, j, 1, 1, valid, H, W, sxn, sxh, sxw), taps, input_precision=PRECISION)
        m = tl.maximum(tl.maximum(v0, v1), tl.maximum(v2, v3))
        grad = tl.load(grad_ptr + n[:, None] * sgn + c[None, :] * sgc + (i * sgh + j * sgw)[:, None],
                       mask=valid[:, None], other=0.0).to(tl.float32)
        grad = tl.where(m > 0.0, grad, 0.0)  # the ReLU's gradient
        # The first position (row-major) that holds the maximum takes the gradient.
        s0 = v0 == m
        s1 = (v1 == m) & ~s0
        s2 = (v2 == m) & ~(s0 | s1)
        s3 = ~(s0 | s1 | s2)
        p = _patches(x_ptr, n, i, j, 0, 0, valid, H, W, sxn, sxh, sxw)
        acc = tl.dot(tl.trans(p), tl.where(s0, grad, 0.0), acc, input_precision=PRECISION)
        p = _patches(x_ptr, n, i, j, 0, 1, valid, H, W, sxn, sxh, sxw)
        acc = tl.dot(tl.trans(p), tl.where(s1, grad, 0.0), acc, input_precision=PRECISION)
        p = _patches(x_ptr, n, i, j, 1, 0, valid, H, W, sxn, sxh, sxw)
        acc = tl.dot(tl.trans(p), tl.where(s2, grad, 0.0), acc, input_precision=PRECISION)
        p = _patches(x_ptr, n, i, j, 1, 1, valid, H, W, sxn, sxh, sxw)
        acc = tl.dot(tl.trans(p), tl.where(s3, grad, 0.0), acc, input_precision=PRECISION)
    tl.store(partial_ptr + pid * 16 * C + t[:, None] * C + c[None, :], acc)


def _check_sizes(*tensors: torch.Tensor) -> None:
    for tensor in tensors:
        if tensor.numel() >= 2**31:  # the kernels index in int32
            raise ValueError(f"first block kernels: a tensor of {tensor.numel()} elements needs int64 indexing; "
                             "use a smaller batch or perf.fuse_first_block=false")


def _padded(taps: torch.Tensor) -> torch.Tensor:
    """The [10, C] taps as the kernels' contiguous fp32 [16, C]."""
    return torch.cat([taps.float(), taps.new_zeros(TAPS - len(taps), taps.shape[1], dtype=torch.float32)]).contiguous()


def _precision() -> str:
    """TF32 products where cuDNN's convolutions may use TF32 (torch's default), so the fused
    block rounds as the conv it replaces; full fp32 where they may not."""
    return "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"


def forward(x: torch.Tensor, taps: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Write the block's output for input `x` [N, 1, H, W] into `out` [N, C, H/2, W/2] (any strides)."""
    _check_sizes(x, out)
    windows = out.shape[0] * out.shape[2] * out.shape[3]
    _forward_kernel[(triton.cdiv(windows, FORWARD_BLOCK),)](
        x, _padded(taps), out, windows, x.shape[2], x.shape[3], x.stride(0), x.stride(2), x.stride(3), *out.stride(),
        C=out.shape[1], BLOCK=FORWARD_BLOCK, PRECISION=_precision(), num_warps=4)
    return out


def backward(grad: torch.Tensor, x: torch.Tensor, taps: torch.Tensor,
             blocks_per_program: int = BLOCKS_PER_PROGRAM) -> torch.Tensor:
    """The gradient with respect to `taps` [10, C] (fp32) of the block's output, given the
    output's `grad`; each program sums `blocks_per_program` blocks of windows."""
    _check_sizes(x, grad)
    windows = grad.shape[0] * grad.shape[2] * grad.shape[3]
    programs = triton.cdiv(windows, BACKWARD_BLOCK * blocks_per_program)
    partial = torch.empty(programs, TAPS, grad.shape[1], device=grad.device, dtype=torch.float32)
    _backward_kernel[(programs,)](
        x, _padded(taps), grad, partial, windows, x.shape[2], x.shape[3], x.stride(0), x.stride(2), x.stride(3),
        *grad.stride(), C=grad.shape[1], BLOCK=BACKWARD_BLOCK, BLOCKS_PER_PROGRAM=blocks_per_program,
        PRECISION=_precision(), num_warps=4)
    return partial.sum(0)[:len(taps)]
