"""Evaluation metrics against direct computations."""

import math

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from conftest import make_tiny_mnist
from train import noise
from train.data import load_mnist
from train.metrics import evaluate, psnr_db, ssim_per_image


def test_psnr_of_known_errors():
    assert psnr_db(0.01) == pytest.approx(20.0)
    assert psnr_db(0.0277) == pytest.approx(15.575, abs=1e-3)  # the reference recipe's test MSE


def test_ssim_is_one_for_identical_images_and_drops_with_noise():
    x = torch.rand(4, 1, 28, 28)
    assert torch.allclose(ssim_per_image(x, x), torch.ones(4), atol=1e-5)
    noisy = (x + 0.3 * torch.randn_like(x)).clamp(0, 1)
    s = ssim_per_image(noisy, x)
    assert (s < 0.9).all() and (s > -1).all()
    # Invariant to which image is "reference": SSIM is symmetric.
    assert torch.allclose(ssim_per_image(x, noisy), s, atol=1e-6)


def test_ssim_of_constant_shift_matches_the_formula():
    # Two flat images a, b: SSIM = (2ab + C1) / (a^2 + b^2 + C1) (no variance term).
    a, b = 0.4, 0.6
    s = ssim_per_image(torch.full((1, 1, 28, 28), a), torch.full((1, 1, 28, 28), b))
    c1 = 0.01**2
    assert s.item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-4)


class _Halve(nn.Module):
    def forward(self, x):
        return x * 0.5


def test_evaluate_scores_every_test_image_against_direct_computation(tmp_path):
    _, test = load_mnist(str(make_tiny_mnist(tmp_path, n_test=37)), False, torch.device("cpu"))
    result = evaluate(_Halve(), test, Accelerator(cpu=True), spec=0.5, seed=9, per_device_batch_size=8)
    idx = torch.arange(37)
    clean = test.images.float() / 255
    noisy = noise.add_noise(clean, idx, 0.5, 9, noise.EVAL_EPOCH)
    mse = ((noisy * 0.5 - clean) ** 2).mean().item()
    assert result["eval/images"] == 37
    assert result["eval/mse"] == pytest.approx(mse, rel=1e-6)
    assert result["eval/psnr_db"] == pytest.approx(10 * math.log10(1 / mse), rel=1e-6)
    assert result["eval/noisy_psnr_db"] == pytest.approx(10 * math.log10(1 / ((noisy - clean) ** 2).mean().item()),
                                                         rel=1e-6)
    assert result["eval/ssim"] == pytest.approx(ssim_per_image(noisy * 0.5, clean).mean().item(), rel=1e-5)


class _Constant(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


def test_output_std_tells_a_collapsed_model_from_a_working_one(tmp_path):
    _, test = load_mnist(str(make_tiny_mnist(tmp_path, n_test=40)), False, torch.device("cpu"))
    acc = Accelerator(cpu=True)
    collapsed = evaluate(_Constant(), test, acc, spec=0.5, seed=9, per_device_batch_size=16)
    assert collapsed["eval/output_std"] == 0.0
    working = evaluate(_Halve(), test, acc, spec=0.5, seed=9, per_device_batch_size=16)
    clean = test.images.float() / 255
    noisy = noise.add_noise(clean, torch.arange(40), 0.5, 9, noise.EVAL_EPOCH)
    expected = (noisy * 0.5).std(0, unbiased=False).mean().item()  # per-pixel std across images
    assert working["eval/output_std"] == pytest.approx(expected, rel=1e-4)  # fixed point: 1/2**16 of a pixel
