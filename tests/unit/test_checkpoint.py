"""Checkpoint bookkeeping that needs no run: which checkpoints pruning keeps."""

from __future__ import annotations

import json


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
