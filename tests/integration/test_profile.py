"""bench/profile_step.py: the steady-state window holds exactly the steps asked for."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO

SCRIPT = REPO / "bench" / "profile_step.py"


def _profile(tiny_mnist, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, str(SCRIPT), "--data", str(tiny_mnist), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_skip_profiles_only_the_steps_after_the_warm_up(tiny_mnist, tmp_path):
    out = tmp_path / "profile.json"
    result = _profile(tiny_mnist, "--skip", "2", "--steps", "3", "--top", "100", "--out", str(out),
                      "train.per_device_batch_size=8", "perf.cpu_layers=false")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["name"]: r for r in json.loads(out.read_text())["top"]}
    # Per training step the reference model runs 7 conv backward passes (nn's layers: the
    # CPU forms of perf.cpu_layers do three of them as matrix products) and 3 max-pools.
    # The warm-up steps, the step after them and the closing evaluation (more pools, no
    # backward) would each change these counts if the window let them in.
    assert rows["aten::convolution_backward"]["calls_per_step"] == 7.0
    assert rows["aten::max_pool2d_with_indices"]["calls_per_step"] == 3.0


def test_skip_is_refused_with_cuda_graphs(tiny_mnist):
    result = _profile(tiny_mnist, "--skip", "2", "--steps", "3", "perf.cuda_graphs=true")
    assert result.returncode == 2
    assert "leave --skip out for perf.cuda_graphs=true" in result.stderr and "Traceback" not in result.stderr
