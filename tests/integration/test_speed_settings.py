"""The speed settings as the job applies them: wired in only when asked, refused where they
cannot run, and training the same model as the plain run."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch

from conftest import REPO, load_weights, read_metrics, run_main

SMALL = ["--config", "configs/debug.yaml", "train.epochs=1", "logging.wandb_mode=disabled", "logging.every_n_steps=5"]

PROBE = REPO / "tests" / "probes" / "speed_probe.py"


def _ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def runs(synthetic_mnist, tmp_path_factory):
    """An epoch of 5 steps under each setting (a CPU run, on a GPU machine too); name -> (folder, probe)."""
    import ast

    # (perf.pad_thin_convs, a GPU setting, is checked against the plain layers in tests/unit/test_perf.py.)
    settings = {"plain": ["perf.channels_last=false"], "default": [],
                "cpu": ["perf.cpu_layers=true", "perf.reuse_host_memory=true"]}  # configs/fast_cpu.yaml's two
    base = SMALL + [f"data.root={synthetic_mnist}", "data.train_samples=100", "data.test_samples=50"]
    found = {}
    for name, extra in settings.items():
        out = tmp_path_factory.mktemp(name) / "run"
        r = _ok(run_main(base + extra + [f"output_dir={out}"], script=PROBE, env={"CUDA_VISIBLE_DEVICES": ""}))
        found[name] = out, ast.literal_eval(next(line for line in r.stdout.splitlines()
                                                 if line.startswith("probe "))[len("probe "):])
    return found


def test_the_default_run_trains_model_py_as_written_without_the_speed_package(runs):
    from train.model import ConvDenoiser

    _, probe = runs["default"]
    assert probe["layers"] == [type(m).__name__ for m in ConvDenoiser().modules()]
    assert probe["speed"] == [] and probe["use_cpu_layers"] == [] and probe["keep_freed_host_memory"] == []


def test_the_cpu_forms_and_host_memory_apply_only_when_asked(runs):
    _, probe = runs["cpu"]
    assert probe["speed"] == ["train.speed", "train.speed.cpu_layers", "train.speed.host_memory"]
    assert probe["use_cpu_layers"] == [6]  # layers swapped, once
    assert probe["keep_freed_host_memory"] == [platform.libc_ver()[0] == "glibc"]  # once per process


def test_the_speed_settings_train_the_same_model(runs):
    """Other kernels, same arithmetic: weights agree to rounding after an epoch of steps,
    and the train log carries the memory figures."""
    ref = load_weights(runs["plain"][0])
    for name, (out, _) in runs.items():
        got = load_weights(out)
        for k in ref:
            assert torch.allclose(got[k], ref[k], atol=1e-5), (name, k, (got[k] - ref[k]).abs().max())
    record = next(m for m in read_metrics(runs["plain"][0]) if "train/loss" in m)
    assert 0.05 < record["memory/max_rss_gib"] < 64


@pytest.mark.slow
def test_a_compiled_model_trains_the_same_model(runs, synthetic_mnist, tmp_path):
    out = tmp_path / "compiled"
    _ok(run_main(SMALL + [f"data.root={synthetic_mnist}", "data.train_samples=100", "data.test_samples=50",
                          "perf.compile=true", f"output_dir={out}"], timeout=600))
    ref, got = load_weights(runs["plain"][0]), load_weights(out)
    for k in ref:
        assert torch.allclose(got[k], ref[k], atol=1e-5), (k, (got[k] - ref[k]).abs().max())


def test_cuda_graphs_are_refused_where_they_cannot_run(tiny_mnist, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the refusal is for machines without one")
    out = tmp_path / "run"
    result = run_main(SMALL + [f"data.root={tiny_mnist}", f"output_dir={out}", "perf.cuda_graphs=true"])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: perf.cuda_graphs=true needs a CUDA GPU (there is none): set perf.cuda_graphs=false or fix that"]


# -- on a GPU ------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_cuda_graph_run_matches_the_eager_run(mnist_root, tmp_path, precision):
    base = SMALL + [f"data.root={mnist_root}", "data.train_samples=2000", "data.test_samples=500",
                    f"train.mixed_precision={precision}"]
    _ok(run_main(base + [f"output_dir={tmp_path / 'eager'}"]))
    _ok(run_main(base + [f"output_dir={tmp_path / 'graph'}", "perf.cuda_graphs=true"]))
    eager, graph = load_weights(tmp_path / "eager"), load_weights(tmp_path / "graph")
    for k in eager:  # the same deterministic kernels replayed; only Adam's capturable variant rounds apart
        assert torch.allclose(graph[k], eager[k], atol=1e-5), (k, (graph[k] - eager[k]).abs().max())
    le, lg = read_metrics(tmp_path / "eager"), read_metrics(tmp_path / "graph")
    assert [m["step"] for m in le] == [m["step"] for m in lg]
    assert lg[-1]["eval/psnr_db"] == pytest.approx(le[-1]["eval/psnr_db"], abs=0.05)
    assert any("memory/max_allocated_gib" in m for m in lg)


@pytest.mark.gpu
def test_the_fastest_gpu_settings_train_like_the_plain_run(mnist_root, tmp_path):
    """A compiled model with padded thin convs, replayed as a CUDA graph (the large-batch
    setting of docs/performance.md) learns what the eager run learns, to bf16's rounding."""
    base = SMALL + [f"data.root={mnist_root}", "data.train_samples=2000", "data.test_samples=500",
                    "train.mixed_precision=bf16", "train.epochs=5"]
    fast = ["perf.compile=true", "perf.pad_thin_convs=true", "perf.cuda_graphs=true", "perf.cudnn_benchmark=true"]
    _ok(run_main(base + [f"output_dir={tmp_path / 'eager'}"]))
    _ok(run_main(base + fast + [f"output_dir={tmp_path / 'fast'}"], timeout=600))
    le, lf = read_metrics(tmp_path / "eager"), read_metrics(tmp_path / "fast")
    assert [m["step"] for m in lf] == [m["step"] for m in le]
    end_eager, end_fast = le[-1], lf[-1]
    # Other kernels round apart over 500 steps; a graph that stopped training would sit dB below.
    assert end_fast["eval/psnr_db"] == pytest.approx(end_eager["eval/psnr_db"], abs=0.75)
    assert end_fast["eval/psnr_db"] > end_fast["eval/noisy_psnr_db"] + 2


