"""`sbatch slurm/denoise.sh`, slurm/sweep.sh and slurm/drill.py on a real SLURM cluster of three
nodes (slurm/test_cluster.sh; .ci/run starts it and exports SLURM_CONF). Skipped without one,
unless DENOISE_REQUIRE_SLURM=1."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import EXACT, INTERRUPTIBLE, REPO, interruptible, load_weights, read_metrics, wait_for_metrics

pytestmark = pytest.mark.slow
# Seconds a job may wait in the queue: the tests share three nodes, and under two pytest
# workers two of them run at once (a job can wait for the other's, ~2.5 minutes at most).
QUEUED_S = 400


@pytest.fixture(scope="module")
def slurm():
    ok = shutil.which("sbatch") and os.environ.get("SLURM_CONF") and subprocess.run(
        ["sinfo", "-h"], capture_output=True).returncode == 0
    if not ok:
        if os.environ.get("DENOISE_REQUIRE_SLURM") == "1":
            pytest.fail("no SLURM cluster: start one with `bash slurm/test_cluster.sh start`, export SLURM_CONF")
        pytest.skip("no SLURM cluster (bash slurm/test_cluster.sh start; export SLURM_CONF=...)")
    return os.environ["SLURM_CONF"]


def sbatch(tmp_path: Path, args: list[str], per_node: int = 2, nodes: str = "2",
           env: dict[str, str] | None = None) -> subprocess.Popen:
    cmd = ["sbatch", "--parsable", "--wait", f"--nodes={nodes}", f"--output={tmp_path}/slurm-%j.out"]
    env = {**os.environ, "NPROC_CPU": str(per_node), "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", **(env or {})}
    return subprocess.Popen(cmd + [str(REPO / "slurm" / "denoise.sh")] + args, cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def job_field(job: str, name: str) -> str:
    info = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    return re.search(rf"\b{name}=(\S+)", info).group(1)


def job_of(tmp_path: Path) -> str:
    """The id of the job this test submitted (from its log's name: other tests' jobs run too)."""
    [log] = tmp_path.glob("slurm-*.out")
    return log.name[len("slurm-"):-len(".out")]


def log_of(tmp_path: Path) -> str:
    return "".join(p.read_text() for p in sorted(tmp_path.glob("slurm-*.out")))


def test_a_two_node_job_preempted_checkpoints_requeues_and_resumes_exactly(slurm, synthetic_mnist, uninterrupted,
                                                                          tmp_path):
    # 2 nodes x 2 ranks: the case where a resume is exact only if every step all-reduces in the
    # same bucket layout (see Trainer._settle_gradient_buckets).
    out = tmp_path / "run"
    proc = sbatch(tmp_path, interruptible(synthetic_mnist, out, 4))
    wait_for_metrics(out, proc, lines=2, log=lambda: log_of(tmp_path), timeout=QUEUED_S)
    job = job_of(tmp_path)
    # What SLURM sends to the job steps before the time limit (--signal=USR1@180).
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    stdout, stderr = proc.communicate(timeout=QUEUED_S + 300)
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


# A config mistake, found by the script before any job step; a mistake found at start-up (no data).
@pytest.mark.parametrize("mistake,error", [
    ("train.lr=-1", "error: config key 'train.lr' must be > 0"),
    ("data.root=/nonexistent", "error: MNIST not found in /nonexistent/MNIST/raw and data.download is false")])
def test_user_error_is_not_requeued_and_its_exit_code_propagates(slurm, synthetic_mnist, tmp_path, mistake, error):
    out = tmp_path / "run"
    proc = sbatch(tmp_path, interruptible(synthetic_mnist, out, 4) + ["data.download=false", mistake])
    stdout, stderr = proc.communicate(timeout=QUEUED_S + 180)
    job = stdout.strip().split(";")[0]
    log = log_of(tmp_path)
    assert proc.returncode == 2, log + stderr
    assert error in log and "requeueing" not in log and "lost contact" not in log, log
    assert job_field(job, "Restarts") == "0"
    assert not (out / "status.json").exists()  # a run refused at start-up writes none
    if mistake.startswith("data."):  # the job's own record told the script "failed, 2"
        assert "training ended: failed" in log
    else:
        assert not out.exists()


def test_a_job_writes_to_the_output_dir_of_its_config_file(slurm, synthetic_mnist, tmp_path):
    out = tmp_path / "from_config"
    config = yaml.safe_load((REPO / "configs" / "debug.yaml").read_text())
    config.update(output_dir=str(out))
    config["data"].update(root=str(synthetic_mnist), train_samples=200, test_samples=100)
    config["logging"] = {**config.get("logging", {}), "wandb_mode": "disabled"}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    proc = sbatch(tmp_path, ["--config", str(tmp_path / "run.yaml"), "train.epochs=1"], per_node=1, nodes="1")
    stdout, stderr = proc.communicate(timeout=QUEUED_S + 180)
    log = log_of(tmp_path)
    assert proc.returncode == 0, log + stderr
    assert f"output {out}" in log and json.loads((out / "status.json").read_text())["outcome"] == "completed"
    assert (out / "model.safetensors").exists() and not list(out.glob(".job-*"))


def _pids_on(node: str, out: Path) -> list[int]:
    """The training processes of the run in `out` on SLURM node `node`."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if b"train/main.py" in cmdline and f"output_dir={out}".encode() in cmdline and \
                f"SLURMD_NODENAME={node}".encode() in env and any(v.startswith(b"RANK=") for v in env):
            pids.append(int(proc.name))
    return pids


