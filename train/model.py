"""The denoising models. Only `nn.Module`s live here: no optimizer, accelerate or logging."""

from __future__ import annotations

import torch
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


MODELS = {"conv_denoiser": ConvDenoiser}


def build_model(name: str) -> nn.Module:
    return MODELS[name]()
