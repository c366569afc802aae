"""Cluster recipes on real launchers: a run that changes world size between resumes, and
torchrun's elastic restarts after a worker is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ENV, MAIN, REPO, _free_port, accelerate_cpu, load_weights, read_metrics, run_main

# 600 images, global batch 12: 50 optimizer steps an epoch, 100 in all; 12 splits over 1 to 4
# processes (3 per process on 4, 6 on 2, 4 on 3).
ELASTIC = ["--config", "configs/debug.yaml", "data.train_samples=600", "data.test_samples=200", "train.epochs=2",
           "train.global_batch_size=12", "logging.every_n_steps=5", "logging.wandb_mode=disabled",
           "checkpoint.every_n_steps=10", "checkpoint.keep_last=20"]
# Rounding differs between world sizes (the all-reduce sums in another order), so the runs agree
# to rounding step by step and drift apart slowly. Measured (1 against 4 -> 2 -> 3 processes,
# 100 Adam steps): losses to 1.3e-7 relative, weights to 1.8e-5, test PSNR to 1e-6 dB.
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-4
PSNR_ATOL_DB = 1e-3


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def one_process(synthetic_mnist, tmp_path_factory) -> Path:
    """ELASTIC trained without interruption by one process."""
    out = tmp_path_factory.mktemp("one_process") / "run"
    _ok(run_main(ELASTIC + [f"data.root={synthetic_mnist}", f"output_dir={out}"]))
    return out


def _assert_same_run(out: Path, ref: Path) -> None:
    """Same steps logged, losses equal to rounding, the end equal in quality. (`out` also
    evaluated where each of its segments stopped.)"""
    def by_step(path: Path, key: str) -> dict[int, float]:
        return {m["step"]: m[key] for m in read_metrics(path) if key in m}

    losses, ref_losses = by_step(out, "train/loss"), by_step(ref, "train/loss")
    assert sorted(losses) == sorted(ref_losses) == list(range(5, 101, 5))  # gap-free across the resumes
    for step, loss in ref_losses.items():  # the same images and the same noise in every global batch
        assert losses[step] == pytest.approx(loss, rel=LOSS_RTOL), step
    psnr, ref_psnr = by_step(out, "eval/psnr_db"), by_step(ref, "eval/psnr_db")
    for step in (50, 100):  # the epochs' ends
        assert psnr[step] == pytest.approx(ref_psnr[step], abs=PSNR_ATOL_DB), step
    weights, ref_weights = load_weights(out), load_weights(ref)
    for key in ref_weights:
        torch.testing.assert_close(weights[key], ref_weights[key], rtol=0, atol=WEIGHT_ATOL, msg=key)


@pytest.mark.slow
def test_a_checkpoint_resumes_on_4_then_2_then_3_processes(synthetic_mnist, tmp_path, one_process):
    out = tmp_path / "run"
    args = ELASTIC + [f"data.root={synthetic_mnist}", f"output_dir={out}"]
    _ok(run_main(args + ["train.max_steps=30"], launcher=accelerate_cpu(4)))
    r = _ok(run_main(args + ["train.max_steps=60"], launcher=accelerate_cpu(2)))
    assert "step_00000030" in r.stdout and "written by 4 processes, now 2" in r.stdout
    r = _ok(run_main(args, launcher=accelerate_cpu(3)))
    assert "step_00000060" in r.stdout and "written by 2 processes, now 3" in r.stdout
    assert "3 per process" not in r.stdout and "(4 per process per micro-step)" in r.stdout
    assert json.loads((out / "setup.json").read_text())["world_size"] == 3
    _assert_same_run(out, one_process)
    # Negative control: a step of training moves the weights by far more than the tolerance.
    from safetensors.torch import load_file

    before = load_file(str(out / "checkpoints" / "step_00000090" / "model.safetensors"))
    ref = load_weights(one_process)
    assert max((before[k] - ref[k]).abs().max().item() for k in ref) > 10 * WEIGHT_ATOL


def test_a_global_batch_that_does_not_split_over_the_processes_is_one_line(synthetic_mnist, tmp_path):
    r = run_main(ELASTIC + [f"data.root={synthetic_mnist}", f"output_dir={tmp_path / 'run'}",
                            "train.global_batch_size=20"], launcher=accelerate_cpu(3))
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode != 0, r.stderr[-3000:]  # (accelerate launch adds its own traceback of the exit status)
    assert errors == ["error: config key 'train.global_batch_size' (20) does not split evenly over 3 processes x 1 "
                      "accumulation steps: make it a multiple of 3, or launch a number of processes that divides it"]


def _worker_pid(run_id: str, rank: int, timeout: float = 60) -> int:
    """The pid of the training process of `rank` under the torchrun run `run_id`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for proc in Path("/proc").iterdir():
            try:
                env = (proc / "environ").read_bytes().split(b"\0")
            except (OSError, ValueError):
                continue
            if f"TORCHELASTIC_RUN_ID={run_id}".encode() in env and f"RANK={rank}".encode() in env:
                return int(proc.name)
        time.sleep(0.2)
    raise AssertionError(f"no rank {rank} of torchrun run {run_id}")


@pytest.mark.slow
def test_torchrun_restarts_a_killed_worker_and_the_run_resumes_from_its_checkpoint(synthetic_mnist, tmp_path,
                                                                                  one_process):
    out, run_id = tmp_path / "run", f"elastic-{os.getpid()}-{time.time_ns()}"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1:2", "--nproc-per-node=2",
                "--max-restarts=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}",
                f"--rdzv-id={run_id}", "--rdzv-conf=last_call_timeout=1"]  # don't wait 30 s for a second node
    proc = subprocess.Popen(torchrun + [str(MAIN)] + ELASTIC + [f"data.root={synthetic_mnist}", f"output_dir={out}"],
                            cwd=REPO, env={**os.environ, **ENV}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.time() + 120
        while not (out / "checkpoints" / "step_00000020").is_dir() and proc.poll() is None:
            assert time.time() < deadline, "no checkpoint at step 20"
            time.sleep(0.2)
        os.kill(_worker_pid(run_id, 1), signal.SIGKILL)  # a worker lost mid-run (OOM killer, a bad GPU)
        log, _ = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, log[-4000:]
    [resumed] = [line for line in log.splitlines() if "resuming from" in line]
    assert "step_000000" in resumed and "written by 2 processes, now 2" in resumed
    assert int(resumed.split("step_")[1][:8]) >= 20  # from the newest checkpoint, not from the start
    assert json.loads((out / "status.json").read_text())["outcome"] == "completed"
    _assert_same_run(out, one_process)  # gap-free metrics, the same losses, the same end
