"""The denoising models. Only `nn.Module`s live here: no optimizer, accelerate or logging."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvDenoiser(nn.Module):
    """The reference convolutional denoising autoencoder; 28x28 in, 28x28 out in [0, 1].

    Encoder: three 3x3 convs (1->32->16->8, padding 1), each with ReLU and a 2x2 max-pool
    (28 -> 14 -> 7 -> 3). Decoder: transposed convs 8->8 (k3, s2: 3 -> 7), 8->16 (k2, s2:
    7 -> 14), 16->32 (k2, s2: 14 -> 28), each with ReLU, then a 3x3 conv 32->1 and a sigmoid.
    """

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(32, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(16, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(8, 8, 3, stride=2), nn.ReLU(),
            nn.ConvTranspose2d(8, 16, 2, stride=2), nn.ReLU(),
            nn.ConvTranspose2d(16, 32, 2, stride=2), nn.ReLU(),
            nn.Conv2d(32, 1, 3, padding=1), nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def _double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    """Two 3x3 convs (padding 1, so the size is kept), each followed by a ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1), nn.ReLU(inplace=True),
    )


def unet_widths(channels: int, levels: int, top_channels: int = 0) -> list[int]:
    """The U-Net's feature maps per level, 28x28 first: `channels` doubled at each coarser
    level, except 28x28, which has `top_channels` where that is > 0."""
    return [top_channels if i == 0 and top_channels > 0 else channels * 2**i for i in range(levels)]


class UNet(nn.Module):
    """A small U-Net that predicts the noise; fully convolutional: a picture of any size (and
    `image_channels` channels) in, the same size out, in [0, 1]. Sizes that the pooling does
    not halve evenly are padded at the bottom and right (edge pixels repeated) and cropped back.

    `levels` resolutions (28, 14, 7 for 3), with the feature maps of `unet_widths`. Each level
    of the encoder is a double conv (after a 2x2 max-pool below the top); the decoder
    upsamples with a 2x2 stride-2 transposed conv, concatenates the encoder's features of the
    same size (the skip that keeps strokes sharp) and applies a double conv. A 1x1 conv gives
    the noise, which is subtracted from the input.

    Why `top_channels`: the 28x28 convs cost the most (4x the pixels of 14x14), so a narrower
    top level trains faster and, given the same time, can end higher (docs/results.md).

    Why the noise and not the digit: a sigmoid head (as in the reference) let this network
    collapse to all-black outputs at lr 1e-3 (80% of MNIST pixels are 0, the sigmoid
    saturates and its gradient vanishes). The head starts at zero, so the untrained model is
    the identity, and its output is linear in the weights. The result is clipped to [0, 1]
    with the gradient passed straight through, so a pixel pushed out of range can come back.
    """

    def __init__(self, channels: int = 32, levels: int = 3, top_channels: int = 0, image_channels: int = 1) -> None:
        super().__init__()
        if not (1 <= levels <= 3):  # 28 -> 14 -> 7: one more halving would not undo exactly
            raise ValueError(f"levels must be in [1, 3], got {levels}")
        widths = unet_widths(channels, levels, top_channels)
        self.multiple = 2 ** (levels - 1)  # pixels: the sides the pooling halves evenly
        self.encoder = nn.ModuleList(_double_conv(image_channels if i == 0 else widths[i - 1], widths[i])
                                     for i in range(levels))
        self.pool = nn.MaxPool2d(2, 2)
        self.upsample = nn.ModuleList(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2)
                                      for i in range(levels - 1))
        self.decoder = nn.ModuleList(_double_conv(2 * widths[i], widths[i]) for i in range(levels - 1))
        self.head = nn.Conv2d(widths[0], image_channels, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, noisy: torch.Tensor) -> torch.Tensor:
        height, width = noisy.shape[-2:]
        pad_h, pad_w = -height % self.multiple, -width % self.multiple
        x = F.pad(noisy, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else noisy
        skips = []
        for i, block in enumerate(self.encoder):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        for i in reversed(range(len(self.decoder))):
            x = self.decoder[i](torch.cat([self.upsample[i](x), skips[i]], dim=1))
        out = noisy - self.head(x)[..., :height, :width]
        return out + (out.clamp(0.0, 1.0) - out).detach()  # clipped values, identity gradient


MODELS = {"conv_denoiser": ConvDenoiser, "unet": UNet}
"""The model of each of config.MODEL_NAMES, the one list of the choices (checked there before
torch is imported; a test holds the two equal). A model with settings takes them as keyword
arguments from the config section of the same name (`model.unet`)."""


def build_model(name: str, **settings) -> nn.Module:
    return MODELS[name](**settings)
