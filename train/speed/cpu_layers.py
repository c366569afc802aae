"""Faster CPU forms of two of the reference model's layers; the same results up to rounding.

Two of the reference model's layers are, underneath, a few matrix products over the NHWC
activations (rows: pixels, columns: channels), in shapes oneDNN's convolution kernels serve
less well on the CPUs measured (docs/performance.md):

- the last conv, 32 -> 1 channels, 3x3: one product gives the 9 taps of every pixel, and
  the output sums the 9 tap maps shifted by their offsets;
- a transposed conv with kernel = stride = 2: its 2x2 output blocks do not overlap, so each
  input pixel's block is one row of a product, and a permuted copy lays them out as NHWC.

Written here as autograd Functions that call BLAS. Which operand is transposed matters to
BLAS on these skinny shapes, so each product is written the fast way round. The modules keep nn.Conv2d's and nn.ConvTranspose2d's parameters and names,
so checkpoints are unchanged; `use_cpu_layers` swaps them in place.

It also moves each max-pool that follows a ReLU in front of it: ReLU is monotonic, so the
two commute exactly (the same outputs and, since the pool's first-maximum rule picks the
same element, the same gradients, bit for bit), and the ReLU then touches a quarter of the
pixels.

What it is worth, and why the first conv (1 -> 32) stays oneDNN's: docs/performance.md
(bench/cpu_layers.py alternates the two forms in one process; --layers times each layer).

fp32 only: under bf16 autocast oneDNN's kernels are the ones to use (CPUs with AMX), and on
a GPU cuDNN's. tests/unit/test_cpu_layers.py checks each form against the layer it replaces in
float64, outputs and gradients.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N*H*W, C]: one row per pixel (a view when x is channels_last)."""
    n, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(n * h * w, c)


def _windows(padded: torch.Tensor, h: int, w: int, flipped: bool = False) -> list[torch.Tensor]:
    """The nine h x w windows of a [..., h+2, w+2] tensor, tap k = 3*ky + kx of a 3x3 kernel;
    `flipped` gives tap k the window that the gradient of an output at offset k comes from."""
    if flipped:
        return [padded[..., 2 - ky:2 - ky + h, 2 - kx:2 - kx + w] for ky in range(3) for kx in range(3)]
    return [padded[..., ky:ky + h, kx:kx + w] for ky in range(3) for kx in range(3)]


class _ConvToOne(torch.autograd.Function):
    """3x3 conv, padding 1, C -> 1 channel: out = sum over the 9 taps of (pixels x weights)
    shifted by the tap's offset. The product gives all 9 taps of every pixel in one pass
    over the C-channel input; the shifted sums run over 1-channel maps only."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        n, c, h, w = x.shape
        x = x.contiguous(memory_format=torch.channels_last)
        taps = torch.mm(weight.reshape(c, 9).t(), _rows(x).t()).view(9, n, h, w)  # [9, pixels]
        windows = _windows(F.pad(taps, (1, 1, 1, 1)), h, w)
        out = windows[0][0].clone()
        for k in range(1, 9):
            out += windows[k][k]
        if bias is not None:
            out += bias
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return out.unsqueeze(1)

    @staticmethod
    @once_differentiable  # no second derivatives: training needs none
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        n, c, h, w = x.shape
        g = grad_out.reshape(n, h, w)
        # Tap k of pixel p fed the output at p minus the tap's offset: its gradient. One row
        # per pixel: [pixels, 9] row-major is the operand layout BLAS is fast with here.
        grad_taps = torch.stack(_windows(F.pad(g, (1, 1, 1, 1)), h, w, flipped=True), dim=-1).view(n * h * w, 9)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(grad_taps, weight.reshape(c, 9).t()).view(n, h, w, c).permute(0, 3, 1, 2)
        if ctx.needs_input_grad[1]:
            grad_w = torch.mm(grad_taps.t(), _rows(x)).t().reshape(weight.shape)
            # In the weight's own strides (a copy of C x 9 values): the view's size-1 dimension
            # has another stride, which DDP takes for a layout mismatch and warns about each step.
            grad_w = torch.empty_strided(weight.shape, weight.stride(), dtype=grad_w.dtype, device=grad_w.device).copy_(grad_w)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum().view(1)
        return grad_x, grad_w, grad_b


class _Upsample2x(torch.autograd.Function):
    """Transposed conv with kernel = stride = 2, no padding: the 2x2 output blocks do not
    overlap, so each input pixel's block is one row of (pixels x [C_in, 2*2*C_out])."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        n, c_in, h, w = x.shape
        c_out = weight.shape[1]
        x = x.contiguous(memory_format=torch.channels_last)
        wm = weight.permute(0, 2, 3, 1).reshape(c_in, 4 * c_out)  # columns: (row a, column b, channel)
        blocks = torch.mm(_rows(x), wm) if bias is None else torch.addmm(bias.repeat(4), _rows(x), wm)
        y = blocks.view(n, h, w, 2, 2, c_out).permute(0, 1, 3, 2, 4, 5).reshape(n, 2 * h, 2 * w, c_out)
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return y.permute(0, 3, 1, 2)

    @staticmethod
    @once_differentiable  # no second derivatives: training needs none
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        n, c_in, h, w = x.shape
        c_out = weight.shape[1]
        grad_blocks = (grad_out.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
                       .reshape(n, h, 2, w, 2, c_out).permute(0, 1, 3, 2, 4, 5).reshape(n * h * w, 4 * c_out))
        wm = weight.permute(0, 2, 3, 1).reshape(c_in, 4 * c_out)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(grad_blocks, wm.t()).view(n, h, w, c_in).permute(0, 3, 1, 2)
        if ctx.needs_input_grad[1]:
            grad_w = torch.mm(_rows(x).t(), grad_blocks).view(c_in, 2, 2, c_out).permute(0, 3, 1, 2)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_blocks.view(-1, c_out).sum(0)
        return grad_x, grad_w, grad_b


