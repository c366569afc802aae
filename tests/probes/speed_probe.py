"""Runs train/main.py's main with its arguments after recording, for
tests/integration/test_speed_settings.py to read from the last line of stdout ("probe {...}"):
the model's layer classes after apply_perf, the train.speed modules loaded, and what the speed
package's two entry points returned (use_cpu_layers: the layers swapped; keep_freed_host_memory).

    python tests/probes/speed_probe.py [main.py's arguments]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[2])  # the repository root

import train.perf as perf  # noqa: E402

seen: dict = {"layers": None, "use_cpu_layers": [], "keep_freed_host_memory": []}
real_apply = perf.apply_perf


def apply_perf(model, *args):
    notes = real_apply(model, *args)
    seen["layers"] = [type(m).__name__ for m in model.modules()]
    return notes


def returns(frame, event, value):  # a profile hook: it sees returns without importing train.speed
    if event == "return" and frame.f_code.co_name in seen and "/train/speed/" in frame.f_code.co_filename:
        seen[frame.f_code.co_name].append(value)


if __name__ == "__main__":
    perf.apply_perf = apply_perf
    sys.setprofile(returns)
    from train.main import main

    code = main(sys.argv[1:])
    sys.setprofile(None)
    seen["speed"] = sorted(n for n in sys.modules if n.startswith("train.speed"))
    print("probe", seen)
    sys.exit(code)
