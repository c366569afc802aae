"""Train the models of docs/results.md and write that page: every number and picture in it.

    python bench/results.py train unet              # one run (resumes if interrupted)
    python bench/results.py train --all             # every run not yet finished
    python bench/results.py report                  # evaluate finished runs, write docs/results.md

Runs go to WORK/NAME (default runs/results/NAME), each from its config in configs/ with
`data.root` and the output folder set here; WORK/NAME/timing.json records the wall time of
the training command (from launch to exit: start-up, training, evaluation, checkpoints) and
the machine. The report scores each finished run on the full test set at several noise
kinds and levels, draws sample grids and a PSNR-per-epoch plot (matplotlib: pip install -e
".[results]"), and writes docs/results.md with the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


@dataclass(frozen=True)
class Run:
    config: str
    label: str


RUNS = {
    "reference_recipe": Run("configs/default.yaml", "reference model, reference recipe"),
    "reference_best": Run("configs/reference_cpu30.yaml", "reference model, our 30-minute CPU recipe"),
    "unet_small": Run("configs/unet_small_cpu.yaml", "U-Net at 16 channels, 11 epochs on the CPU"),
    "unet_wide": Run("configs/unet_wide_cpu.yaml", "U-Net at 24 channels, 8 epochs on the CPU"),
    "unet": Run("configs/unet_cpu.yaml", "U-Net, our 30-minute CPU recipe"),
    "unet_levels": Run("configs/unet_levels.yaml", "U-Net, Gaussian levels 0.1-0.9 per sample"),
    "unet_salt_pepper": Run("configs/unet_salt_pepper.yaml", "U-Net, salt-and-pepper 5-50% per sample"),
}
NOISES = [("gaussian", 0.25), ("gaussian", 0.5), ("gaussian", 0.75), ("salt_pepper", 0.1), ("salt_pepper", 0.3)]
"""The test corruptions every model is scored at (kind, level)."""
GRIDS = [("gaussian", 0.5), ("salt_pepper", 0.3)]
NOTEBOOK_PSNR_DB = 15.58  # the reference notebook's test PSNR after its 20 epochs (bench/reference.py)
TARGET_PSNR_DB = 21.0  # issue 7's bar for the stronger model
EVAL_SEED = 1234  # the fixed test noise (noise.eval_seed's default): every model sees the same noisy digits


def machine(device: str | None = None) -> str:
    """The hardware a run used, in words: the GPU's, or with device "cpu" or no GPU, the CPU's."""
    import torch

    if device != "cpu" and torch.cuda.is_available():
        return f"1x {torch.cuda.get_device_name(0)}"
    name = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    # The vector unit torch's CPU kernels use (AVX2, AVX512...): machines of one name differ.
    return f"{name}, {os.cpu_count()} vCPUs, {torch.backends.cpu.get_cpu_capability()}"


def train(name: str, work: Path, data_root: str, extra: list[str], note: str = "") -> dict:
    """Train RUNS[name] into work/name (resuming if a checkpoint is there); add its wall time."""
    run, out = RUNS[name], work / name
    cmd = [sys.executable, "train/main.py", "--config", run.config, f"output_dir={out}", f"data.root={data_root}",
           "logging.wandb_mode=disabled", *extra]
    print(f"[results] {name}: {' '.join(cmd)}", flush=True)
    t0 = time.time()
    code = subprocess.run(cmd, cwd=REPO).returncode
    wall = time.time() - t0
    timing_path = out / "timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.exists() else {"attempts": []}
    timing["attempts"].append({"wall_s": round(wall, 1), "exit_code": code, "machine": machine(),
                               "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t0)),
                               "command": " ".join(cmd[1:]), **({"note": note} if note else {})})
    timing["wall_s"] = round(sum(a["wall_s"] for a in timing["attempts"]), 1)
    out.mkdir(parents=True, exist_ok=True)
    timing_path.write_text(json.dumps(timing, indent=1) + "\n")
    print(f"[results] {name}: exit {code} after {wall:.0f} s", flush=True)
    if code != 0:
        raise SystemExit(f"error: run {name} failed (exit {code}); run the same command to resume it")
    return timing


def finished(work: Path, name: str) -> bool:
    status = work / name / "status.json"
    return status.exists() and json.loads(status.read_text()).get("outcome") == "completed"


# -- the report -------------------------------------------------------------------------------
def _evals(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [m for m in map(json.loads, lines) if "eval/psnr_db" in m]


def _noise_name(kind: str, level: float) -> str:
    return f"Gaussian σ={level:g}" if kind == "gaussian" else f"salt-and-pepper {level:.0%}"


def _recipe(cfg) -> str:
    from train.model import unet_widths

    t, n = cfg.train, cfg.noise
    trained_on = (f"{n.kind} {n.train_factor_min:g}-{n.train_factor_max:g} per sample" if n.train_factor_max > 0
                  else f"{n.kind} {n.factor:g}")
    model = cfg.model.name
    if cfg.model.name == "unet":
        model += " " + "/".join(map(str, unet_widths(**cfg.model.settings()))) + " channels"
    return (f"{model}; noise {trained_on}; batch {t.per_device_batch_size}, lr {t.lr:g} {t.lr_schedule}"
            + (f" ({t.warmup_steps} warm-up steps)" if t.warmup_steps else "")
            + f", {'fp32' if t.mixed_precision == 'no' else t.mixed_precision}")


def _plot(curves: dict[str, tuple[list[float], list[float]]], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit('error: the plot needs matplotlib: pip install -e ".[results]"') from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.2), dpi=110)
    for label, (epochs, psnr) in curves.items():
        ax.plot(epochs, psnr, marker="o", markersize=3, label=label)
    ax.axhline(NOTEBOOK_PSNR_DB, color="gray", linestyle="--", linewidth=1, label="reference notebook, 20 epochs")
    ax.axhline(TARGET_PSNR_DB, color="black", linestyle=":", linewidth=1, label=f"{TARGET_PSNR_DB:g} dB")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test PSNR (dB), at the run's own test noise")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: inside, it hid curves
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def report(work: Path, docs: Path, data_root: str, test_samples: int, denoise_repeats: int = 3) -> None:
    import torch
    from accelerate import Accelerator
    from torch import nn

    from train import metrics
    from train.data import load_mnist
    from train.denoise import load_trained
    from train.tracking import grid_png, sample_indices
    from train.noise import NoiseSpec

    names = [n for n in RUNS if finished(work, n)]
    if not names:
        raise SystemExit(f"error: no finished runs in {work}: run `python bench/results.py train --all` first")
    print(f"[results] scoring {', '.join(names)} on the test set", flush=True)
    _, test = load_mnist(data_root, False, torch.device("cpu"), 0, test_samples)
    accelerator = Accelerator(cpu=True)
    models: dict[str, nn.Module] = {"noisy input": nn.Identity()}
    configs = {}
    for name in names:
        models[name], configs[name] = load_trained(work / name)
    images = docs / "results"
    images.mkdir(parents=True, exist_ok=True)

    scores: dict[tuple[str, float, str], dict] = {}
    for kind, level in NOISES:
        spec = NoiseSpec(kind, level, level)
        for name, model in models.items():
            scores[kind, level, name] = metrics.evaluate(model, test, accelerator, spec, EVAL_SEED, 1000)
        print(f"[results] {_noise_name(kind, level)} scored", flush=True)

    grids = []
    shown = sample_indices(test, 10)
    for kind, level in GRIDS:
        clean, noisy = metrics.eval_noisy(test, shown, NoiseSpec(kind, level, level), EVAL_SEED)
        with torch.no_grad():
            rows = [noisy] + [models[n](noisy).float() for n in names] + [clean]
        path = images / f"samples-{kind}-{level:g}.png"
        path.write_bytes(grid_png(torch.cat(rows), len(shown)))
        grids.append((kind, level, path.name))

    curves = {}
    for name in names:
        evals = _evals(work / name)
        cfg = configs[name]
        curves[f"{name} ({_noise_name(cfg.noise.kind, cfg.noise.factor)})"] = (
            [m["epoch"] for m in evals], [m["eval/psnr_db"] for m in evals])
    _plot(curves, images / "psnr-per-epoch.png")

    speed = _time_denoise(work / ("unet" if "unet" in names else names[-1]), test, images, repeats=denoise_repeats)
    page = _page(names, configs, models, scores, grids, work, test_samples or len(test), speed)
    (docs / "results.md").write_text(page)
    (images / "scores.json").write_text(json.dumps(
        {f"{k}/{lv:g}/{n}": v for (k, lv, n), v in scores.items()}, indent=1) + "\n")
    print(f"[results] wrote {docs / 'results.md'} and {images}/", flush=True)


def _time_denoise(run_dir: Path, test, images: Path, count: int = 1000, repeats: int = 3) -> dict:
    """Wall time of `python -m train.denoise` on `count` noisy test digits saved as PNG files,
    on the CPU, from launch to exit (the best of `repeats`), and the PSNR of what it wrote."""
    import tempfile

    import numpy as np
    import torch
    from PIL import Image

    from train import metrics
    from train.noise import NoiseSpec

    idx = torch.arange(min(count, len(test)))
    clean, noisy = metrics.eval_noisy(test, idx, NoiseSpec("gaussian", 0.5, 0.5), EVAL_SEED)
    with tempfile.TemporaryDirectory() as tmp:
        inputs, out = Path(tmp) / "in", Path(tmp) / "out"
        inputs.mkdir()
        for i, x in enumerate((noisy[:, 0] * 255).round().to(torch.uint8).numpy()):
            Image.fromarray(x).save(inputs / f"{i:05d}.png")
        cmd = [sys.executable, "-m", "train.denoise", "--checkpoint", str(run_dir), "--device", "cpu",
               "--out", str(out), str(inputs)]
        walls = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
            walls.append(time.perf_counter() - t0)
        got = np.stack([np.asarray(Image.open(out / f"{i:05d}.png"), dtype=np.float32) / 255 for i in range(len(idx))])
    mse = float(((torch.from_numpy(got) - clean[:, 0]) ** 2).mean())
    result = {"images": len(idx), "run": run_dir.name, "wall_s": [round(w, 2) for w in walls],
              "best_wall_s": round(min(walls), 2), "psnr_db_of_pngs": round(metrics.psnr_db(mse), 2), "machine": machine()}
    (images / "denoise-speed.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"[results] denoise: {result}", flush=True)
    return result


def _page(names, configs, models, scores, grids, work: Path, n_test: int, speed: dict) -> str:
    params = {n: sum(p.numel() for p in models[n].parameters()) for n in names}
    lines = [
        "# Results",
        "",
        "Generated by `python bench/results.py report` from the runs that `python bench/results.py train --all`",
        f"trains (configs in `configs/`). Scores are on the first {n_test:,} MNIST test digits with the fixed",
        f"test noise (seed {EVAL_SEED}); PSNR is 10·log10(1/MSE) for pixels in [0, 1]; SSIM uses an 11×11",
        "Gaussian window (σ 1.5). Wall time is the training command's, from launch to exit, evaluations",
        "(as often as the run's config says: the points of the plot below) and checkpoints included.",
        "",
        "## The runs",
        "",
        "| run | what | parameters | recipe | epochs | wall time | machine | test PSNR (own noise) |",
        "|---|---|---:|---|---:|---:|---|---:|",
    ]
    for n in names:
        timing = json.loads((work / n / "timing.json").read_text()) if (work / n / "timing.json").exists() else {}
        attempts = timing.get("attempts", [])
        wall = f"{timing['wall_s'] / 60:.1f} min" if timing else "?"
        where = attempts[-1]["machine"] if attempts else "?"
        where += "".join(f" ({a['note']})" for a in attempts[-1:] if a.get("note"))
        last = _evals(work / n)[-1]
        cfg = configs[n]
        lines.append(f"| `{n}` | {RUNS[n].label} | {params[n]:,} | {_recipe(cfg)} | {last['epoch']:g} | {wall} | {where} "
                     f"| {last['eval/psnr_db']:.2f} dB ({_noise_name(cfg.noise.kind, cfg.noise.factor)}) |")
    lines += ["", "## Test PSNR (dB) by noise", "",
              "| model | " + " | ".join(_noise_name(k, lv) for k, lv in NOISES) + " |",
              "|---|" + "---:|" * len(NOISES)]
    for n in ["noisy input", *names]:
        lines.append(f"| {n if n == 'noisy input' else '`' + n + '`'} | "
                     + " | ".join(f"{scores[k, lv, n]['eval/psnr_db']:.2f}" for k, lv in NOISES) + " |")
    lines += ["", "## MSE, PSNR and SSIM", "", "| noise | model | MSE | PSNR (dB) | SSIM |", "|---|---|---:|---:|---:|"]
    for k, lv in NOISES:
        for n in ["noisy input", *names]:
            s = scores[k, lv, n]
            lines.append(f"| {_noise_name(k, lv)} | {n} | {s['eval/mse']:.5f} | {s['eval/psnr_db']:.2f} | {s['eval/ssim']:.4f} |")
    lines += ["", "## Samples", "",
              "Rows, top to bottom: noisy input, " + ", ".join(f"`{n}`" for n in names) + ", clean digit.", ""]
    for kind, level, file in grids:
        lines += [f"{_noise_name(kind, level)}:", "", f"![{kind} {level:g}](results/{file})", ""]
    lines += ["## Test PSNR per epoch", "", "![test PSNR per epoch](results/psnr-per-epoch.png)", ""]
    lines += ["## Inference speed", "",
              f"`python -m train.denoise` with the `{speed['run']}` model on {speed['images']:,} noisy test digits saved as PNG "
              f"files, on the CPU ({speed['machine']}): **{speed['best_wall_s']:.1f} s** from launch to exit, the best of "
              f"{len(speed['wall_s'])} (all: {', '.join(f'{w:.1f}' for w in speed['wall_s'])} s), start-up included. The "
              f"denoised PNGs score {speed['psnr_db_of_pngs']:.2f} dB against the clean digits (8-bit files).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=str(REPO / "runs" / "results"), help="folder of the runs")
    parser.add_argument("--data-root", default=os.environ.get("MNIST_ROOT", "data"), help="folder holding MNIST/raw/")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train one run, or --all that are not finished")
    t.add_argument("names", nargs="*", help=f"runs to train: {', '.join(RUNS)}")
    t.add_argument("--all", action="store_true")
    t.add_argument("--set", nargs="*", default=[], metavar="section.key=value", help="overrides for the runs")
    t.add_argument("--note", default="", help="kept with the wall time, e.g. what else ran on the machine")
    r = sub.add_parser("report", help="evaluate finished runs and write docs/results.md")
    r.add_argument("--docs", default=str(REPO / "docs"), help="where results.md and its images go")
    r.add_argument("--test-samples", type=int, default=0, help="score only the first N test images (0 = all)")
    r.add_argument("--denoise-repeats", type=int, default=3, help="timed runs of the denoise command")
    args = parser.parse_args(argv)
    work = Path(args.work)
    if args.command == "train":
        unknown = [n for n in args.names if n not in RUNS]
        if unknown or not (args.names or args.all):
            parser.error(f"give run names ({', '.join(RUNS)}) or --all" + (f"; unknown: {unknown}" if unknown else ""))
        names = [n for n in RUNS if not finished(work, n)] if args.all else args.names
        for name in names:
            train(name, work, args.data_root, args.set, args.note)
        return 0
    report(work, Path(args.docs), args.data_root, args.test_samples, args.denoise_repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
