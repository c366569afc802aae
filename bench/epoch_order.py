"""An epoch's sample order: iterating DistributedSampler against EpochOrder's tensor ops.

    python bench/epoch_order.py --out bench/results/cpu-epoch-order.json

The job computes each epoch's order on the host at the start of the epoch, after the
previous epoch's checkpoint has synced the device, so the device waits for it. At batch
16,384 an MNIST epoch is 3 optimizer steps (about 55 ms of kernels on an H100), so a few
milliseconds there are a few percent of training. This times, in one process and
alternated `--rounds` times, the way the job used to do it (iterate the sampler into a
Python list, then a tensor) and EpochOrder.epoch_indices (the same indices, checked here and
in tests/unit/test_data.py), for MNIST's 60,000 images at a few batch sizes and world sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CASES = [(16_384, 1), (20, 1), (2_048, 8)]  # (per-device batch, processes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=60_000)
    parser.add_argument("--rounds", type=int, default=15, help="alternations of the two per case")
    parser.add_argument("--out", default=None, help="write the results as JSON here too")
    args = parser.parse_args()

    import torch
    from torch.utils.data import DistributedSampler

    from train.data import EpochOrder

    cpu = torch.device("cpu")
    rows = []
    for batch, world in CASES:
        order = EpochOrder(args.samples, batch, world, 0, seed=0)
        sampler = DistributedSampler(range(args.samples), num_replicas=world, rank=0, shuffle=True, seed=0)
        used = order.steps_per_epoch * batch

        def by_sampler(epoch: int) -> torch.Tensor:  # the job's code before EpochOrder computed it
            sampler.set_epoch(epoch)
            return torch.tensor(list(sampler), dtype=torch.int64)[:used].view(order.steps_per_epoch, batch)

        timings = {"sampler": [], "epoch_order": []}
        for epoch in range(args.rounds):
            for name, fn in (("sampler", by_sampler), ("epoch_order", lambda e: order.epoch_indices(e, cpu))):
                t0 = time.perf_counter()
                indices = fn(epoch)
                timings[name].append((time.perf_counter() - t0) * 1e3)
                if name == "epoch_order" and not torch.equal(indices, by_sampler(epoch)):
                    raise SystemExit(f"EpochOrder differs from the sampler at batch {batch}, world {world}")
        ms = {name: statistics.median(t) for name, t in timings.items()}
        ratios = [s / e for s, e in zip(timings["sampler"], timings["epoch_order"], strict=True)]
        rows.append({"per_device_batch": batch, "processes": world, "steps_per_epoch": order.steps_per_epoch,
                     "sampler_ms": round(ms["sampler"], 2), "epoch_order_ms": round(ms["epoch_order"], 2),
                     "speedup_median": round(statistics.median(ratios), 1)})

    print(f"{'batch':>7} {'world':>5} {'steps':>5} {'sampler ms':>11} {'EpochOrder ms':>14} {'x':>6}")
    for r in rows:
        print(f"{r['per_device_batch']:>7} {r['processes']:>5} {r['steps_per_epoch']:>5} {r['sampler_ms']:>11} "
              f"{r['epoch_order_ms']:>14} {r['speedup_median']:>6}")
    if args.out:
        from bench.results import machine

        report = {"machine": machine("cpu"), "cpu_count": os.cpu_count(), "command": " ".join(sys.argv),
                  "torch": torch.__version__, "threads": torch.get_num_threads(),
                  "time": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows}
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
