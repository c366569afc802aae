"""launch/single_node.sh on a machine without GPUs: CPU processes over gloo, arguments passed
through, and SLURM's USR1 forwarded to the training processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from conftest import REPO, interruptible, wait_for_metrics

LAUNCH = REPO / "launch" / "single_node.sh"


@pytest.mark.slow
def test_cpu_fallback_forms_a_group_and_forwards_usr1(synthetic_mnist, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "NGPU": "0", "NPROC_CPU": "2", "OMP_NUM_THREADS": "1",
           "MASTER_PORT": str(20000 + os.getpid() % 10000)}
    env.pop("PET_SIGNALS_TO_HANDLE", None)  # the script must add USR1 itself
    args = interruptible(synthetic_mnist, out, 2)
    proc = subprocess.Popen(["bash", str(LAUNCH)] + args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_metrics(out, proc, lines=1)
    proc.send_signal(signal.SIGUSR1)  # the launcher is the script's process (exec)
    stdout, _ = proc.communicate(timeout=120)
    assert "machine_rank=0 of 1: 2 process(es) here, world 2, CPU" in stdout
    assert json.loads((out / "setup.json").read_text())["world_size"] == 2
    status = json.loads((out / "status.json").read_text())
    assert status["outcome"] == "preempted" and "SIGUSR1" in status["message"]


def _fake_bin(tmp_path, **scripts: str):
    """A folder of stand-in commands (name: shell body), first on PATH."""
    folder = tmp_path / "bin"
    folder.mkdir(exist_ok=True)
    for name, body in scripts.items():
        (folder / name).write_text("#!/bin/sh\n" + body + "\n")
        (folder / name).chmod(0o755)
    return {**os.environ, "PATH": f"{folder}:{os.environ['PATH']}"}


def _launch(tmp_path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """launch/single_node.sh with a stand-in python that prints what it was asked to run."""
    fake = _fake_bin(tmp_path, fakepython='echo "RUN $*"; env | grep -E "^(ACCELERATE_USE_CPU|TORCH_NCCL_ASYNC_ERROR_HANDLING)="',
                     **{"nvidia-smi": 'i=0; while [ "$i" -lt "${FAKE_GPUS:-0}" ]; do echo "GPU $i: H100 (UUID: x)"; '
                                      'i=$((i + 1)); done'})
    for name in ("NGPU", "NPROC_CPU", "CUDA_VISIBLE_DEVICES", "SLURM_GPUS_ON_NODE", "NUM_MACHINES", "MACHINE_RANK"):
        fake.pop(name, None)
    return subprocess.run(["bash", str(LAUNCH), "train.epochs=1"], cwd=REPO, capture_output=True, text=True,
                          env={**fake, "PYTHON": "fakepython", **env}, timeout=60)


@pytest.mark.parametrize("env,words", [
    ({"NPROC_CPU": "0"}, "NPROC_CPU=0 must be a whole number >= 1"),
    ({"NPROC_CPU": "-1"}, "NPROC_CPU=-1 must be a whole number >= 1"),
    ({"NPROC_CPU": "abc"}, "NPROC_CPU=abc must be a whole number >= 1"),
    ({"NGPU": "two"}, "NGPU=two must be a whole number >= 0"),
    ({"NGPU": "2"}, "NGPU=2, but this job can use 0 GPU(s) here (nvidia-smi lists 0)"),
    ({"NGPU": "4", "FAKE_GPUS": "8", "CUDA_VISIBLE_DEVICES": "0,1"}, "NGPU=4, but this job can use 2 GPU(s) here"),
    ({"MACHINE_RANK": "2", "NUM_MACHINES": "2"}, "MACHINE_RANK=2 must be below NUM_MACHINES=2"),
])
def test_the_launcher_refuses_bad_settings_in_one_line(tmp_path, env, words):
    r = _launch(tmp_path, env)
    assert r.returncode == 2 and "RUN" not in r.stdout, r.stdout + r.stderr
    assert r.stderr.strip().startswith(f"[launch] error: {words}")
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.parametrize("env,gpus", [
    ({"FAKE_GPUS": "8", "CUDA_VISIBLE_DEVICES": "2,5"}, 2),  # a job given 2 of a node's 8
    ({"FAKE_GPUS": "8", "SLURM_GPUS_ON_NODE": "4"}, 4),
    ({"FAKE_GPUS": "8", "CUDA_VISIBLE_DEVICES": ""}, 0),  # given none: CPU processes
    ({"FAKE_GPUS": "3"}, 3),
])
def test_the_launcher_uses_the_gpus_the_job_was_given(tmp_path, env, gpus):
    r = _launch(tmp_path, env)
    assert r.returncode == 0, r.stderr
    if gpus == 0:
        assert ", CPU, " in r.stdout and "ACCELERATE_USE_CPU=true" in r.stdout
    else:
        assert f"{gpus} process(es) here, world {gpus}, {gpus} GPU(s)" in r.stdout
        run = next(line for line in r.stdout.splitlines() if line.startswith("RUN"))
        assert f"--num_processes {gpus} " in run and "TORCH_NCCL_ASYNC_ERROR_HANDLING=2" in r.stdout


def test_the_slurm_script_gives_each_node_the_jobs_cpus(tmp_path):
    # Since SLURM 22.05 a step does not inherit the job's --cpus-per-task; the script passes it.
    log = tmp_path / "srun.args"
    env = _fake_bin(tmp_path, srun=f'echo "$@" > {log}',
                    scontrol='case "$1 $2" in "show hostnames") echo node1 ;; "show node") echo "NodeAddr=10.0.0.1" ;; esac')
    env.update({"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "node1", "SLURM_JOB_NUM_NODES": "1", "SLURM_CPUS_PER_TASK": "8",
                "SLURM_SUBMIT_DIR": str(REPO), "OUTPUT_DIR": str(tmp_path / "out"), "SLURM_JOB_NAME": "t"})
    subprocess.run(["bash", str(REPO / "slurm" / "denoise.sh")], cwd=REPO, capture_output=True, text=True, env=env,
                   timeout=60)
    assert "--cpus-per-task=8" in log.read_text().split()
