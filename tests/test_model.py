"""The reference model: exact layer list, shapes, output range."""

import torch
from torch import nn

from train.model import ConvDenoiser, build_model


def test_layers_are_the_reference_model():
    m = ConvDenoiser()
    layers = [(type(l).__name__, getattr(l, "in_channels", None), getattr(l, "out_channels", None),
               getattr(l, "kernel_size", None), getattr(l, "stride", None)) for l in m.modules()
              if not isinstance(l, (nn.Sequential, ConvDenoiser))]
    assert layers == [
        ("Conv2d", 1, 32, (3, 3), (1, 1)), ("ReLU",) + (None,) * 4, ("MaxPool2d", None, None, 2, 2),
        ("Conv2d", 32, 16, (3, 3), (1, 1)), ("ReLU",) + (None,) * 4, ("MaxPool2d", None, None, 2, 2),
        ("Conv2d", 16, 8, (3, 3), (1, 1)), ("ReLU",) + (None,) * 4, ("MaxPool2d", None, None, 2, 2),
        ("ConvTranspose2d", 8, 8, (3, 3), (2, 2)), ("ReLU",) + (None,) * 4,
        ("ConvTranspose2d", 8, 16, (2, 2), (2, 2)), ("ReLU",) + (None,) * 4,
        ("ConvTranspose2d", 16, 32, (2, 2), (2, 2)), ("ReLU",) + (None,) * 4,
        ("Conv2d", 32, 1, (3, 3), (1, 1)), ("Sigmoid",) + (None,) * 4,
    ]
    assert sum(p.numel() for p in m.parameters()) == 9585


def test_shapes_through_the_network():
    m = ConvDenoiser()
    x = torch.rand(5, 1, 28, 28)
    assert m.encoder(x).shape == (5, 8, 3, 3)
    out = m(x)
    assert out.shape == (5, 1, 28, 28)
    assert torch.isfinite(out).all() and (out >= 0).all() and (out <= 1).all()


def test_registry_builds_by_name():
    assert isinstance(build_model("conv_denoiser"), ConvDenoiser)
