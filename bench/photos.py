"""Photographs the model never trained on, denoised side by side by the trained model,
scikit-image's non-local means and BM3D (PyPI `bm3d`), at sigma 15, 25 and 50 (0-255 scale).

    pip install -e ".[bench]"
    python bench/photos.py --work /tmp/photos --out bench/results/cpu-photos.json        # trains, then compares
    python bench/photos.py --work /tmp/photos --sigmas 25 --run outputs/my-images-run   # a run of yours

The pictures are scikit-image's (shipped in its wheel), in gray. The test set is its five
classic photographs (astronaut, camera, coffee, chelsea, rocket); the training set is twelve
others (textures, microscopy, a telescope field, pages, a motorcycle): no test photograph, or
a crop of one, is trained on. For each sigma without `--run`, the recipe
`configs/images_cpu.yaml` is trained at that sigma into WORK/run-SIGMA (resumed if it is
there). Every method denoises the same noisy picture: the job's own evaluation noise (clean
+ sigma/255 x N(0, 1), clipped to [0, 1], hashed from (seed, picture)); PSNR and SSIM are the
job's (train/metrics.py), per picture, then the mean; seconds are per picture, wall time on
this machine, one thread pool as each library uses it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TEST = ("astronaut", "camera", "coffee", "chelsea", "rocket")
TRAIN = ("brick", "grass", "gravel", "coins", "moon", "page", "text", "ihc", "hubble_deep_field", "retina",
         "motorcycle_left", "cell")
SEED = 1234  # the job's noise.eval_seed


def prepare(work: Path) -> tuple[Path, Path]:
    """WORK/train and WORK/test: scikit-image's pictures as 8-bit gray PNGs."""
    from PIL import Image
    from skimage import data

    shipped = {p.stem: p for p in Path(data.data_dir).iterdir()}  # the files in scikit-image's wheel
    folders = {"train": work / "train", "test": work / "test"}
    for split, names in (("train", TRAIN), ("test", TEST)):
        folders[split].mkdir(parents=True, exist_ok=True)
        for name in names:
            path = folders[split] / f"{name}.png"
            if not path.exists():
                Image.open(shipped[name]).convert("L").save(path)
    return folders["train"], folders["test"]


def train(work: Path, sigma: float, train_dir: Path, test_dir: Path, extra: list[str]) -> tuple[Path, float]:
    """The recipe at `sigma` in WORK/run-SIGMA; returns the run and its wall time (s, this call's)."""
    out = work / f"run-{sigma:g}"
    cmd = [sys.executable, "train/main.py", "--config", "configs/images_cpu.yaml", f"data.train_dir={train_dir}",
           f"data.test_dir={test_dir}", f"noise.sigma={sigma:g}", f"output_dir={out}", "logging.wandb_mode=disabled",
           *extra]
    print("[photos]", " ".join(cmd), flush=True)
    t0 = time.time()
    if subprocess.run(cmd, cwd=REPO).returncode != 0:
        raise SystemExit(f"error: training at sigma {sigma:g} failed (its log is above)")
    return out, time.time() - t0


def compare(run: Path, sigma: float, test_dir: Path, methods: list[str], limit: int = 0) -> list[dict]:
    """One row per method and picture: PSNR, SSIM, seconds."""
    import bm3d
    import numpy as np
    import torch
    from skimage.restoration import denoise_nl_means

    from train import noise
    from train.denoise import denoise_picture, load_trained
    from train.images import load_pictures
    from train.metrics import psnr_db, ssim_per_image

    model, cfg = load_trained(run, "cpu")
    pictures = load_pictures(str(test_dir), "test", 1, torch.device("cpu"), 1024)
    spec = noise.NoiseSpec("gaussian", sigma / 255, sigma / 255)
    level = sigma / 255
    rows = []
    for i, path in enumerate(pictures.paths[:limit or None]):
        clean = pictures.picture(i)
        noisy = noise.add_noise(clean, torch.tensor([i]), spec, SEED, noise.EVAL_EPOCH, wide=True)
        image = noisy[0, 0].numpy().astype(np.float64)
        runs = {
            "model": lambda: denoise_picture(model, noisy, cfg.data.channels, torch.device("cpu"), 256),
            # scikit-image's recipe for a known sigma (its denoise_nl_means example): h = 0.8 sigma
            "nl_means": lambda: torch.from_numpy(denoise_nl_means(image, h=0.8 * level, sigma=level, fast_mode=True,
                                                                  patch_size=5, patch_distance=6)).float()[None, None],
            "bm3d": lambda: torch.from_numpy(np.asarray(bm3d.bm3d(image, sigma_psd=level))).float()[None, None],
            "noisy": lambda: noisy,
        }
        for method in methods + ["noisy"]:
            t0 = time.perf_counter()
            with torch.no_grad():
                out = runs[method]().clamp(0, 1)
            seconds = time.perf_counter() - t0
            mse = (out - clean).pow(2).mean().item()
            rows.append({"sigma": sigma, "method": method, "picture": path.stem, "psnr_db": psnr_db(mse),
                         "ssim": ssim_per_image(out, clean).item(), "seconds": seconds})
            print(f"[photos] sigma {sigma:g} {path.stem:10s} {method:9s} {rows[-1]['psnr_db']:.2f} dB "
                  f"SSIM {rows[-1]['ssim']:.4f} {seconds:.2f} s", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: one row per sigma and method, the means over pictures."""
    lines = ["| sigma | method | PSNR (dB) | SSIM | seconds per picture |", "|---|---|---|---|---|"]
    keys = sorted({(r["sigma"], r["method"]) for r in rows},
                  key=lambda k: (k[0], ("noisy", "nl_means", "bm3d", "model").index(k[1])))
    for sigma, method in keys:
        mine = [r for r in rows if (r["sigma"], r["method"]) == (sigma, method)]
        mean = {k: sum(r[k] for r in mine) / len(mine) for k in ("psnr_db", "ssim", "seconds")}
        lines.append(f"| {sigma:g} | {method} | {mean['psnr_db']:.2f} | {mean['ssim']:.4f} | {mean['seconds']:.2f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="folder for the pictures and the runs")
    parser.add_argument("--sigmas", default="15,25,50", help="noise levels, 0-255 scale (default 15,25,50)")
    parser.add_argument("--run", type=Path, help="a trained run to compare instead of training the recipe")
    parser.add_argument("--methods", default="model,nl_means,bm3d", help="which denoisers (default: all three)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--limit", type=int, default=0, help="only the first N test photographs (a quick check)")
    parser.add_argument("overrides", nargs="*", help="more overrides for the recipe's training runs")
    args = parser.parse_args()
    from results import machine  # bench/results.py: the CPU's name and vector unit

    train_dir, test_dir = prepare(args.work)
    report = {"machine": machine("cpu"), "date": time.strftime("%Y-%m-%d %H:%M"), "test": list(TEST),
              "train": list(TRAIN), "runs": {}, "rows": []}
    for sigma in (float(s) for s in args.sigmas.split(",")):
        run, seconds = (args.run, 0.0) if args.run else train(args.work, sigma, train_dir, test_dir, args.overrides)
        status = json.loads((run / "status.json").read_text())
        report["runs"][f"{sigma:g}"] = {"run": str(run), "train_wall_s_this_call": round(seconds, 1),
                                        "step": status.get("step"), "config": (run / "config.yaml").read_text()}
        report["rows"] += compare(run, sigma, test_dir, args.methods.split(","), args.limit)
    report["table"] = table(report["rows"])
    print(f"\n{report['machine']}, {os.cpu_count()} CPUs\n\n{report['table']}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
