"""Evaluation: test MSE, PSNR and SSIM of the denoised images, and the noisy-input baseline.

Each rank scores its own shard of the test set per image; the per-image scores are gathered
and put back in test-set order, so every rank averages the same 10,000 numbers in the same
order: the metrics do not depend on the number of processes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from train import noise
from train.data import Split, eval_shard

_SSIM_WINDOW = 11  # pixels; Gaussian window of Wang et al. (2004)
_SSIM_SIGMA = 1.5  # pixels
_SSIM_C1 = 0.01**2  # (K1 * data range)^2, data range 1
_SSIM_C2 = 0.03**2  # (K2 * data range)^2
_FIXED_ONE = 2**16  # fixed-point scale of the output moments (see evaluate)


def _gaussian_window(device: torch.device) -> torch.Tensor:
    x = torch.arange(_SSIM_WINDOW, dtype=torch.float32, device=device) - (_SSIM_WINDOW - 1) / 2
    g = torch.exp(-(x**2) / (2 * _SSIM_SIGMA**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).view(1, 1, _SSIM_WINDOW, _SSIM_WINDOW)


def ssim_per_image(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean SSIM of each image pair (N, 1, H, W) in [0, 1]: Gaussian 11x11 window, sigma 1.5,
    over the valid region (18x18 positions for 28x28 images)."""
    w = _gaussian_window(x.device)
    mu_x, mu_y = F.conv2d(x, w), F.conv2d(y, w)
    var_x = F.conv2d(x * x, w) - mu_x**2
    var_y = F.conv2d(y * y, w) - mu_y**2
    cov = F.conv2d(x * y, w) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + _SSIM_C1) * (2 * cov + _SSIM_C2)) / (
        (mu_x**2 + mu_y**2 + _SSIM_C1) * (var_x + var_y + _SSIM_C2)
    )
    return s.flatten(1).mean(1)


def psnr_db(mse: float) -> float:
    """PSNR of a mean squared error for pixels in [0, 1]: 10 log10(1 / mse)."""
    return 10.0 * math.log10(1.0 / mse) if mse > 0 else float("inf")


def eval_noisy(split: Split, indices: torch.Tensor, spec: noise.NoiseSpec, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(clean, noisy) test images for `indices`, with the fixed evaluation noise."""
    clean = split.batch(indices)
    return clean, noise.add_noise(clean, indices, spec, seed, noise.EVAL_EPOCH)


def _gathered(local: torch.Tensor, total: int, accelerator: Accelerator) -> torch.Tensor:
    """Every rank's rows (index first, then scores) on every rank, in index order. Shards differ
    in length by at most one: each is padded to equal length for the gather, with an index of
    -1 that marks the rows to drop."""
    longest = math.ceil(total / accelerator.num_processes)
    pad = torch.full((longest - len(local), local.shape[1]), -1.0, dtype=torch.float64, device=local.device)
    every = accelerator.gather(torch.cat([local, pad]))
    every = every[every[:, 0] >= 0]
    every = every[every[:, 0].argsort()]
    assert len(every) == total, "evaluation must score each test image exactly once"
    return every


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, accelerator: Accelerator, spec: noise.NoiseSpec, seed: int,
             per_device_batch_size: int) -> dict[str, float]:
    """Score the whole test split, sharded over ranks; every rank returns the same dict.

    Runs on every rank (it holds collectives). The model runs in the autocast that
    accelerate set up for it; scores are computed in fp32. `eval/output_std` is the std of
    each output pixel across the test images, averaged over pixels: near 0 when the model
    gives the same image whatever its input (a collapsed run).
    """
    was_training = model.training
    model.eval()
    device = accelerator.device
    shard = eval_shard(len(split), accelerator.num_processes, accelerator.process_index).to(device)
    scores = []  # per image: [index, denoised mse, noisy mse, ssim]
    # Per-pixel sum and sum of squares of the outputs, in fixed point (1/2**16 of a pixel):
    # integer sums do not depend on their order, so output_std is exactly the same for any
    # number of processes, like the other metrics. 60,000 x (2**16)**2 fits int64 easily.
    moments = torch.zeros(2, *split.images.shape[1:], dtype=torch.int64, device=device)
    for chunk in shard.split(per_device_batch_size):
        clean, noisy = eval_noisy(split, chunk, spec, seed)
        out = model(noisy).float()
        fixed = (out.clamp(0, 1) * _FIXED_ONE).round().to(torch.int64)
        moments += torch.stack([fixed.sum(0), fixed.pow(2).sum(0)])
        scores.append(torch.stack([
            chunk.to(torch.float64),
            (out - clean).pow(2).flatten(1).mean(1).double(),
            (noisy - clean).pow(2).flatten(1).mean(1).double(),
            ssim_per_image(out, clean).double(),
        ], dim=1))
    every = _gathered(torch.cat(scores) if scores else torch.zeros(0, 4, dtype=torch.float64, device=device),
                      len(split), accelerator)
    mse, noisy_mse, ssim = (every[:, i].mean().item() for i in (1, 2, 3))
    mean, mean_sq = accelerator.reduce(moments, reduction="sum").double() / len(split)
    output_std = ((mean_sq - mean**2).clamp_(min=0).sqrt() / _FIXED_ONE).mean().item()
    model.train(was_training)
    return {
        "eval/mse": mse,
        "eval/psnr_db": psnr_db(mse),
        "eval/ssim": ssim,
        "eval/noisy_psnr_db": psnr_db(noisy_mse),
        "eval/output_std": output_std,
        "eval/images": len(every),
    }


@torch.no_grad()
def evaluate_pictures(model: nn.Module, pictures, accelerator: Accelerator, spec: noise.NoiseSpec,
                      seed: int) -> dict[str, float]:
    """Score each test picture (train/images.py's Pictures) whole, sharded over ranks: MSE, PSNR
    and SSIM per picture (SSIM per channel, averaged), then the mean over pictures, in picture
    order on every rank. Big pictures are denoised in tiles (images.denoise_tiled)."""
    from train.images import denoise_tiled

    was_training = model.training
    model.eval()
    device = accelerator.device
    rows = []  # per picture: [index, mse, noisy mse, psnr, noisy psnr, ssim]
    for i in eval_shard(len(pictures), accelerator.num_processes, accelerator.process_index).tolist():
        clean = pictures.picture(i)
        noisy = noise.add_noise(clean, torch.tensor([i], device=device), spec, seed, noise.EVAL_EPOCH, wide=True)
        out = denoise_tiled(model, noisy).float()
        mse, noisy_mse = (out - clean).pow(2).mean().item(), (noisy - clean).pow(2).mean().item()
        ssim = ssim_per_image(out.transpose(0, 1), clean.transpose(0, 1)).mean().item()
        rows.append([i, mse, noisy_mse, psnr_db(mse), psnr_db(noisy_mse), ssim])
    every = _gathered(torch.tensor(rows, dtype=torch.float64, device=device).view(-1, 6), len(pictures), accelerator)
    model.train(was_training)
    mse, noisy_mse, psnr, noisy_psnr, ssim = (every[:, k].mean().item() for k in range(1, 6))
    return {"eval/mse": mse, "eval/psnr_db": psnr, "eval/ssim": ssim, "eval/noisy_psnr_db": noisy_psnr,
            "eval/images": len(every)}
