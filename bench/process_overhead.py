"""What a training process pays before its first step and after its last, outside the job:
importing torchvision on top of what train/main.py imports (main.py no longer does), and the
interpreter's exit with and without the `gc.freeze()` main.py calls before it. Alternated
pairs in one run; medians.

    python bench/process_overhead.py [--pairs 5]

docs/performance.md has the figures. (The tests start a process per run: this is most of
their time, and why tests/warm_main.py exists.)
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

IMPORTS = "import torch, torch._dynamo, accelerate"  # torch.optim imports torch._dynamo at the first optimizer


def _timed(code: str) -> tuple[float, float]:
    """(seconds from start to the end of `code`, seconds from there to the process's end)."""
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-c", code + "; import time; print(time.time(), flush=True)"],
                            stdout=subprocess.PIPE, text=True)
    printed = float(proc.stdout.readline())
    proc.wait()
    return printed - t0, time.time() - printed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=5)
    args = parser.parse_args()
    cases = {"imports": IMPORTS, "imports + torchvision": IMPORTS + ", torchvision",
             "imports, gc.freeze()": IMPORTS + "; import gc; gc.freeze()"}
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    for _ in range(args.pairs):
        for name, code in cases.items():
            runs[name].append(_timed(code))
    start = {name: statistics.median(r[0] for r in runs[name]) for name in cases}
    end = {name: statistics.median(r[1] for r in runs[name]) for name in cases}
    from results import machine  # bench/results.py: the CPU's name and vector unit

    print(f"{machine('cpu')}, medians of {args.pairs}:")
    for name in cases:
        print(f"  {name:24} start {start[name]:.2f} s  exit {end[name]:.2f} s")
    print(f"torchvision adds {start['imports + torchvision'] - start['imports']:.2f} s to the start; "
          f"gc.freeze() makes the exit {end['imports'] / end['imports, gc.freeze()']:.1f}x quicker")


if __name__ == "__main__":
    main()
