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


def test_unet_shapes_range_and_settings():
    from train.model import UNet

    for levels in (1, 2, 3):
        m = build_model("unet", channels=4, levels=levels)
        assert isinstance(m, UNet) and len(m.encoder) == levels and len(m.decoder) == levels - 1
        out = m(torch.rand(3, 1, 28, 28))
        assert out.shape == (3, 1, 28, 28) and (out >= 0).all() and (out <= 1).all()
    widths = [block[0].out_channels for block in build_model("unet", channels=8, levels=3).encoder]
    assert widths == [8, 16, 32]  # doubling at each coarser level
    narrow_top = build_model("unet", channels=8, levels=3, top_channels=4)
    assert [block[0].out_channels for block in narrow_top.encoder] == [4, 16, 32]  # only 28x28 changes
    assert narrow_top.upsample[0].out_channels == 4 and narrow_top.decoder[0][0].in_channels == 8
    assert narrow_top(torch.rand(2, 1, 28, 28)).shape == (2, 1, 28, 28)


def test_untrained_unet_is_the_identity_and_trains_through_the_clip():
    m = build_model("unet", channels=4, levels=2)
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(m(x), x)  # zero-initialised noise head: starts from the noisy input
    # A pixel the model pushes below 0 is clipped in the output, yet still gets a gradient
    # towards its target (a hard clamp would leave it stuck).
    with torch.no_grad():
        m.head.bias.fill_(2.0)  # predicts noise 2: every output clipped to 0
    out = m(x)
    assert (out == 0).all()
    torch.nn.functional.mse_loss(out, torch.full_like(x, 0.5)).backward()
    assert m.head.bias.grad.item() > 0  # lowering the predicted noise raises the output: descent lowers the bias


def test_models_are_built_from_their_config_section():
    from train.config import load_config

    cfg = load_config(None, ["model.name=unet", "model.unet.channels=6", "model.unet.levels=2"])
    m = build_model(cfg.model.name, **cfg.model.settings())
    assert m.encoder[0][0].out_channels == 6 and len(m.encoder) == 2
    assert load_config(None).model.settings() == {}  # the reference model has no settings
