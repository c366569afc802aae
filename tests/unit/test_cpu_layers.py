"""The CPU forms of train/speed/cpu_layers.py compute what the layers they replace compute."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from train.speed.cpu_layers import ConvToOne, Upsample2x, cpu_layers_unsupported, use_cpu_layers
from train.model import ConvDenoiser, UNet

def _forward_backward(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Output, input gradient and parameter gradients for one random output gradient."""
    x = x.clone().requires_grad_()
    y = layer(x)
    torch.manual_seed(1)
    y.backward(torch.randn(y.shape, dtype=y.dtype))  # not randn_like: that follows the memory layout
    return (y, x.grad, *(p.grad for p in layer.parameters()))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("make, form, in_channels", [
    (lambda bias: nn.Conv2d(5, 1, 3, padding=1, bias=bias), ConvToOne, 5),
    (lambda bias: nn.ConvTranspose2d(3, 4, 2, stride=2, bias=bias), Upsample2x, 3),
], ids=["conv_to_one", "upsample2x"])
def test_each_form_computes_its_layer_in_float64(make, form, in_channels, bias, channels_last):
    """Odd sizes (5 x 7, batch 3), so a mixed-up axis or a shifted tap cannot pass."""
    torch.manual_seed(0)
    plain = make(bias).double()
    fast = copy.deepcopy(plain)
    fast.__class__ = form
    x = torch.randn(3, in_channels, 5, 7, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    expected, got = _forward_backward(plain, x), _forward_backward(fast, x)
    assert len(got) == len(expected) == 3 + bias  # output, input gradient, weight (and bias) gradients
    for e, g in zip(expected, got, strict=True):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_the_reference_model_keeps_its_parameters_and_computes_the_same():
    torch.manual_seed(0)
    plain = ConvDenoiser().double()
    fast = copy.deepcopy(plain)
    # The 32 -> 1 conv, the two kernel-2 transposed convs and three ReLU/max-pool pairs; the
    # 1 -> 32 conv and the kernel-3 transposed conv stay nn's.
    assert use_cpu_layers(fast) == 6
    assert [type(m).__name__ for m in fast.decoder] == ["ConvTranspose2d", "ReLU", "Upsample2x", "ReLU", "Upsample2x",
                                                        "ReLU", "ConvToOne", "Sigmoid"]
    assert [type(m).__name__ for m in fast.encoder][:3] == ["Conv2d", "MaxPool2d", "ReLU"]
    assert list(fast.state_dict()) == list(plain.state_dict())  # checkpoints are unchanged
    x = torch.rand(4, 1, 28, 28, dtype=torch.float64)
    for e, g in zip(_forward_backward(plain, x), _forward_backward(fast, x), strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_pooling_before_relu_is_exact_in_float32():
    """ReLU and max-pool commute: the swap alone changes no bit of the output or gradients,
    ties included (a third of the inputs are exactly 0 or the same negative value)."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2), nn.Conv2d(4, 3, 1))
    swapped = copy.deepcopy(plain)
    assert use_cpu_layers(swapped) == 1
    assert [type(m) for m in swapped] == [nn.Conv2d, nn.MaxPool2d, nn.ReLU, nn.Conv2d]
    x = torch.randn(5, 2, 8, 8)
    x[:, :, ::3] = 0.0
    x[:, :, 1::3, ::2] = -1.0
    for e, g in zip(_forward_backward(plain, x), _forward_backward(swapped, x), strict=True):
        assert torch.equal(g, e)


def test_only_matching_layers_change():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 1, 3), nn.Conv2d(4, 1, 3, padding=1, stride=2),
                          nn.Conv2d(4, 1, 1), nn.ConvTranspose2d(4, 4, 3, stride=2), nn.ConvTranspose2d(4, 4, 2),
                          nn.ConvTranspose2d(4, 4, 2, stride=2, padding=1), nn.MaxPool2d(2), nn.ReLU(),
                          nn.Conv2d(4, 1, 3, padding=1), nn.ConvTranspose2d(4, 2, 2, stride=2))
    assert use_cpu_layers(model) == 2
    assert [type(m) for m in model][-2:] == [ConvToOne, Upsample2x]
    assert all(type(m).__module__.startswith("torch.nn") for m in list(model)[:-2])


def test_the_unet_trains_the_same_with_the_cpu_forms():
    """The U-Net's upsampling convs are kernel-2 stride-2 too; its 1x1 head stays nn's."""
    torch.manual_seed(0)
    plain = UNet(4, 2).double()
    fast = copy.deepcopy(plain)
    assert use_cpu_layers(fast) == 1
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    for e, g in zip(_forward_backward(plain, x), _forward_backward(fast, x), strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device, precision, compiled, reason", [
    ("cpu", "no", False, ""), ("cuda", "no", False, "the device is cuda"), ("cpu", "bf16", False, "bf16"),
    ("cpu", "no", True, "perf.compile=true"),
])
def test_the_forms_apply_to_fp32_eager_cpu_runs_only(device, precision, compiled, reason):
    said = cpu_layers_unsupported(device, precision, compiled)
    assert (reason in said) if reason else said == ""


