"""The reference model's first block (conv 1 -> 32, 3x3; ReLU; 2x2 max-pool) as one GPU op.

Why: at batch 16,384 on an H100 a training step is bound by memory traffic, and most of it
is passes over 32-channel 28x28 tensors (docs/performance.md). The first block makes them
in plain form: the conv's output, the ReLU's, the pool's indices, and in the backward their
gradients, each written once and read again. Its input is one channel and its output a
quarter of the pixels, so a kernel that computes the conv in registers and applies the ReLU
and the pool before writing anything stores 1/4 of one such tensor, and saves only the
input for the backward, which recomputes the conv (9 multiply-adds per value) instead of
reading it back. Nothing 32-channel at 28x28 reaches memory, forward or backward.

It is one custom op (`mnist_denoise::first_block`) with its own backward, so torch.compile
and CUDA graphs take it as it is. On a GPU it runs the Triton kernels of
train/first_block_triton.py; elsewhere, plain tensor ops that compute the same (the form the
tests check against nn's layers in float64, and the kernels against). Only the first
position holding a window's maximum gets its gradient, as nn's max-pool does.

The conv's weight and bias enter as one [10, channels] taps matrix (9 weights, then the
bias), built from the parameters at each call: `FusedFirstBlock` keeps nn.Conv2d's
parameters and names, so checkpoints are unchanged; `fuse_first_block` swaps it in.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _patches(x: torch.Tensor) -> torch.Tensor:
    """[N, 1, H, W] -> [N, 4, H/2, W/2, 10]: for each 2x2 pooling window, the 3x3 input patch
    (zero padded) of each of its positions in row-major order, then a 1 for the bias."""
    n, _, h, w = x.shape
    cols = F.unfold(x, 3, padding=1)  # [N, 9, H*W]
    cols = torch.cat([cols, cols.new_ones(n, 1, h * w)], 1)
    return cols.view(n, 10, h // 2, 2, w // 2, 2).permute(0, 3, 5, 2, 4, 1).reshape(n, 4, h // 2, w // 2, 10)


def _conv_at_windows(x: torch.Tensor, taps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The patches, and the conv at each window position: [N, 4, H/2, W/2, C], in at least fp32."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    patches = _patches(x.to(dtype))
    return patches, patches @ taps.to(dtype)


def _check(x: torch.Tensor, taps: torch.Tensor) -> None:
    if x.dim() != 4 or x.shape[1] != 1 or x.shape[2] % 2 or x.shape[3] % 2:
        raise ValueError(f"the fused first block takes [N, 1, H, W] with H and W even, got {list(x.shape)}")
    if taps.shape[0] != 10:
        raise ValueError(f"the fused first block takes [10, channels] taps, got {list(taps.shape)}")


def _empty_output(x: torch.Tensor, channels: int, out_dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(x.shape[0], channels, x.shape[2] // 2, x.shape[3] // 2, device=x.device, dtype=out_dtype,
                       memory_format=layout)


@torch.library.custom_op("mnist_denoise::first_block", mutates_args=())
def first_block(x: torch.Tensor, taps: torch.Tensor, out_dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    """max_pool2d(relu(conv2d(x, weight, bias, padding=1)), 2) for `taps` = [weight as [C, 9]
    transposed; bias]: [N, 1, H, W] -> [N, C, H/2, W/2] in `out_dtype`, laid out NHWC where
    `channels_last`."""
    _check(x, taps)
    _, conv = _conv_at_windows(x, taps)
    pooled = F.relu(conv.amax(1)).permute(0, 3, 1, 2)
    return pooled.to(out_dtype).contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@first_block.register_kernel("cuda")
def _first_block_cuda(x: torch.Tensor, taps: torch.Tensor, out_dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    from train import first_block_triton

    _check(x, taps)
    return first_block_triton.forward(x, taps, _empty_output(x, taps.shape[1], out_dtype, channels_last))


@first_block.register_fake
def _first_block_fake(x: torch.Tensor, taps: torch.Tensor, out_dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    return _empty_output(x, taps.shape[1], out_dtype, channels_last)


@torch.library.custom_op("mnist_denoise::first_block_backward", mutates_args=())
def first_block_backward(grad: torch.Tensor, x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """The gradient with respect to `taps` of first_block's output, given the output's `grad`."""
    patches, conv = _conv_at_windows(x, taps)
    first = conv.argmax(1, keepdim=True)  # the first position holding the maximum, as nn's pool picks
    passed = torch.where(conv.amax(1, keepdim=True) > 0, grad.permute(0, 2, 3, 1).unsqueeze(1).to(conv.dtype), 0.0)
    per_position = torch.zeros_like(conv).scatter_(1, first, passed)
    return torch.einsum("nkhwt,nkhwc->tc", patches, per_position).to(taps.dtype)


@first_block_backward.register_kernel("cuda")
def _first_block_backward_cuda(grad: torch.Tensor, x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    from train import first_block_triton

    return first_block_triton.backward(grad, x, taps).to(taps.dtype)


@first_block_backward.register_fake
def _first_block_backward_fake(grad: torch.Tensor, x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(taps)


def _save_inputs(ctx, inputs, output) -> None:
    x, taps, _, _ = inputs
    ctx.save_for_backward(x, taps)


def _backward(ctx, grad: torch.Tensor):
    x, taps = ctx.saved_tensors
    if ctx.needs_input_grad[0]:
        raise RuntimeError("the fused first block does not compute its input's gradient (the model's input is data)")
    return None, first_block_backward(grad, x, taps), None, None


first_block.register_autograd(_backward, setup_context=_save_inputs)


class FusedFirstBlock(nn.Conv2d):
    """nn.Conv2d(1, C, 3, padding=1) that also applies the ReLU and the 2x2 max-pool after it."""

    channels_last: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        taps = torch.cat([self.weight.reshape(self.out_channels, 9).t(), self.bias[None]])
        return first_block(x, taps, out_dtype, self.channels_last)


def _is_first_block(conv: nn.Module, relu: nn.Module, pool: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and conv.in_channels == 1 and conv.kernel_size == (3, 3)
            and conv.stride == (1, 1) and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.bias is not None and conv.padding_mode == "zeros"
            and conv.out_channels >= 16 and conv.out_channels & (conv.out_channels - 1) == 0  # the kernels' tiles
            and type(relu) is nn.ReLU and type(pool) is nn.MaxPool2d
            and pool.kernel_size in (2, (2, 2)) and pool.stride in (2, (2, 2)) and pool.padding in (0, (0, 0))
            and pool.dilation in (1, (1, 1)) and not pool.ceil_mode and not pool.return_indices)


def fuse_first_block(model: nn.Module, channels_last: bool) -> int:
    """Make each conv (one input channel, 3x3) -> ReLU -> 2x2 max-pool run of `model`'s
    Sequentials one FusedFirstBlock followed by two Identities, in place (the same parameters
    and names); returns how many. `channels_last`: the layout the block's output should have."""
    fused = 0
    for module in model.modules():
        if not isinstance(module, nn.Sequential):
            continue
        for i in range(len(module) - 2):
            if _is_first_block(module[i], module[i + 1], module[i + 2]):
                module[i].__class__ = FusedFirstBlock
                module[i].channels_last = channels_last
                module[i + 1], module[i + 2] = nn.Identity(), nn.Identity()
                fused += 1
    return fused
