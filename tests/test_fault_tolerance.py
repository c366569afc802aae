"""Crashes, preemption signals and damaged checkpoints: no work lost beyond the last
checkpoint, resumed runs end exactly where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import MAIN, REPO, accelerate_cpu, load_weights, read_metrics, run_main, wait_for_metrics

# 400 images / batch 20 = 20 steps per epoch, 2 epochs; checkpoints every 8 steps and at
# epoch ends (8, 16, 20, 24, 32, 40).
RUN = ["--config", "configs/debug.yaml", "data.train_samples=400", "data.test_samples=100", "train.epochs=2",
       "logging.every_n_steps=4", "checkpoint.every_n_steps=8", "checkpoint.keep_last=3",
       "logging.wandb_mode=disabled"]
PREEMPTED_EXIT = 75


def _ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr[-3000:]}"
    return result


def _status(out: Path) -> dict:
    return json.loads((out / "status.json").read_text())


def _trajectory(out: Path) -> list[tuple]:
    """What must match an uninterrupted run: each logged step, its kind and its loss or metrics."""
    return [(m["step"], m.get("train/loss"), m.get("eval/mse"), m.get("eval/ssim")) for m in read_metrics(out)]


@pytest.fixture(scope="module")
def straight(mnist_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    _ok(run_main(RUN + [f"data.root={mnist_root}", f"output_dir={out}"]))
    assert _status(out)["outcome"] == "completed"
    return out


def _assert_same_as(out: Path, straight: Path) -> None:
    a, b = load_weights(out), load_weights(straight)
    assert all(torch.equal(a[k], b[k]) for k in a), "a resumed run must end bit-identical on one CPU process"
    steps = [(m["step"], "eval/mse" in m) for m in read_metrics(out)]
    assert len(steps) == len(set(steps)), "metrics.jsonl has a duplicated step"
    assert _trajectory(out) == _trajectory(straight), "metrics.jsonl has gaps or different values"


@pytest.mark.parametrize("fault,survivors", [
    ("after_step:3", []),  # before the first checkpoint
    ("after_step:13", ["step_00000008"]),  # mid-epoch
    ("in_save:20", ["step_00000008", "step_00000016"]),  # while writing the epoch-end checkpoint
    ("after_step:20", ["step_00000008", "step_00000016"]),  # at the epoch boundary, before its eval
])
def test_sigkill_then_resume_ends_bit_identical(mnist_root, tmp_path, straight, fault, survivors):
    out = tmp_path / "run"
    args = RUN + [f"data.root={mnist_root}", f"output_dir={out}"]
    killed = run_main(args, env={"DENOISE_FAULT": fault})
    assert killed.returncode == -signal.SIGKILL
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == survivors
    assert _status(out)["outcome"] == "running"  # what a SIGKILLed job leaves: not "completed"
    _ok(run_main(args))
    _assert_same_as(out, straight)
    assert not list((out / "checkpoints").glob(".tmp-*")), "a half-written checkpoint is cleaned up"


def test_damaged_newest_checkpoint_is_reported_and_the_previous_one_used(mnist_root, tmp_path, straight):
    out = tmp_path / "run"
    args = RUN + [f"data.root={mnist_root}", f"output_dir={out}"]
    assert run_main(args, env={"DENOISE_FAULT": "after_step:30"}).returncode == -signal.SIGKILL
    newest = out / "checkpoints" / "step_00000024"
    opt = newest / "optimizer.bin"
    opt.write_bytes(opt.read_bytes()[: opt.stat().st_size // 2])  # truncated, as by a full disk
    r = _ok(run_main(args))
    assert f"checkpoint {newest} is damaged (optimizer.bin does not match its checksum" in r.stdout
    assert "resuming from" in r.stdout and "step_00000020" in r.stdout
    _assert_same_as(out, straight)


def test_a_torn_metrics_tail_is_repaired_on_resume(mnist_root, tmp_path, straight):
    out = tmp_path / "run"
    args = RUN + [f"data.root={mnist_root}", f"output_dir={out}"]
    assert run_main(args, env={"DENOISE_FAULT": "after_step:13"}).returncode == -signal.SIGKILL
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 12, "epoch": 0, "train/lo')  # the tail a kill or a full disk leaves mid-write
    r = _ok(run_main(args))
    assert "metrics.jsonl: dropped 1 damaged line(s) (34 bytes, written as the run was killed or the disk filled)" in r.stdout
    _assert_same_as(out, straight)


def test_every_checkpoint_damaged_is_refused_and_nothing_is_deleted(mnist_root, tmp_path):
    out = tmp_path / "run"
    args = RUN + [f"data.root={mnist_root}", f"output_dir={out}"]
    assert run_main(args, env={"DENOISE_FAULT": "after_step:30"}).returncode == -signal.SIGKILL
    for ckpt in (out / "checkpoints").glob("step_*"):
        (ckpt / "optimizer.bin").write_bytes(b"damaged")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    r = run_main(args)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    [line] = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert line.startswith(f"error: every checkpoint in {out / 'checkpoints'} is damaged (step_00000024: optimizer.bin "
                           f"does not match its checksum") and line.endswith("nothing was deleted"), line
    # status.json is settled from the killed run's "running" to "failed", run.lock names the
    # refused run that held it for a moment; nothing else changes.
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name not in ("status.json", "run.lock")}
    assert after == {p: b for p, b in before.items() if p.name not in ("status.json", "run.lock")}


def test_pruning_never_deletes_an_intact_checkpoint_for_a_damaged_one(tmp_path):
    from train.checkpoint import MANIFEST, _file_digest, _prunable

    def checkpoint(step: int, damaged: bool = False) -> None:
        path = tmp_path / "checkpoints" / f"step_{step:08d}"
        path.mkdir(parents=True)
        (path / "model.safetensors").write_bytes(b"weights %d" % step)
        (path / MANIFEST).write_text(json.dumps({"model.safetensors": _file_digest(path / "model.safetensors")}))
        if damaged:
            (path / "model.safetensors").write_bytes(b"torn")

    for step, damaged in ((8, False), (16, False), (24, True), (32, True), (40, False)):
        checkpoint(step, damaged)
    # keep_last=2: the two newest intact ones are 40 and 16; older ones go, damaged or not, and
    # the damaged 24 and 32 between them stay (nothing newer than a kept one is deleted).
    assert [p.name for p in _prunable(tmp_path, 2)] == ["step_00000008"]
    assert [p.name for p in _prunable(tmp_path, 3)] == []
    assert [p.name for p in _prunable(tmp_path, 1)] == ["step_00000008", "step_00000016", "step_00000024",
                                                        "step_00000032"]


def test_explicit_damaged_checkpoint_is_an_error(mnist_root, tmp_path, straight):
    ckpt = tmp_path / "copy"
    shutil.copytree(straight / "checkpoints" / "step_00000040", ckpt)
    (ckpt / "model.safetensors").write_bytes(b"garbage")
    r = run_main(RUN + [f"data.root={mnist_root}", f"output_dir={tmp_path / 'out'}", f"checkpoint.resume={ckpt}"])
    assert r.returncode == 2 and "model.safetensors does not match its checksum" in r.stderr
    assert "Traceback" not in r.stderr


def test_resuming_with_settings_that_change_the_meaning_is_refused(mnist_root, tmp_path, straight):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    base = RUN + [f"data.root={mnist_root}", f"output_dir={out}", "train.epochs=3"]
    r = run_main(base + ["train.per_device_batch_size=10", "train.seed=4"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "global_micro_batch: saved 20, now 10" in r.stderr and "train.seed: saved 0, now 4" in r.stderr
    assert "restore them (train.per_device_batch_size=20 train.seed=0)" in r.stderr
    # Nothing saved was touched, status.json included: it still records the finished run.
    # (run.lock names whoever holds the folder: the refused run did, for a moment.)
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "run.lock"}
    assert after == {p: b for p, b in before.items() if p.name != "run.lock"}
    assert _status(out)["outcome"] == "completed"
    # A harmless change (more epochs, other logging) continues the run.
    r = _ok(run_main(base + ["logging.every_n_steps=10"]))
    assert "resuming from" in r.stdout and read_metrics(out)[-1]["step"] == 60


def test_a_finished_run_started_again_does_nothing(mnist_root, tmp_path, straight):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    r = _ok(run_main(RUN + [f"data.root={mnist_root}", f"output_dir={out}"]))
    assert "nothing to do" in r.stdout
    assert _trajectory(out) == _trajectory(straight)


# Slower steps (batch 10 on 2 ranks, 200 per epoch) so a signal lands mid-training.
SIGNAL_RUN = ["--config", "configs/debug.yaml", "data.train_samples=4000", "data.test_samples=100",
              "train.epochs=1", "train.per_device_batch_size=10", "logging.every_n_steps=10",
              "logging.wandb_mode=disabled"]
# torchrun (under accelerate launch) forwards only these signals to the workers by default;
# SIGUSR1 must be added, as launch/ and slurm/ do.
FORWARD = {"PET_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"}


def _signal_run_args(mnist_root: Path, out: Path, nproc: int) -> list[str]:
    return SIGNAL_RUN + [f"data.root={mnist_root}", f"output_dir={out}", f"train.per_device_batch_size={20 // nproc}"]


@pytest.fixture(scope="module")
def uninterrupted(mnist_root, tmp_path_factory):
    """`uninterrupted(nproc)`: the final weights of SIGNAL_RUN on nproc ranks, run once per nproc."""
    weights = {}

    def get(nproc: int) -> dict:
        if nproc not in weights:
            out = tmp_path_factory.mktemp(f"uninterrupted{nproc}") / "run"
            _ok(run_main(_signal_run_args(mnist_root, out, nproc), launcher=accelerate_cpu(nproc), env=FORWARD))
            weights[nproc] = load_weights(out)
        return weights[nproc]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("signame,nproc", [("SIGTERM", 2), ("SIGUSR1", 2), ("SIGINT", 4)])
def test_signal_to_the_launcher_checkpoints_every_rank_at_one_step_and_resumes(mnist_root, tmp_path, uninterrupted,
                                                                                signame, nproc):
    out = tmp_path / "run"
    cmd = accelerate_cpu(nproc) + [str(MAIN)] + _signal_run_args(mnist_root, out, nproc)
    env = {**os.environ, "OMP_NUM_THREADS": "1", **FORWARD}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_metrics(out, proc, lines=2)
    proc.send_signal(getattr(signal, signame))
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0  # the launcher reports 1 for any child status...
    status = _status(out)  # ...so the outcome is read from status.json
    assert status["outcome"] == "preempted" and status["exit_code"] == PREEMPTED_EXIT, status
    stopped = status["step"]
    assert 0 < stopped < 200 and f"stopped by {signame} at step {stopped}" in stdout
    assert [p.name for p in (out / "checkpoints").glob("step_*")] == [f"step_{stopped:08d}"]

    resumed = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from" in resumed.stdout and _status(out)["outcome"] == "completed"
    lines = read_metrics(out)
    steps = [m["step"] for m in lines if "train/loss" in m]
    assert steps == sorted(set(steps)) and steps[-1] == 200 and lines[-1]["step"] == 200

    # The same run without interruption, on as many processes, ends with the same weights.
    a, b = load_weights(out), uninterrupted(nproc)
    assert all(torch.equal(a[k], b[k]) for k in a), "a resume must be bit-exact on the same processes"


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    # 3 ranks, so the vote is a sum, not just the other rank's flag; rank 2 alone is signalled.
    vote = REPO / "tests" / "probes" / "stop_vote_probe.py"
    _ok(subprocess.run(accelerate_cpu(3) + [str(vote), str(tmp_path), "2", "3", "7"], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"}))
    ranks = [json.loads((tmp_path / f"vote-rank{r}.json").read_text()) for r in range(3)]
    assert [r["world"] for r in ranks] == [3, 3, 3]
    assert [r["signum"] is not None for r in ranks] == [False, False, True]
    answers = ranks[0]["answers"]
    assert all(r["answers"] == answers for r in ranks), "every rank must stop at the same call"
    # The vote of the signalled call is read one call later, so no GPU waits for the host.
    assert answers == [False] * 4 + [True] * 3
    assert all(r["unsignalled"] == [False] * 7 for r in ranks)


@pytest.mark.gpu
def test_the_stop_vote_on_a_gpu_does_not_wait_for_the_step_queued_after_it():
    from types import SimpleNamespace

    from train.preemption import StopFlag

    # Two ranks as the flag sees them; the all-reduce of a one-rank sum is a copy.
    ranks = SimpleNamespace(num_processes=2, device=torch.device("cuda"), reduce=lambda t, reduction: t.clone())
    flag = StopFlag()
    assert not flag.any_rank_stopping(ranks)  # step 1's vote is queued
    torch.cuda._sleep(2_000_000_000)  # step 2's work: ~1 s of GPU clock cycles
    step_2_done = torch.cuda.Event()
    step_2_done.record()
    flag.signum = signal.SIGUSR1
    assert not flag.any_rank_stopping(ranks)  # reads step 1's vote
    assert not step_2_done.query(), "reading the previous vote waited for the step queued after it"
    assert flag.any_rank_stopping(ranks)  # step 2's vote carried the signal
    assert step_2_done.query()


def test_signal_to_a_single_process_run(mnist_root, tmp_path):
    out = tmp_path / "run"
    args = SIGNAL_RUN + [f"data.root={mnist_root}", f"output_dir={out}"]
    proc = subprocess.Popen([sys.executable, str(MAIN)] + args, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wait_for_metrics(out, proc, lines=1)
    proc.send_signal(signal.SIGUSR1)
    proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT and _status(out)["outcome"] == "preempted"


@pytest.mark.slow
def test_a_dead_rank_ends_the_job_in_bounded_time(mnist_root, tmp_path):
    out = tmp_path / "run"
    t0 = time.time()
    r = run_main(SIGNAL_RUN + [f"data.root={mnist_root}", f"output_dir={out}", "train.collective_timeout_s=20"],
                 launcher=accelerate_cpu(2), env={"DENOISE_FAULT": "after_step:5@1"}, timeout=120)
    assert r.returncode != 0 and time.time() - t0 < 90
    assert _status(out)["outcome"] != "completed"
