"""Checkpoint bookkeeping that needs no run: which checkpoints pruning keeps."""

from __future__ import annotations

import json
from pathlib import Path


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


def test_a_checkpoint_resume_folder_only_starts_a_run(tmp_path):
    """checkpoint.resume=PATH is where a run starts; once output_dir has an intact checkpoint
    of its own, the run continues from it (the same command resumes it), whatever PATH is now."""
    from train.checkpoint import MANIFEST, _file_digest, find_resume

    def checkpoint(path: Path, damaged: bool = False) -> Path:
        path.mkdir(parents=True)
        (path / "model.safetensors").write_bytes(b"weights")
        (path / MANIFEST).write_text(json.dumps({"model.safetensors": _file_digest(path / "model.safetensors")}))
        if damaged:
            (path / "model.safetensors").write_bytes(b"torn")
        return path

    start, out = checkpoint(tmp_path / "other" / "step_00000010"), tmp_path / "out"
    assert find_resume(out, str(start)) == start  # nothing of its own yet
    damaged = checkpoint(out / "checkpoints" / "step_00000020", damaged=True)
    notes = []
    assert find_resume(out, str(start), warn=notes.append) == start  # nothing intact of its own
    assert len(notes) == 1 and str(damaged) in notes[0]
    own = checkpoint(out / "checkpoints" / "step_00000012")
    notes.clear()
    assert find_resume(out, str(start), warn=notes.append) == own
    assert str(own) in notes[-1] and f"not checkpoint.resume={start}" in notes[-1]
    assert find_resume(out, str(tmp_path / "gone")) == own  # the folder it started from may be gone by now
    notes.clear()
    assert find_resume(out, str(own), warn=notes.append) == own and len(notes) == 1  # the damaged newer one only


def test_a_resumed_optimizer_runs_this_runs_settings_not_the_checkpoints(tmp_path):
    """Every hyperparameter a checkpoint's optimizer state carries comes back as the run set it."""
    import torch
    from accelerate import Accelerator

    from train import checkpoint

    acc = Accelerator(cpu=True)

    def optimizer(**settings) -> torch.optim.Optimizer:
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        opt = torch.optim.Adam(model.parameters(), fused=True, **settings)
        model(torch.ones(4, 3)).sum().backward()
        opt.step()
        return acc.prepare(model, opt)[1]

    saved = {"lr": 0.1, "betas": (0.5, 0.6), "eps": 1e-3, "weight_decay": 0.2, "capturable": False}
    ours = {"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "capturable": True}
    optimizer(**saved)
    state = checkpoint.TrainerState(step=1, micro_step=1)
    path = checkpoint.save(acc, tmp_path, state, keep_last=1)
    acc._models.clear()  # a new run's accelerator holds only its own model and optimizer
    acc._optimizers.clear()
    opt = optimizer(**ours)
    notes = []
    loaded = checkpoint.load(acc, path, state.compat, opt, notes=notes)
    assert loaded.step == 1
    group = opt.param_groups[0]
    assert {k: group[k] for k in ours} == ours
    assert opt.state_dict()["state"][0]["exp_avg"].abs().sum() > 0  # the moments did come from the checkpoint
    assert notes and "lr 0.1 -> 0.0001" in notes[0] and "capturable False -> True" in notes[0]


def test_saving_hashes_no_checkpoint_again(tmp_path, monkeypatch):
    """Checksums are for resuming: a save trusts what this process saved or verified, so the
    cost of a save does not grow with the checkpoints kept."""
    import torch
    from accelerate import Accelerator

    from train import checkpoint

    acc = Accelerator(cpu=True)
    acc.prepare(torch.nn.Linear(3, 2))
    hashed = []
    real = checkpoint._file_digest
    monkeypatch.setattr(checkpoint, "_file_digest", lambda p: hashed.append(p.parent.name) or real(p))
    for step in range(1, 6):
        hashed.clear()
        checkpoint.save(acc, tmp_path, checkpoint.TrainerState(step=step), keep_last=3)
        assert set(hashed) == {f".tmp-step_{step:08d}"}  # the manifest of the new one, nothing else
    assert [p.name for p in checkpoint._step_dirs(tmp_path)] == [f"step_0000000{s}" for s in (3, 4, 5)]
    checkpoint._INTACT.clear()  # a new process: it verifies the ones it resumes from
    hashed.clear()
    assert checkpoint.find_resume(tmp_path, "auto") == tmp_path / "checkpoints" / "step_00000005"
    assert set(hashed) == {"step_00000005"}


def test_weights_whose_filesystem_refuses_chmod_are_kept_as_written(tmp_path, monkeypatch):
    # SMB and some FUSE mounts keep permissions of their own: the run must not fail at its end.
    import os

    from train import rundir

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights")
    weights.chmod(0o600)

    def refused(path, mode):
        raise PermissionError(1, "Operation not permitted", str(path))

    monkeypatch.setattr(os, "chmod", refused)
    rundir.usual_mode(weights)
    monkeypatch.undo()
    assert weights.read_bytes() == b"weights" and weights.stat().st_mode & 0o777 == 0o600
