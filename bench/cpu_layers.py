"""The CPU forms of perf.cpu_layers (train/speed/cpu_layers.py) against nn's layers, in one process.

    python bench/cpu_layers.py                         # batches 20, 64 and 128, 8 rounds each
    python bench/cpu_layers.py --batches 64 --rounds 12 --out bench/results/cpu-layers.json
    python bench/cpu_layers.py --batches 64 --layers   # also each replaced layer alone

A training step of the reference model (forward, MSE, backward, fused Adam; fp32,
channels_last, perf.reuse_host_memory's allocator setting) with nn's layers and with the CPU
forms, alternated in short blocks of about 2,000 images, `--rounds` times each. Each round's
ratio compares two blocks a second apart, so it is far less moved by this machine's drift
than two separate runs would be (the same run of the job differs by up to 30% from minute
to minute here); the median of the rounds' ratios is the figure to quote. It times the model
step only: the job's data path and logging are the same either way (bench/throughput.py's
tuning section measures the whole job with perf.cpu_layers=false).

--layers also times each layer that has a CPU form alone (forward and backward, on the
input shape it has in the model), nn's kernel against the form, alternated the same way.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="20,64,128", help="comma-separated batch sizes")
    parser.add_argument("--rounds", type=int, default=8, help="alternations of the two per batch size")
    parser.add_argument("--layers", action="store_true", help="also time each replaced layer alone")
    parser.add_argument("--out", default=None, help="write the results as JSON here too")
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F

    from train.speed.cpu_layers import ConvToOne, Upsample2x, use_cpu_layers
    from train.speed.host_memory import keep_freed_host_memory
    from train.loop import build_optimizer
    from train.model import ConvDenoiser

    keep_freed_host_memory()  # as the job does by default: no page faults in either variant
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        torch.manual_seed(0)
        x = torch.rand(batch, 1, 28, 28).contiguous(memory_format=torch.channels_last)
        steps = {}
        for name in ("nn", "cpu_layers"):
            torch.manual_seed(0)
            model = ConvDenoiser().to(memory_format=torch.channels_last)
            if name == "cpu_layers":
                use_cpu_layers(model)
            optimizer = build_optimizer(model, 1e-3)

            def step(model=model, optimizer=optimizer):
                F.mse_loss(model(x), x).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            for _ in range(10):  # warm-up: oneDNN's primitives, the allocator's blocks
                step()
            steps[name] = step
        n = max(2000 // batch, 10)
        rates = {name: [] for name in steps}
        for _ in range(args.rounds):
            for name, step in steps.items():
                t = time.perf_counter()
                for _ in range(n):
                    step()
                rates[name].append(n * batch / (time.perf_counter() - t))
        ratios = [fast / plain for fast, plain in zip(rates["cpu_layers"], rates["nn"])]
        rows.append({"batch": batch, "rounds": args.rounds, "steps_per_block": n,
                     "nn_images_per_s": round(statistics.median(rates["nn"])),
                     "cpu_layers_images_per_s": round(statistics.median(rates["cpu_layers"])),
                     "median_ratio": round(statistics.median(ratios), 3),
                     "ratios": [round(r, 3) for r in sorted(ratios)]})
        print(json.dumps(rows[-1]), flush=True)

    layer_rows = []
    for batch in (int(b) for b in args.batches.split(",")) if args.layers else ():
        # The model's layers with a CPU form, each on its input in the model: name, nn layer, form, input channels, size.
        for name, make, form, channels, size in (
                ("conv 32 -> 1, 3x3", lambda: torch.nn.Conv2d(32, 1, 3, padding=1), ConvToOne, 32, 28),
                ("transposed conv 16 -> 32, k2 s2", lambda: torch.nn.ConvTranspose2d(16, 32, 2, stride=2), Upsample2x, 16, 14),
                ("transposed conv 8 -> 16, k2 s2", lambda: torch.nn.ConvTranspose2d(8, 16, 2, stride=2), Upsample2x, 8, 7)):
            x = torch.rand(batch, channels, size, size).contiguous(memory_format=torch.channels_last).requires_grad_()
            plain = make().to(memory_format=torch.channels_last)
            fast = make().to(memory_format=torch.channels_last)
            fast.__class__ = form
            ms = {"nn": [], "form": []}
            for _ in range(5 + args.rounds):
                for key, layer in (("nn", plain), ("form", fast)):
                    t = time.perf_counter()
                    for _ in range(10):
                        layer(x).sum().backward()
                    ms[key].append((time.perf_counter() - t) / 10 * 1e3)
            ms = {key: statistics.median(v[5:]) for key, v in ms.items()}  # the first 5 rounds warm up
            layer_rows.append({"batch": batch, "layer": name, "nn_ms": round(ms["nn"], 2), "form_ms": round(ms["form"], 2)})
            print(json.dumps(layer_rows[-1]), flush=True)

    print("\n| batch | nn images/s | cpu_layers images/s | median ratio (rounds) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['nn_images_per_s']:,} | {r['cpu_layers_images_per_s']:,} | "
              f"{r['median_ratio']:.2f}x ({min(r['ratios']):.2f}-{max(r['ratios']):.2f}, {r['rounds']}) |")
    if layer_rows:
        print("\n| batch | layer, forward + backward | nn (ms) | CPU form (ms) |\n|---|---|---|---|")
        for r in layer_rows:
            print(f"| {r['batch']} | {r['layer']} | {r['nn_ms']:.2f} | {r['form_ms']:.2f} |")
    if args.out:
        from bench.results import machine

        Path(args.out).write_text(json.dumps({"machine": machine(), "torch": torch.__version__,
                                              "threads": torch.get_num_threads(), "rows": rows,
                                              "layers": layer_rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
