"""Convolutions with one input or one output channel, computed as eight-channel ones.

The reference model's first conv (1 -> 32) and last (32 -> 1) have one channel on the 28x28
side, where its largest activations are. cuDNN has no NHWC tensor-core kernel for a single
channel, so it converts 32-channel 28x28 tensors between layouts and falls back to a slow
direct convolution: at large batches on a GPU, most of a step (the profile is in
docs/performance.md).

Padding that channel with zeros to 8 changes nothing that is computed: the extra input
channels are zero, the extra weights are zero (and not parameters: the padding is built from
the real weight at each call, so no gradient reaches it), and the extra output channels are
sliced off. Only the rounding can differ, since another kernel sums in another order. The
module keeps nn.Conv2d's parameters and names, so checkpoints are unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

CHANNELS = 8  # 16 bytes of bf16: the smallest channel count cuDNN's NHWC tensor-core kernels take


class PaddedConv2d(nn.Conv2d):
    """nn.Conv2d whose single input or output channel is padded with zeros to CHANNELS."""

    memory_format: torch.memory_format = torch.contiguous_format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if self.in_channels == 1:
            # A one-channel tensor is both NCHW and NHWC; the padded one is laid out as the
            # weights are, or cuDNN would convert it.
            x = F.pad(x, (0, 0, 0, 0, 0, CHANNELS - 1)).contiguous(memory_format=self.memory_format)
            weight = F.pad(weight, (0, 0, 0, 0, 0, CHANNELS - 1))
        if self.out_channels == 1:
            weight = F.pad(weight, (0, 0, 0, 0, 0, 0, 0, CHANNELS - 1))
            bias = F.pad(bias, (0, CHANNELS - 1)) if bias is not None else None
        y = self._conv_forward(x, weight.contiguous(memory_format=self.memory_format), bias)
        return y[:, :1] if self.out_channels == 1 else y


def pad_thin_convs(model: nn.Module, channels_last: bool) -> int:
    """Make every plain 2-d conv of `model` with one input or output channel a PaddedConv2d,
    in place (same parameters); returns how many. `channels_last`: the model's layout."""
    count = 0
    for module in model.modules():
        if type(module) is nn.Conv2d and module.groups == 1 and 1 in (module.in_channels, module.out_channels):
            module.__class__ = PaddedConv2d
            module.memory_format = torch.channels_last if channels_last else torch.contiguous_format
            count += 1
    return count
