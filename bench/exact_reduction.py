"""What train.exact_reduction costs: the same run with the default reduction and with the
integer one, side by side, at the same world size and forward batch, alternated `--rounds`
times.

    python bench/exact_reduction.py --data ../shared/data --out bench/results/cpu-exact-reduction.json
    python bench/exact_reduction.py --data ../shared/data --device cuda --processes 1 --per-device 20

Each run trains `--steps` optimizer steps of the reference global batch (20 images) on
`--processes` processes (gloo on the CPU), `--per-device` images per forward pass, and reports
global training images/s: the median of its logging windows (the first, warm-up, left out).
The ratio exact / default is taken within each round, then its median.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: argparse.Namespace, exact: bool, out: Path) -> float:
    """Global training images/s of one run (median over its logging windows after the first)."""
    overrides = ["--config", "configs/debug.yaml", f"data.root={args.data}", "data.train_samples=60000",
                 "data.test_samples=100", f"train.max_steps={args.steps}", "train.global_batch_size=20",
                 f"train.per_device_batch_size={args.per_device}", f"train.exact_reduction={str(exact).lower()}",
                 "logging.every_n_steps=50", "logging.wandb_mode=disabled", f"output_dir={out}"]
    if not exact:  # the default reduction derives the per-device batch from the global one
        overrides.remove(f"train.per_device_batch_size={args.per_device}")
    launcher = [sys.executable] if args.processes == 1 else [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(args.processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true",
           **({"ACCELERATE_USE_CPU": "true"} if args.device == "cpu" else {})}
    r = subprocess.run(launcher + [str(REPO / "train" / "main.py")] + overrides, cwd=REPO, env=env,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"run failed ({'exact' if exact else 'default'}):\n{r.stderr[-3000:]}")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [m["train/images_per_s"] for m in lines if "train/images_per_s" in m][1:]
    return statistics.median(rates)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder holding MNIST/raw/")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--per-device", type=int, default=10, help="images per forward pass")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", help="write the results as JSON here too")
    args = parser.parse_args()

    rounds = []
    with tempfile.TemporaryDirectory() as work:
        for i in range(args.rounds):
            row = {mode: run(args, mode == "exact", Path(work) / f"{mode}{i}") for mode in ("default", "exact")}
            row["ratio"] = row["exact"] / row["default"]
            rounds.append(row)
            print(f"round {i + 1}: default {row['default']:.0f}, exact {row['exact']:.0f} images/s, "
                  f"exact/default {row['ratio']:.3f}", flush=True)
    ratio = statistics.median(r["ratio"] for r in rounds)
    print(f"median exact/default throughput: {ratio:.3f} ({(1 - ratio) * 100:.1f} % slower)")
    if args.out:
        from bench.results import machine

        report = {"machine": machine(args.device), "command": " ".join(sys.argv), "processes": args.processes,
                  "per_device_batch": args.per_device, "global_batch": 20, "steps": args.steps,
                  "time": time.strftime("%Y-%m-%d %H:%M:%S"), "rounds": rounds, "median_ratio": round(ratio, 4)}
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