class ConvToOne(nn.Conv2d):
    """nn.Conv2d (3x3, padding 1, one output channel) computed by `_ConvToOne`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ConvToOne.apply(x, self.weight, self.bias)


class Upsample2x(nn.ConvTranspose2d):
    """nn.ConvTranspose2d (kernel = stride = 2, no padding) computed by `_Upsample2x`."""

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if output_size is not None:  # another size than 2x needs output padding: nn's own kernel
            return super().forward(x, output_size)
        return _Upsample2x.apply(x, self.weight, self.bias)


def _cpu_form(m: nn.Module) -> type | None:
    """The class that computes `m` faster on a CPU, or None where there is none."""
    if (type(m) is nn.Conv2d and m.out_channels == 1 and m.kernel_size == (3, 3) and m.stride == (1, 1)
            and m.padding == (1, 1) and m.dilation == (1, 1) and m.groups == 1 and m.padding_mode == "zeros"):
        return ConvToOne
    if (type(m) is nn.ConvTranspose2d and m.kernel_size == (2, 2) and m.stride == (2, 2) and m.padding == (0, 0)
            and m.output_padding == (0, 0) and m.dilation == (1, 1) and m.groups == 1):
        return Upsample2x
    return None


def cpu_layers_unsupported(device_type: str, mixed_precision: str, compiled: bool) -> str:
    """Why the CPU forms do not apply to a run on this device in this precision ('' where they do)."""
    if device_type != "cpu":
        return f"the device is {device_type} (its own library's kernels are the ones to use)"
    if mixed_precision != "no":
        return f"mixed precision {mixed_precision} (the forms are for fp32)"
    if compiled:
        return "perf.compile=true (inductor picks the kernels)"
    return ""


def use_cpu_layers(model: nn.Module) -> int:
    """Give `model`'s matching layers their CPU forms and pool before ReLU, in place (the same
    parameters and names); returns how many layers changed."""
    changed = 0
    for m in model.modules():
        form = _cpu_form(m)
        if form is not None:
            m.__class__ = form
            changed += 1
        if isinstance(m, nn.Sequential):
            for i in range(len(m) - 1):
                if type(m[i]) is nn.ReLU and type(m[i + 1]) is nn.MaxPool2d and not m[i + 1].return_indices:
                    m[i], m[i + 1] = m[i + 1], m[i]
                    changed += 1
    return changed