@pytest.mark.gpu
def test_cuda_graph_run_resumes_exactly(mnist_root, tmp_path):
    """Stopped after 60 steps and resumed (a new capture from the checkpoint's state), the
    run ends where an uninterrupted graphed run ends."""
    base = SMALL + [f"data.root={mnist_root}", "data.train_samples=2000", "data.test_samples=500",
                    "perf.cuda_graphs=true", "train.epochs=2", "checkpoint.every_n_steps=60"]
    _ok(run_main(base + [f"output_dir={tmp_path / 'whole'}"]))
    split = tmp_path / "split"
    stopped = run_main(base + [f"output_dir={split}"], env={"DENOISE_FAULT": "after_step:61"})
    assert stopped.returncode != 0
    _ok(run_main(base + [f"output_dir={split}"]))
    whole, resumed = load_weights(tmp_path / "whole"), load_weights(split)
    for k in whole:
        assert torch.allclose(resumed[k], whole[k], atol=1e-6), (k, (resumed[k] - whole[k]).abs().max())


# A fresh process trains a few steps at batch 64 (one thread) and prints the page faults of
# its last ones; argv[1] says whether it first calls keep_freed_host_memory. The least of
# three windows: once in four CI runs a one-off burst (1,568 faults in one window of 10
# steps) pushed a single window over the bound; an unkept process faults in every window.
_FAULTS_PER_STEP = """
import resource, sys
import torch
from train.speed.host_memory import keep_freed_host_memory
from train.model import ConvDenoiser
kept = sys.argv[1] == "keep" and keep_freed_host_memory()
model = ConvDenoiser().to(memory_format=torch.channels_last)
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
x = torch.rand(64, 1, 28, 28).contiguous(memory_format=torch.channels_last)
def step():
    optimizer.zero_grad(set_to_none=True)
    torch.nn.functional.mse_loss(model(x), x).backward()
    optimizer.step()
for _ in range(3):
    step()
windows = []  # faults per step over 3 windows of 10 steps; the quietest one is printed
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    windows.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
print(kept, min(windows))
"""


@pytest.mark.slow
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's malloc")
def test_reused_host_memory_takes_the_page_faults_out_of_a_step():
    """Without the setting each step faults its activations' pages in afresh (thousands per
    step at batch 64); with it, the pages of the step before are reused."""
    per_step = {}
    for mode in ("default", "keep"):
        result = subprocess.run([sys.executable, "-c", _FAULTS_PER_STEP, mode], cwd=REPO, capture_output=True,
                                text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-2000:]
        kept, faults = result.stdout.split()
        assert kept == str(mode == "keep")
        per_step[mode] = float(faults)
    assert per_step["default"] > 1000, per_step  # the problem is there to be solved
    assert per_step["keep"] < 20, per_step