def hostnames(nodelist: str) -> list[str]:
    return subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                          check=True).stdout.split()


def _assert_rerun_without(bad: str, tmp_path: Path, proc: subprocess.Popen, job: str, out: Path,
                          weights: dict | None = None) -> str:
    """The job ended with node `bad` named, ran again on two others, and ended as `weights` (if given)."""
    stdout, stderr = proc.communicate(timeout=QUEUED_S + 400)
    log = log_of(tmp_path)
    assert proc.returncode == 0, log + stderr
    assert "training ended: node_failure" in log and f"requeueing job {job} without {bad}" in log, log
    assert job_field(job, "ExcNodeList") == bad and job_field(job, "JobState") == "COMPLETED"
    rerun = re.search(r"run 2 on 2 node\(s\) \((\S+)\)", log)
    assert rerun and bad not in hostnames(rerun.group(1)), log
    assert re.search(r"resuming from \S+/step_000000[24]0 ", log), log  # not from the start
    assert json.loads((out / "status.json").read_text())["outcome"] == "completed"
    steps = [m["step"] for m in read_metrics(out) if "train/loss" in m]
    assert steps == list(range(10, 101, 10))  # gap-free
    if weights is not None:  # bit-identical to a run without the fault
        a = load_weights(out)
        assert all(torch.equal(a[k], weights[k]) for k in a)
    return log


# Other tests' jobs run beside these, so a job's nodes are whichever SLURM gave it; the second
# one (SLURM_NODEID 1, ranks 2-3 or rank 1) is the one that fails.
def test_a_node_whose_ranks_die_is_left_out_and_the_job_resumes_on_the_others(slurm, synthetic_mnist, uninterrupted,
                                                                              tmp_path):
    # train.exact_reduction: the job ends bit-identical to an uninterrupted run on one process.
    out = tmp_path / "run"
    proc = sbatch(tmp_path, interruptible(synthetic_mnist, out, 4) + ["checkpoint.every_n_steps=20"] + EXACT)
    wait_for_metrics(out, proc, lines=3, log=lambda: log_of(tmp_path), timeout=QUEUED_S)
    job = job_of(tmp_path)
    bad = hostnames(job_field(job, "NodeList"))[1]
    victims = _pids_on(bad, out)
    assert len(victims) == 2 and (out / "checkpoints").is_dir(), victims
    for pid in victims:  # that node's ranks die without a word (a GPU falls off the bus, the OOM killer)
        os.kill(pid, signal.SIGKILL)
    log = _assert_rerun_without(bad, tmp_path, proc, job, out, uninterrupted(1, *EXACT))
    assert "error: lost contact with another rank" in log, log


def test_a_node_whose_rank_hangs_is_left_out_once_the_collective_times_out(slurm, synthetic_mnist, tmp_path):
    out = tmp_path / "run"
    # rank 1 hangs after step 30, deaf to every signal but SIGKILL (stuck in native code)
    proc = sbatch(tmp_path, interruptible(synthetic_mnist, out, 2) + ["checkpoint.every_n_steps=20",
                                                                      "train.collective_timeout_s=10"],
                  per_node=1, env={"DENOISE_FAULT": "hang_after_step:30@1"})
    wait_for_metrics(out, proc, lines=1, log=lambda: log_of(tmp_path), timeout=QUEUED_S)
    job = job_of(tmp_path)
    bad = hostnames(job_field(job, "NodeList"))[1]
    # (~2.5 minutes: the 10 s timeout, then the hung rank, orphaned when SLURM kills its launcher,
    # ends itself 60 s later; the test above checks that a rerun ends bit-identical)
    log = _assert_rerun_without(bad, tmp_path, proc, job, out)
    [line] = [line for line in log.splitlines() if line.startswith("error: lost contact")]  # rank 0's only
    assert "timed out" in line.lower(), line


