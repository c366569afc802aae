"""Where a training step's time goes: the job's own run under torch.profiler, kernel by kernel.

    python bench/profile_step.py --data ../shared/data --steps 200 train.per_device_batch_size=20
    python bench/profile_step.py --data data --steps 30 --out $OUT/profile.json \\
        train.per_device_batch_size=16384 train.mixed_precision=bf16 perf.compile=true

Runs train/main.py's `main` in this process for --steps optimizer steps (plus the job's
warm-up and its closing evaluation, kept small with data.test_samples=100) and prints the
kernels (GPU) or operators (CPU) that took the most device time, per step: the kernel list
that a CUDA graph replays, and which of them a faster setting must shrink. Totals include the
one-off work (warm-up, the evaluation), so they are an upper bound per step.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder holding MNIST/raw/")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps to profile")
    parser.add_argument("--top", type=int, default=25, help="rows to show")
    parser.add_argument("--out", default=None, help="write the table as JSON here too")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides of the run")
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from train.main import main as train_main

    cuda = torch.cuda.is_available()
    out_dir = tempfile.mkdtemp(prefix="denoise-profile-")
    argv = [f"data.root={args.data}", f"output_dir={out_dir}", "logging.wandb_mode=disabled",
            "data.test_samples=100", "eval.every_n_epochs=1000", f"train.max_steps={args.steps}", *args.overrides]
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        code = train_main(argv)
    if code != 0:
        print(f"error: the profiled run exited {code}", file=sys.stderr)
        return code
    from torch.autograd import DeviceType

    # On a GPU the kernels themselves (not the host-side operators that launched them, whose
    # totals would count the same kernels again); on a CPU each operator's own time.
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    kind = DeviceType.CUDA if cuda else DeviceType.CPU
    events = [e for e in prof.key_averages() if e.device_type == kind and getattr(e, attr) > 0]
    total_us = sum(getattr(e, attr) for e in events)
    rows = [{"name": e.key[:90], "calls_per_step": round(e.count / args.steps, 2),
             "us_per_step": round(getattr(e, attr) / args.steps, 2),
             "share": round(getattr(e, attr) / total_us, 4)}
            for e in sorted(events, key=lambda e: -getattr(e, attr))]
    report = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "overrides": args.overrides,
              "steps": args.steps, "us_per_step": round(total_us / args.steps, 1),
              "kinds_of_kernel": len(rows), "calls_per_step": round(sum(r["calls_per_step"] for r in rows), 1),
              "top": rows[: args.top]}
    print(f"{report['device']}: {' '.join(args.overrides) or 'defaults'}: {report['us_per_step']} us of "
          f"{'kernels' if cuda else 'operators'} per step, {report['calls_per_step']} calls per step")
    print("| name | calls/step | us/step | share |\n|---|---|---|---|")
    for r in report["top"]:
        print(f"| {r['name']} | {r['calls_per_step']} | {r['us_per_step']} | {r['share']:.1%} |")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
