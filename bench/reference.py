"""The reference notebook's training recipe, as it was written, for side-by-side measurement.

PIL images through `transforms.ToTensor()` and a `DataLoader(batch_size=20)` without
workers or shuffling, noise drawn per batch on the CPU with `torch.randn` and clipped with
`np.clip`, moved to the device per batch; the same model (our `ConvDenoiser`, identical
layers), MSE, Adam lr 1e-3, fp32, one process. Used by bench/throughput.py; run alone:

    python bench/reference.py --data ../shared/data --max-steps 600       # images/s
    python bench/reference.py --data ../shared/data --target-psnr 15.58   # time to quality
    python bench/reference.py --data ../shared/data --max-steps 600 --reuse-host-memory

Prints one JSON line per evaluation and one summary line.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from train import metrics  # noqa: E402
from train.noise import NoiseSpec  # noqa: E402
from train.data import load_mnist  # noqa: E402
from train.model import ConvDenoiser  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="folder holding MNIST/raw/")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many batches; 0 = 20 epochs")
    p.add_argument("--warmup-steps", type=int, default=20, help="batches left out of the images/s figure")
    p.add_argument("--target-psnr", type=float, default=0.0, help="evaluate each epoch; stop at this test PSNR (dB)")
    p.add_argument("--reuse-host-memory", action="store_true",
                   help="not the notebook's: keep freed host memory as the job's perf.reuse_host_memory does "
                        "(to show what that setting alone is worth)")
    args = p.parse_args()
    if args.reuse_host_memory:
        from train.speed.host_memory import keep_freed_host_memory

        keep_freed_host_memory()
    from torchvision import datasets, transforms  # as the notebook did

    t_start = time.perf_counter()
    device = torch.device(args.device)
    train_data = datasets.MNIST(root=args.data, train=True, download=False, transform=transforms.ToTensor())
    loader = torch.utils.data.DataLoader(train_data, batch_size=20, num_workers=0)
    torch.manual_seed(0)
    model = ConvDenoiser().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001)
    # Evaluation with our fixed test noise, so the PSNR compares with our runs.
    _, test_split = load_mnist(args.data, False, device) if args.target_psnr else (None, None)

    step, timed_images, t0 = 0, 0, None
    for epoch in range(1, 21):
        for images, _ in loader:
            noisy = images + 0.5 * torch.randn(*images.shape)
            noisy = torch.from_numpy(np.clip(noisy.numpy(), 0.0, 1.0))
            images, noisy = images.to(device), noisy.to(device)
            optimizer.zero_grad()
            loss = F.mse_loss(model(noisy), images)
            loss.backward()
            optimizer.step()
            step += 1
            if step == args.warmup_steps:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            elif step > args.warmup_steps:
                timed_images += len(images)
            if args.max_steps and step >= args.max_steps:
                break
        if args.max_steps and step >= args.max_steps:
            break
        if args.target_psnr:
            result = _evaluate(model, test_split, device)
            print(json.dumps({"epoch": epoch, "wall_s": time.perf_counter() - t_start, **result}), flush=True)
            if result["eval/psnr_db"] >= args.target_psnr:
                break
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0 if t0 else float("nan")
    summary = {"summary": True, "steps": step, "images_per_s": timed_images / elapsed,
               "wall_s": time.perf_counter() - t_start,
               "max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # KiB on Linux
    if device.type == "cuda":
        summary["gpu_max_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    print(json.dumps(summary), flush=True)


def _evaluate(model: torch.nn.Module, split, device: torch.device) -> dict[str, float]:
    """The job's own evaluation (same fixed test noise, all 10,000 images), one process."""
    from accelerate import Accelerator

    result = metrics.evaluate(model, split, Accelerator(cpu=device.type == "cpu"), NoiseSpec("gaussian", 0.5, 0.5), 1234, 1000)
    return {k: result[k] for k in ("eval/mse", "eval/psnr_db", "eval/ssim")}

if __name__ == "__main__":
    main()