def test_a_sweep_runs_as_a_job_array_whose_preempted_task_requeues_alone(slurm, synthetic_mnist, tmp_path):
    root = tmp_path / "sweep"
    sweep = tmp_path / "lr.yaml"
    sweep.write_text(json.dumps({  # JSON is YAML
        "name": "lr", "config": "configs/debug.yaml", "output_root": str(root),
        # 200 steps, so that the signal comes well before the end
        "overrides": INTERRUPTIBLE[2:] + ["data.train_samples=4000", "checkpoint.every_n_steps=20"],
        "grid": {"train.lr": [0.001, 0.002, 0.003]}}))
    env = {**os.environ, "NPROC_CPU": "1", "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true",
           "SBATCH_FLAGS": f"--wait --nodes=1 --output={tmp_path}/%x-%A_%a.out"}
    proc = subprocess.Popen(["bash", "slurm/sweep.sh", str(sweep), f"data.root={synthetic_mnist}"], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    logs = lambda: "".join(p.read_text() for p in sorted(tmp_path.glob("*.out")))  # noqa: E731
    deadline = time.time() + QUEUED_S
    while not list(root.glob("task-001-*/metrics.jsonl")):
        assert time.time() < deadline and proc.poll() is None, logs()
        time.sleep(0.5)
    task1 = next(root.glob("task-001-*"))
    wait_for_metrics(task1, proc, lines=2, log=logs, timeout=QUEUED_S)
    array = subprocess.run(["squeue", "-h", "-o", "%F", "-n", "sweep-lr"], capture_output=True,
                           text=True).stdout.split()[0]
    subprocess.run(["scancel", "--signal=USR1", f"{array}_1"], check=True)  # task 1's time is up
    stdout, stderr = proc.communicate(timeout=QUEUED_S + 400)
    assert proc.returncode == 0, logs() + stderr
    task_logs = {k: (tmp_path / f"sweep-lr-{array}_{k}.out").read_text() for k in range(3)}
    assert f"requeueing job {array}_1 " in task_logs[1] and "run 2 on 1 node(s)" in task_logs[1], task_logs[1]
    for k in (0, 2):  # the others ran once, untouched
        assert "requeueing" not in task_logs[k] and "run 2 " not in task_logs[k], task_logs[k]
    dirs = sorted(root.glob("task-*"))
    assert [d.name[:8] for d in dirs] == ["task-000", "task-001", "task-002"]
    run_ids = set()
    for k, d in enumerate(dirs):
        assert json.loads((d / "status.json").read_text())["outcome"] == "completed"
        assert yaml.safe_load((d / "config.yaml").read_text())["train"]["lr"] == [0.001, 0.002, 0.003][k]
        steps = [m["step"] for m in read_metrics(d) if "train/loss" in m]
        # task 1 too: gap-free across its requeue (it also logged the step it stopped at)
        assert steps == sorted(set(steps)) and set(range(10, 201, 10)) <= set(steps), (k, steps)
        state = sorted((d / "checkpoints").glob("step_*"))[-1] / "trainer_state.json"
        run_ids.add(json.loads(state.read_text())["run_id"])
    assert len(run_ids) == 3  # a wandb run each
    r = subprocess.run([sys.executable, "slurm/sweep.py", "summary", str(sweep)], cwd=REPO, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    header, *rows = r.stdout.splitlines()
    assert header.split()[:6] == ["task", "train.lr", "outcome", "step", "best_psnr_db", "best_step"]
    assert sorted(row.split()[0] for row in rows) == ["0", "1", "2"]
    assert all(row.split()[2:4] == ["completed", "200"] for row in rows), r.stdout
    psnr = [float(row.split()[4]) for row in rows]
    assert psnr == sorted(psnr, reverse=True) and psnr[-1] > 5  # best first


def test_the_preemption_drill_passes_on_the_test_cluster(slurm, synthetic_mnist, tmp_path):
    r = subprocess.run([sys.executable, "slurm/drill.py", "--signals", "2", "--seed", "7", "--work-dir",
                        str(tmp_path / "drill"), f"data.root={synthetic_mnist}", "train.epochs=3"], cwd=REPO,
                       capture_output=True,
                       text=True, timeout=QUEUED_S + 600,
                       env={**os.environ, "NPROC_CPU": "1", "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"})
    assert r.returncode == 0 and "drill: PASSED: 2 signals, 2 requeues, weights identical" in r.stdout, \
        r.stdout + r.stderr
    assert "warning before the time limit (#SBATCH --signal): 180 s" in r.stdout and "KillWait=" in r.stdout
    delays = [float(d) for d in re.findall(r"checkpoint step_\d+ ([\d.]+) s later", r.stdout)]
    assert len(delays) == 2 and max(delays) < 180, r.stdout
