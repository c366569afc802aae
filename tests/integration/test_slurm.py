"""`sbatch slurm/denoise.sh` on a real two-node SLURM cluster (slurm/test_cluster.sh; .ci/run
starts it and exports SLURM_CONF). Skipped without one, unless DENOISE_REQUIRE_SLURM=1."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import REPO, interruptible, load_weights, read_metrics, wait_for_metrics

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm():
    ok = shutil.which("sbatch") and os.environ.get("SLURM_CONF") and subprocess.run(
        ["sinfo", "-h"], capture_output=True).returncode == 0
    if not ok:
        if os.environ.get("DENOISE_REQUIRE_SLURM") == "1":
            pytest.fail("no SLURM cluster: start one with `bash slurm/test_cluster.sh start`, export SLURM_CONF")
        pytest.skip("no SLURM cluster (bash slurm/test_cluster.sh start; export SLURM_CONF=...)")
    return os.environ["SLURM_CONF"]


def sbatch(tmp_path: Path, args: list[str], per_node: int = 2) -> subprocess.Popen:
    cmd = ["sbatch", "--parsable", "--wait", "--nodes=2", f"--output={tmp_path}/slurm-%j.out"]
    env = {**os.environ, "NPROC_CPU": str(per_node), "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    return subprocess.Popen(cmd + [str(REPO / "slurm" / "denoise.sh")] + args, cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def job_field(job: str, name: str) -> str:
    info = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    return re.search(rf"\b{name}=(\S+)", info).group(1)


def log_of(tmp_path: Path) -> str:
    return "".join(p.read_text() for p in sorted(tmp_path.glob("slurm-*.out")))


def test_a_two_node_job_preempted_checkpoints_requeues_and_resumes_exactly(slurm, synthetic_mnist, uninterrupted,
                                                                          tmp_path):
    # 2 nodes x 2 ranks: the case where a resume is exact only if every step all-reduces in the
    # same bucket layout (see Trainer._settle_gradient_buckets).
    out = tmp_path / "run"
    proc = sbatch(tmp_path, interruptible(synthetic_mnist, out, 4))
    wait_for_metrics(out, proc, lines=2, log=lambda: log_of(tmp_path))
    job = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()[0]
    # What SLURM sends to the job steps before the time limit (--signal=USR1@180).
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    stdout, stderr = proc.communicate(timeout=300)
    log = log_of(tmp_path)
    assert proc.returncode == 0, log + stderr
    assert "training ended: preempted" in log and f"requeueing job {job}" in log and "run 2 on 2 node(s)" in log
    assert job_field(job, "Restarts") == "1" and job_field(job, "JobState") == "COMPLETED"
    stopped = int(re.search(r"stopped by SIGUSR1 at step (\d+)", log).group(1))
    assert 0 < stopped < 100 and f"resuming from {out}/checkpoints/step_{stopped:08d}" in log
    # Each run: one launcher per node, two ranks each, one world of 4.
    ranks = re.findall(r"\[launch\] \S+ machine_rank=(\d) of 2: 2 process\(es\) here, world 4", log)
    assert sorted(ranks) == ["0", "0", "1", "1"], log
    assert json.loads((out / "setup.json").read_text())["world_size"] == 4
    assert json.loads((out / "status.json").read_text())["outcome"] == "completed"
    steps = [m["step"] for m in read_metrics(out) if "train/loss" in m]
    assert steps == sorted(set(steps)) and steps[-1] == 100
    # Bit-identical to the same 4 ranks trained without interruption (on one node).
    a, b = load_weights(out), uninterrupted(4)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_user_error_is_not_requeued_and_its_exit_code_propagates(slurm, synthetic_mnist, tmp_path):
    out = tmp_path / "run"
    proc = sbatch(tmp_path, interruptible(synthetic_mnist, out, 4) + ["train.lr=-1"])
    stdout, stderr = proc.communicate(timeout=180)
    job = stdout.strip().split(";")[0]
    log = log_of(tmp_path)
    assert proc.returncode == 2, log + stderr
    assert "error: config key 'train.lr' must be > 0" in log and "requeueing" not in log
    assert job_field(job, "Restarts") == "0"
    # The job's own record told the script "failed, 2"; a run refused at start-up writes no status.json.
    assert "training ended: failed" in log and not (out / "status.json").exists()
