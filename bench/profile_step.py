"""Where a training step's time goes: the job's own run under torch.profiler, kernel by kernel.

    python bench/profile_step.py --data ../shared/data --steps 200 train.per_device_batch_size=20
    python bench/profile_step.py --data data --steps 30 --out $OUT/profile.json \\
        train.per_device_batch_size=16384 train.mixed_precision=bf16 perf.compile=true

Runs train/main.py's `main` in this process for --steps optimizer steps (plus the job's
warm-up and its closing evaluation, kept small with data.test_samples=100) and prints the
kernels (GPU) or operators (CPU) that took the most device time, per step: the kernel list
that a CUDA graph replays, and which of them a faster setting must shrink.

Without --skip, totals include the one-off work (compiling, cuDNN's autotuning trials, the
evaluation), so they are an upper bound per step. --skip N records only the --steps steps
after the first N (the steady state); it counts steps by the optimizer's step hook, which a
CUDA graph's replays do not call, so it cannot be used with perf.cuda_graphs. With --skip, a
second table (`by_op`) names the operator that launched each kernel and its input shapes:
which layer a kernel belongs to.
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
    parser.add_argument("--skip", type=int, default=0, help="steps to leave out first (warm-up, autotuning)")
    parser.add_argument("--top", type=int, default=25, help="rows to show")
    parser.add_argument("--out", default=None, help="write the table as JSON here too")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides of the run")
    args = parser.parse_args()

    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from torch.profiler import ProfilerActivity, profile, schedule

    from train.main import main as train_main

    cuda = torch.cuda.is_available()
    out_dir = tempfile.mkdtemp(prefix="denoise-profile-")
    argv = [f"data.root={args.data}", f"output_dir={out_dir}", "logging.wandb_mode=disabled",
            "data.test_samples=100", "eval.every_n_epochs=1000",
            f"train.max_steps={args.skip + args.steps + 2 if args.skip else args.steps}", *args.overrides]
    if args.skip and any(o.replace(" ", "") == "perf.cuda_graphs=true" for o in args.overrides):
        print("error: --skip counts optimizer steps, which a CUDA graph's replays do not report; "
              "leave --skip out for perf.cuda_graphs=true", file=sys.stderr)
        return 2
    if not cuda:
        activities = [ProfilerActivity.CPU]
    else:  # operators are recorded (with shapes) only where the kernels are to be attributed to them
        activities = [ProfilerActivity.CUDA, ProfilerActivity.CPU] if args.skip else [ProfilerActivity.CUDA]
    # The step after the skipped ones is the profiler's warm-up; --steps are recorded after it.
    window = schedule(wait=args.skip, warmup=1, active=args.steps, repeat=1) if args.skip else None
    with profile(activities=activities, schedule=window, record_shapes=bool(args.skip)) as prof:
        hook = register_optimizer_step_post_hook(lambda *_: prof.step()) if args.skip else None
        try:
            code = train_main(argv)
        finally:
            if hook is not None:
                hook.remove()
    if code != 0:
        print(f"error: the profiled run exited {code}", file=sys.stderr)
        return code
    from torch.autograd import DeviceType

    # On a GPU the kernels themselves (not the host-side operators that launched them, whose
    # totals would count the same kernels again); on a CPU each operator's own time.
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    kind = DeviceType.CUDA if cuda else DeviceType.CPU
    # On a GPU, ranges (a compiled graph's call) are left out: their device time is that of the
    # kernels inside, counted already. On a CPU a range's own time is real work (a compiled
    # graph's generated kernels, the Python between operators in ProfilerStep), so it stays.
    events = [e for e in prof.key_averages() if e.device_type == kind and getattr(e, attr) > 0
              and not (cuda and e.is_user_annotation)]
    total_us = sum(getattr(e, attr) for e in events)
    rows = [{"name": e.key[:90], "calls_per_step": round(e.count / args.steps, 2),
             "us_per_step": round(getattr(e, attr) / args.steps, 2),
             "share": round(getattr(e, attr) / total_us, 4)}
            for e in sorted(events, key=lambda e: -getattr(e, attr))]
    report = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "overrides": args.overrides,
              "steps": args.steps, "us_per_step": round(total_us / args.steps, 1),
              "kinds_of_kernel": len(rows), "calls_per_step": round(sum(r["calls_per_step"] for r in rows), 1),
              "top": rows[: args.top]}
    if args.skip and cuda:
        report["by_op"] = kernels_by_op(prof.events(), args.steps)[: args.top]
    print(f"{report['device']}: {' '.join(args.overrides) or 'defaults'}: {report['us_per_step']} us of "
          f"{'kernels' if cuda else 'operators'} per step, {report['calls_per_step']} calls per step")
    print("| name | calls/step | us/step | share |\n|---|---|---|---|")
    for r in report["top"]:
        print(f"| {r['name']} | {r['calls_per_step']} | {r['us_per_step']} | {r['share']:.1%} |")
    for r in report.get("by_op", []):
        print(f"| {r['kernel']} | {r['op']} | {r['shapes']} | {r['calls_per_step']} | {r['us_per_step']} |")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


def kernels_by_op(events, steps: int) -> list[dict]:
    """Device time per (kernel, the operator that launched it, that operator's inputs), most first.
    The operator is named with its two nearest ancestors (e.g. the autograd node of a backward
    convolution), so that one layer's forward and backward kernels can be told apart."""
    totals: dict[tuple, list] = {}
    for e in events:
        if not e.kernels:
            continue
        chain, parent = [], e
        while parent is not None and len(chain) < 3:
            chain.append(parent.name)
            parent = parent.cpu_parent
        key_of_op = (" < ".join(chain), str(e.input_shapes))
        for k in e.kernels:
            total = totals.setdefault((k.name[:70], *key_of_op), [0, 0.0])
            total[0] += 1
            total[1] += k.duration
    return [{"kernel": kernel, "op": op, "shapes": shapes[:160],
             "calls_per_step": round(calls / steps, 2), "us_per_step": round(us / steps, 1)}
            for (kernel, op, shapes), (calls, us) in sorted(totals.items(), key=lambda kv: -kv[1][1])]


if __name__ == "__main__":
    sys.exit(main())
