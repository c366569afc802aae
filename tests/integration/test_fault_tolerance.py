"""Crashes, preemption signals and damaged checkpoints: no work lost beyond the last
checkpoint, resumed runs end exactly where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import (FORWARD, MAIN, REPO, accelerate_cpu, error_lines, interruptible, load_weights, mnist_copy,
                      read_metrics, run_main, start_main, wait_for_metrics)

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
def straight(synthetic_mnist, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    _ok(run_main(RUN + [f"data.root={synthetic_mnist}", f"output_dir={out}"]))
    assert _status(out)["outcome"] == "completed"
    return out


@pytest.fixture(scope="module")
def killed(synthetic_mnist, tmp_path_factory):
    """`killed(fault, into)`: RUN SIGKILLed where DENOISE_FAULT=`fault` says, copied to `into`
    (each fault is run once per module)."""
    runs = {}

    def get(fault: str, into: Path) -> Path:
        if fault not in runs:
            out = tmp_path_factory.mktemp("killed") / "run"
            r = run_main(RUN + [f"data.root={synthetic_mnist}", f"output_dir={out}"], env={"DENOISE_FAULT": fault})
            assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
            runs[fault] = out
        shutil.copytree(runs[fault], into)
        return into

    return get


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
def test_sigkill_then_resume_ends_bit_identical(synthetic_mnist, tmp_path, straight, killed, fault, survivors):
    out = killed(fault, tmp_path / "run")
    args = RUN + [f"data.root={synthetic_mnist}", f"output_dir={out}"]
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == survivors
    assert _status(out)["outcome"] == "running"  # what a SIGKILLed job leaves: not "completed"
    _ok(run_main(args))
    _assert_same_as(out, straight)
    assert not list((out / "checkpoints").glob(".tmp-*")), "a half-written checkpoint is cleaned up"


def _truncate(newest: Path) -> None:  # as by a full disk
    opt = newest / "optimizer.bin"
    opt.write_bytes(opt.read_bytes()[: opt.stat().st_size // 2])


def _relist(newest: Path, manifest) -> None:  # a manifest edited, or planted, by hand
    (newest / "manifest.json").write_text(json.dumps(manifest))


def _link(newest: Path) -> None:  # its weights a link to another checkpoint's
    (newest / "model.safetensors").unlink()
    (newest / "model.safetensors").symlink_to(newest.parent / "step_00000020" / "model.safetensors")


@pytest.mark.parametrize("damage,problem", [
    (_truncate, "optimizer.bin does not match its checksum"),
    (lambda newest: _relist(newest, [1]), "manifest.json does not list the checkpoint's files by name"),
    (lambda newest: _relist(newest, {"../step_00000020/model.safetensors": {}}),
     "manifest.json does not list the checkpoint's files by name"),
    (_link, "model.safetensors is missing or not a plain file"),
], ids=["truncated", "manifest-not-a-mapping", "manifest-outside", "linked-file"])
def test_damaged_newest_checkpoint_is_reported_and_the_previous_one_used(synthetic_mnist, tmp_path, straight,
                                                                         killed, damage, problem):
    out = killed("after_step:30", tmp_path / "run")
    args = RUN + [f"data.root={synthetic_mnist}", f"output_dir={out}"]
    newest = out / "checkpoints" / "step_00000024"
    damage(newest)
    r = _ok(run_main(args))
    assert f"checkpoint {newest} is damaged ({problem}" in r.stdout
    assert "resuming from" in r.stdout and "step_00000020" in r.stdout
    _assert_same_as(out, straight)


def test_a_torn_metrics_tail_is_repaired_on_resume(synthetic_mnist, tmp_path, straight, killed):
    out = killed("after_step:13", tmp_path / "run")
    args = RUN + [f"data.root={synthetic_mnist}", f"output_dir={out}"]
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 12, "epoch": 0, "train/lo')  # the tail a kill or a full disk leaves mid-write
    r = _ok(run_main(args))
    assert "metrics.jsonl: dropped 1 damaged line(s) (34 bytes, written as the run was killed or the disk filled)" in r.stdout
    _assert_same_as(out, straight)


def test_a_new_run_in_a_killed_runs_folder_keeps_none_of_its_samples(synthetic_mnist, tmp_path, killed):
    out = killed("in_save:20", tmp_path / "run")  # evaluated at step 20, killed while saving it
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step_00000020.png"]
    shutil.rmtree(out / "checkpoints")  # to start afresh, with other settings: 10 steps in all
    (out / "samples" / "step_00000030.png").mkdir()  # not a PNG of ours: left alone, not a traceback
    _ok(run_main(RUN + [f"data.root={synthetic_mnist}", f"output_dir={out}", "data.train_samples=200",
                        "train.epochs=1"]))
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step_00000010.png", "step_00000030.png"]
    assert [m["step"] for m in read_metrics(out) if "eval/mse" in m] == [10]


def test_every_checkpoint_damaged_is_refused_and_nothing_is_deleted(synthetic_mnist, tmp_path, killed):
    out = killed("after_step:30", tmp_path / "run")
    args = RUN + [f"data.root={synthetic_mnist}", f"output_dir={out}"]
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


def test_explicit_damaged_checkpoint_is_an_error(synthetic_mnist, tmp_path, straight):
    ckpt = tmp_path / "copy"
    shutil.copytree(straight / "checkpoints" / "step_00000040", ckpt)
    (ckpt / "model.safetensors").write_bytes(b"garbage")
    r = run_main(RUN + [f"data.root={synthetic_mnist}", f"output_dir={tmp_path / 'out'}", f"checkpoint.resume={ckpt}"])
    assert r.returncode == 2 and "model.safetensors does not match its checksum" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_run_started_from_another_runs_checkpoint_resumes_its_own_and_is_a_run_of_its_own(synthetic_mnist,
                                                                                             tmp_path, straight):
    # A run started from another run's checkpoint, then preempted (or killed, then requeued with
    # the same arguments), continues from its own checkpoints, not from the one it started from:
    # it ends as the uninterrupted run does, with no repeated records and a wandb run of its own.
    start = straight / "checkpoints" / "step_00000024"
    branch = RUN + [f"data.root={synthetic_mnist}", "train.epochs=3", f"checkpoint.resume={start}"]
    whole = tmp_path / "whole"
    _ok(run_main(branch + [f"output_dir={whole}"]))
    assert read_metrics(whole)[0]["step"] > 24  # the run it started from keeps its own history
    out = tmp_path / "branch"
    r = run_main(branch + [f"output_dir={out}"], env={"DENOISE_FAULT": "after_step:50"})
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    r = _ok(run_main(branch + [f"output_dir={out}"]))
    assert f"resuming from {out / 'checkpoints' / 'step_00000048'} (step 48" in r.stdout
    _assert_same_as(out, whole)

    def run_id(run: Path) -> str:
        return json.loads((run / "checkpoints" / "step_00000060" / "trainer_state.json").read_text())["run_id"]

    started_from = json.loads((start / "trainer_state.json").read_text())["run_id"]
    assert run_id(out) != started_from and run_id(whole) != started_from


def test_a_run_started_from_another_runs_checkpoint_in_a_killed_runs_folder_keeps_none_of_its_history(
        synthetic_mnist, tmp_path, straight, killed):
    out = killed("after_step:6", tmp_path / "run")  # logged step 4, killed before its first checkpoint
    assert [m["step"] for m in read_metrics(out)] == [4] and not list((out / "checkpoints").glob("step_*"))
    start = straight / "checkpoints" / "step_00000024"
    _ok(run_main(RUN + [f"data.root={synthetic_mnist}", f"output_dir={out}", f"checkpoint.resume={start}"]))
    assert read_metrics(out)[0]["step"] > 24  # neither the killed run's lines nor the other run's
    assert _trajectory(out) == [t for t in _trajectory(straight) if t[0] > 24]


def test_resuming_with_settings_that_change_the_meaning_is_refused(synthetic_mnist, tmp_path, straight):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    base = RUN + [f"data.root={synthetic_mnist}", f"output_dir={out}", "train.epochs=3"]
    r = run_main(base + ["train.per_device_batch_size=10", "train.seed=4"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "global_micro_batch: saved 20, now 10" in r.stderr and "train.seed: saved 0, now 4" in r.stderr
    assert "resume with its settings (train.global_batch_size=20 train.seed=0)" in r.stderr
    # Nothing saved was touched, status.json included: it still records the finished run.
    # (run.lock names whoever holds the folder: the refused run did, for a moment.)
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "run.lock"}
    assert after == {p: b for p, b in before.items() if p.name != "run.lock"}
    assert _status(out)["outcome"] == "completed"
    # A harmless change (more epochs, other logging) continues the run.
    r = _ok(run_main(base + ["logging.every_n_steps=10"]))
    assert "resuming from" in r.stdout and read_metrics(out)[-1]["step"] == 60


def test_a_resume_with_other_training_noise_is_refused_and_other_evaluation_noise_is_not(synthetic_mnist, tmp_path,
                                                                                          straight):
    # The training noise is what the model learns to remove: another kind or level is another run.
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    base = RUN + [f"data.root={synthetic_mnist}", f"output_dir={out}", "train.epochs=3"]
    for change, now in [(["noise.factor=0.3"], "'gaussian 0.3'"), (["noise.kind=salt_pepper"], "'salt_pepper 0.5'"),
                        (["noise.train_factor_max=0.9"], "'gaussian 0-0.9 per sample'")]:
        r = run_main(base + change)
        [line] = error_lines(r.stderr)
        assert r.returncode == 2 and f"training_noise: saved 'gaussian 0.5', now {now}" in line, line
        assert "resume with its settings (noise.* as it trained: gaussian 0.5)" in line
    assert _status(out)["outcome"] == "completed"
    # A checkpoint written before the key existed resumes as before; the evaluation noise may change.
    newest = out / "checkpoints" / "step_00000040"
    compat = json.loads((newest / "trainer_state.json").read_text())["compat"]
    _edit_state(newest, compat={k: v for k, v in compat.items() if k != "training_noise"})
    r = _ok(run_main(base + ["noise.eval_seed=7"]))
    assert "resuming from" in r.stdout and read_metrics(out)[-1]["step"] == 60


def test_a_resume_on_other_training_data_is_refused_and_on_a_copy_of_it_is_not(synthetic_mnist, tmp_path, straight):
    # Another MNIST-format copy (Fashion-MNIST, a damaged or edited one) is other data, wherever it lies.
    other, same = mnist_copy(synthetic_mnist, tmp_path / "other", "train"), mnist_copy(synthetic_mnist, tmp_path / "same")
    out, old = tmp_path / "run", tmp_path / "old"
    shutil.copytree(straight, out)
    shutil.copytree(straight, old)
    base = RUN + [f"output_dir={out}", "train.epochs=3"]
    r = run_main(base + [f"data.root={other}"])
    [line] = error_lines(r.stderr)
    assert r.returncode == 2 and "data.fingerprint: saved" in line, line
    assert "resume with its settings (data.root at the MNIST copy it was trained on)" in line
    assert _status(out)["outcome"] == "completed"
    r = _ok(run_main(base + [f"data.root={same}"]))  # the same bytes elsewhere: the same data
    assert "resuming from" in r.stdout and read_metrics(out)[-1]["step"] == 60
    # A checkpoint written before the key existed resumes as before.
    newest = old / "checkpoints" / "step_00000040"
    compat = json.loads((newest / "trainer_state.json").read_text())["compat"]
    _edit_state(newest, compat={k: v for k, v in compat.items() if k != "data.fingerprint"})
    r = _ok(run_main(RUN + [f"output_dir={old}", "train.epochs=3", f"data.root={other}"]))
    assert "resuming from" in r.stdout and read_metrics(old)[-1]["step"] == 60


def test_a_changed_learning_rate_is_the_one_a_resumed_run_trains_at(synthetic_mnist, tmp_path, straight):
    # A constant schedule: the learning rate is not part of what a checkpoint means, so it may
    # change; the optimizer's saved state must not bring the old one back.
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    r = _ok(run_main(RUN + [f"data.root={synthetic_mnist}", f"output_dir={out}", "train.epochs=3", "train.lr=0.0001"]))
    assert "the optimizer runs this run's settings, not the checkpoint's: lr 0.001 -> 0.0001" in r.stdout
    assert "written by 1 process, now 1)" in r.stdout
    resumed = [m for m in read_metrics(out) if "train/lr" in m and m["step"] > 40]
    assert resumed and all(m["train/lr"] == 0.0001 for m in resumed)
    assert json.loads((out / "setup.json").read_text())["lr"] == 0.0001


def test_a_schedule_change_against_an_older_constant_run_says_what_the_checkpoint_had(synthetic_mnist, tmp_path,
                                                                                      straight):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    r = run_main(RUN + [f"data.root={synthetic_mnist}", f"output_dir={out}", "train.lr_schedule=cosine"])
    [line] = error_lines(r.stderr)
    assert r.returncode == 2 and "None" not in line, line
    assert "train.lr_schedule: saved: none (a constant learning rate), now 'cosine'" in line
    assert "resume with its settings (train.lr_schedule=constant train.warmup_steps=0)" in line


@pytest.mark.slow
@pytest.mark.parametrize("view", ["listing", "content"])
def test_every_rank_resumes_from_the_checkpoint_rank_0_chose_or_the_run_refuses(synthetic_mnist, tmp_path, straight,
                                                                                view):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    r = run_main(RUN + [f"data.root={synthetic_mnist}", f"output_dir={out}", "train.epochs=3",
                        "train.global_batch_size=20"], launcher=accelerate_cpu(2), env={"PROBE_VIEW": view},
                 script=REPO / "tests" / "probes" / "resume_view_probe.py")
    views = [(tmp_path / f"view-rank{rank}.txt").read_text() for rank in (0, 1)]
    newest = out / "checkpoints" / "step_00000040"
    if view == "listing":  # rank 1 sees no checkpoint, yet resumes from rank 0's choice
        _ok(r)
        assert views == [f"{newest} 40"] * 2 and read_metrics(out)[-1]["step"] == 60
        return
    assert r.returncode != 0 and views == [f"{newest} 40", f"{newest} 36"]
    [line] = error_lines(r.stderr)
    assert line == (f"error: the ranks read different progress from {newest} (rank 0: step 40, rank 1: step 36): "
                    f"output_dir must be on a filesystem that every node shares and sees alike; nothing was trained "
                    f"or changed")
    assert _status(out)["outcome"] == "completed"  # the refused run left the finished run's record


def _edit_state(ckpt: Path, fields: dict | list | None = None, **changes) -> None:
    """Change trainer_state.json (its `changes`, or all of it to `fields` when given) and make
    its checksum match again: edited, yet 'intact'."""
    import hashlib

    state = json.loads((ckpt / "trainer_state.json").read_text())
    data = json.dumps({**state, **changes} if fields is None else fields).encode()
    (ckpt / "trainer_state.json").write_bytes(data)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["trainer_state.json"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("fields", [{"micro_step": 500}, {"epoch": 7}, {"step": -5}, {"micro_step": 3},
                                    {"step": "40"}, {"metrics_lines": True}, ([{"step": 40}],), ({},)],
                         ids=["past the epoch's end", "epoch past the end", "negative step", "step off its position",
                              "a string", "a bool", "a list", "an empty mapping"])
def test_a_checkpoint_with_an_impossible_position_is_refused(synthetic_mnist, tmp_path, straight, fields):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    ckpt = out / "checkpoints" / "step_00000040"
    _edit_state(ckpt, fields[0]) if isinstance(fields, tuple) else _edit_state(ckpt, **fields)  # (a whole file,)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "run.lock"}
    r = run_main(RUN + [f"data.root={synthetic_mnist}", f"output_dir={out}", "train.epochs=3"], timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    [line] = error_lines(r.stderr)
    assert "step_00000040" in line and ("impossible position" in line or "unreadable trainer_state.json" in line)
    assert line.endswith("delete it to fall back to an older one, or start afresh in a new output_dir"), line
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "run.lock"} == before


def test_another_runs_checkpoint_that_cannot_be_resumed_is_refused_without_advice_to_delete_it(synthetic_mnist,
                                                                                               tmp_path, straight):
    other = tmp_path / "other"
    shutil.copytree(straight, other)
    ckpt = other / "checkpoints" / "step_00000040"
    _edit_state(ckpt, micro_step=3)
    before = {p: p.read_bytes() for p in other.rglob("*") if p.is_file()}
    r = run_main(RUN + [f"data.root={synthetic_mnist}", f"output_dir={tmp_path / 'run'}", "train.epochs=3",
                        f"checkpoint.resume={ckpt}"])
    [line] = error_lines(r.stderr)
    assert r.returncode == 2 and "impossible position" in line and "delete" not in line, line
    assert line.endswith("it is another run's: leave it, and give checkpoint.resume another checkpoint, or start "
                         "afresh"), line
    assert {p: p.read_bytes() for p in other.rglob("*") if p.is_file()} == before


def test_a_kill_while_a_step_is_saved_again_keeps_its_checkpoint_and_its_one_evaluation(synthetic_mnist, tmp_path,
                                                                                      straight):
    # every_n_steps=20 saves step 20 inside the epoch; the epoch's end evaluates and saves step 20
    # again. A kill between setting the old copy aside and putting the new one in place:
    out = tmp_path / "run"
    args = RUN + [f"data.root={synthetic_mnist}", f"output_dir={out}", "checkpoint.every_n_steps=20"]
    r = run_main(args, env={"DENOISE_FAULT": "in_resave:20"})
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert [m["step"] for m in read_metrics(out) if "eval/mse" in m] == [20]  # logged before the kill
    assert not (out / "checkpoints" / "step_00000020").exists()
    r = _ok(run_main(args))
    assert "restored" in r.stdout and "resuming from" in r.stdout and "step_00000020" in r.stdout
    _assert_same_as(out, straight)  # no duplicated evaluation line, the same weights
    assert not list((out / "checkpoints").glob(".old-*"))


def test_a_finished_run_continues_with_more_epochs_to_the_same_weights(synthetic_mnist, tmp_path, straight):
    out = tmp_path / "run"
    args = RUN + [f"data.root={synthetic_mnist}", f"output_dir={out}"]
    _ok(run_main(args + ["train.epochs=1"]))
    r = _ok(run_main(args))  # RUN's 2 epochs: resumes (checkpoint.resume=auto) and trains the second
    assert "resuming from" in r.stdout and "step_00000020" in r.stdout
    _assert_same_as(out, straight)


def test_checkpoint_of_another_model_is_refused(synthetic_mnist, tmp_path, straight):
    import hashlib

    from safetensors.torch import save_file

    out = tmp_path / "run"
    shutil.copytree(straight, out)
    ckpt = out / "checkpoints" / "step_00000040"
    # Another architecture's weights, in a checkpoint that is otherwise intact.
    save_file({"layers.0.weight": torch.zeros(4, 4)}, str(ckpt / "model.safetensors"))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    data = (ckpt / "model.safetensors").read_bytes()
    manifest["model.safetensors"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    r = run_main(RUN + [f"data.root={synthetic_mnist}", f"output_dir={out}", "train.epochs=3"])
    assert r.returncode == 2 and error_lines(r.stderr) == [r.stderr.strip()], r.stderr[-2000:]
    assert f"checkpoint {ckpt} could not be loaded" in r.stderr and "new output_dir" in r.stderr


def test_a_finished_run_started_again_does_nothing(synthetic_mnist, tmp_path, straight):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    r = _ok(run_main(RUN + [f"data.root={synthetic_mnist}", f"output_dir={out}"]))
    assert "nothing to do" in r.stdout
    assert _trajectory(out) == _trajectory(straight)


# INTERRUPTIBLE on 2 and 4 ranks. SIGINT to the launcher alone, which forwards it; SIGTERM to
# every process of the job at once, three times in 20 ms, as scancel and Kubernetes send it.
# SIGUSR1 through a launcher is tested with launch/ (test_launch.py) and SLURM (test_slurm.py).
@pytest.mark.slow
@pytest.mark.parametrize("signame,nproc,whole_group", [("SIGTERM", 2, True), ("SIGINT", 4, False)])
def test_a_stop_signal_checkpoints_every_rank_at_one_step_and_resumes_exactly(synthetic_mnist, tmp_path,
                                                                              uninterrupted, signame, nproc,
                                                                              whole_group):
    out = tmp_path / "run"
    cmd = accelerate_cpu(nproc) + [str(MAIN)] + interruptible(synthetic_mnist, out, nproc)
    env = {**os.environ, "OMP_NUM_THREADS": "1", **FORWARD}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=whole_group)
    wait_for_metrics(out, proc, lines=2)
    for _ in range(3 if whole_group else 1):
        if whole_group:
            os.killpg(proc.pid, getattr(signal, signame))
            time.sleep(0.01)
        else:
            proc.send_signal(getattr(signal, signame))
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0  # the launcher reports 1 for any child status...
    status = _status(out)  # ...so the outcome is read from status.json
    assert status["outcome"] == "preempted" and status["exit_code"] == PREEMPTED_EXIT, status
    stopped = status["step"]
    assert 0 < stopped < 100 and f"stopped by {signame} at step {stopped}" in stderr
    assert [p.name for p in (out / "checkpoints").glob("step_*")] == [f"step_{stopped:08d}"]

    resumed = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and _status(out)["outcome"] == "completed"
    lines = read_metrics(out)
    steps = [m["step"] for m in lines if "train/loss" in m]
    assert steps == sorted(set(steps)) and steps[-1] == 100 and lines[-1]["step"] == 100

    # The same run without interruption, on as many processes, ends with the same weights.
    a, b = load_weights(out), uninterrupted(nproc)
    assert all(torch.equal(a[k], b[k]) for k in a), "a resume must be bit-exact on the same processes"


@pytest.mark.slow
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
    # The signalled call's vote already carries it: every rank stops there.
    assert answers == [False] * 3 + [True] * 4
    assert all(r["unsignalled"] == [False] * 7 for r in ranks)


def test_signal_to_a_single_process_run(synthetic_mnist, tmp_path):
    out = tmp_path / "run"
    proc = start_main(interruptible(synthetic_mnist, out, 1) + ["train.epochs=10"])  # 1,000 steps: one process is quick
    wait_for_metrics(out, proc, lines=1)
    proc.send_signal(signal.SIGUSR1)
    proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT and _status(out)["outcome"] == "preempted"


def test_a_stopped_run_that_asked_for_no_resume_names_the_command_that_resumes_it(synthetic_mnist, tmp_path):
    # checkpoint.resume=none refuses a folder with checkpoints, its own included: the same
    # command would not resume it, so the stop says which does, and that one does.
    out = tmp_path / "run"
    args = interruptible(synthetic_mnist, out, 1) + ["train.epochs=10"]
    proc = start_main(args + ["checkpoint.resume=none"])
    wait_for_metrics(out, proc, lines=1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT
    assert _status(out)["message"].endswith("resume with the same command and checkpoint.resume=auto"), err
    assert run_main(args + ["checkpoint.resume=none"]).returncode == 2
    r = _ok(run_main(args + ["checkpoint.resume=none", "checkpoint.resume=auto"]))
    assert f"resuming from {out / 'checkpoints'}" in r.stdout
