"""GPU checks for the distributed-correctness issue: fp32 on the GPU against the same run on
the CPU, and short bf16 / fp16 runs that must train. Prints a table and writes it as JSON and
Markdown into the output folder. Without CUDA, the GPU rows are reported as skipped.

    python bench/gpu_check.py --data-root /path/to/data --out results/
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

# Small enough for ~1 minute on a CPU, big enough for the loss to fall clearly.
RUN = ["data.train_samples=6000", "train.epochs=1", "train.per_device_batch_size=20", "logging.every_n_steps=25",
       "logging.wandb_mode=disabled", "checkpoint.resume=none"]
# GPU vs CPU fp32: kernels differ (cuDNN vs oneDNN), so results are close, not equal.
PSNR_TOLERANCE_DB = 0.15


def run(name: str, out: Path, data_root: str, overrides: list[str], cpu: bool) -> dict:
    folder = out / name
    env = {**os.environ, "WANDB_SILENT": "true"}
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "train" / "main.py"), f"data.root={data_root}",
                           f"output_dir={folder}"] + RUN + overrides, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    row = {"run": name, "exit": proc.returncode, "wall_s": round(wall, 1)}
    if proc.returncode != 0:
        row["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return row
    setup = json.loads((folder / "setup.json").read_text())
    lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in lines if "train/loss" in m]
    last_eval = [m for m in lines if "eval/psnr_db" in m][-1]
    row.update(device=setup["device"], mixed_precision=setup["mixed_precision"],
               first_loss=round(train[0]["train/loss"], 5), last_loss=round(train[-1]["train/loss"], 5),
               psnr_db=round(last_eval["eval/psnr_db"], 3), ssim=round(last_eval["eval/ssim"], 4),
               images_per_s=round(max(m.get("train/images_per_s", 0) for m in train)),
               loss_scale=train[-1].get("train/loss_scale"))
    row["trains"] = row["last_loss"] < 0.8 * row["first_loss"]
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--out", default="bench/out/gpu_check")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import torch

    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    rows = [run("cpu_fp32", out, args.data_root, [], cpu=True)]
    for name, precision in (("gpu_fp32", "no"), ("gpu_bf16", "bf16"), ("gpu_fp16", "fp16")):
        if card is None:
            rows.append({"run": name, "exit": None, "error": "skipped: no CUDA device"})
        else:
            rows.append(run(name, out, args.data_root, [f"train.mixed_precision={precision}"], cpu=False))

    checks = {}
    by = {r["run"]: r for r in rows}
    if card is not None and "psnr_db" in by["gpu_fp32"] and "psnr_db" in by["cpu_fp32"]:
        delta = abs(by["gpu_fp32"]["psnr_db"] - by["cpu_fp32"]["psnr_db"])
        checks["gpu_fp32_vs_cpu_fp32_psnr_delta_db"] = round(delta, 4)
        checks["gpu_fp32_close_to_cpu"] = delta < PSNR_TOLERANCE_DB
    for r in rows:
        if r.get("exit") is not None:
            checks[f"{r['run']}_trains"] = bool(r.get("trains"))

    columns = ["run", "device", "mixed_precision", "exit", "first_loss", "last_loss", "psnr_db", "ssim",
               "images_per_s", "loss_scale", "wall_s", "error"]
    table = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    table += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    report = "\n".join([f"card: {card or 'none (CPU only)'}", "", *table, "", "checks: " + json.dumps(checks)])
    print(report)
    (out / "gpu_check.md").write_text(report + "\n")
    (out / "gpu_check.json").write_text(json.dumps({"card": card, "rows": rows, "checks": checks}, indent=1))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
