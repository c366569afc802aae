"""Checkpoints: `accelerator.save_state` plus our own progress counters, written atomically.

Layout: OUTPUT_DIR/checkpoints/step_00001234/ holding accelerate's files (model, optimizer,
scaler, per-rank RNG states) and `trainer_state.json`. Each is written into a temporary
folder that is renamed into place only after every rank has finished writing, so a folder
named step_* is always complete; a crash mid-write leaves only a `.tmp-*` folder, which the
next save removes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from accelerate import Accelerator

from train.errors import UserError

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"


class CheckpointError(UserError):
    """A checkpoint that cannot be resumed from."""


@dataclass
class TrainerState:
    """Progress that `save_state` does not keep. Noise and data order are functions of
    (seed, epoch, index), so (epoch, micro_step) is all it takes to continue exactly."""

    step: int = 0
    """optimizer steps done"""
    epoch: int = 0
    """epoch in progress (or about to start)"""
    micro_step: int = 0
    """micro-batches of `epoch` already trained on (always at an optimizer-step boundary)"""
    run_id: str = ""
    """wandb run id, so a resumed job logs into the same run"""
    compat: dict = dataclasses.field(default_factory=dict)
    """settings the saved state depends on; resuming with other values is refused"""


def _step_dirs(output_dir: Path) -> list[Path]:
    root = output_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name[5:]))


def has_checkpoints(output_dir: Path) -> bool:
    return bool(_step_dirs(output_dir))


def find_resume(output_dir: Path, resume: str) -> Path | None:
    """The checkpoint folder to resume from: auto = newest in output_dir (or none), none, or a path."""
    if resume == "none":
        return None
    if resume == "auto":
        dirs = _step_dirs(output_dir)
        return dirs[-1] if dirs else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(
            f"checkpoint.resume={resume} is not a checkpoint folder (no {STATE_FILE}): "
            f"give a folder like {output_dir / CHECKPOINTS}/step_00000100, or auto, or none"
        )
    return path


def save(accelerator: Accelerator, output_dir: Path, state: TrainerState, keep_last: int) -> Path:
    """Save on every rank (accelerate writes per-rank RNG files); main renames and prunes."""
    root = output_dir / CHECKPOINTS
    final = root / f"step_{state.step:08d}"
    tmp = root / f".tmp-step_{state.step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crash mid-save
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with (tmp / STATE_FILE).open("w") as f:
            json.dump(dataclasses.asdict(state), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        shutil.rmtree(final, ignore_errors=True)  # the same step saved again (e.g. after a resume)
        os.replace(tmp, final)
        for old in _step_dirs(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load(accelerator: Accelerator, path: Path, compat: dict) -> TrainerState:
    """Restore model, optimizer, scaler and RNG states from `path`; return our counters."""
    try:
        state = TrainerState(**json.loads((path / STATE_FILE).read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(
            f"checkpoint {path} is unreadable ({e}): delete it to fall back to an older one, or start afresh in a new output_dir"
        ) from e
    differing = sorted(k for k in compat.keys() | state.compat.keys() if compat.get(k) != state.compat.get(k))
    if differing:
        pairs = ", ".join(f"{k}: saved {state.compat.get(k)!r}, now {compat.get(k)!r}" for k in differing)
        raise CheckpointError(
            f"checkpoint {path} was made with other settings ({pairs}): restore them, "
            f"or start afresh in a new output_dir"
        )
    try:
        accelerator.load_state(str(path))
    except Exception as e:  # torch/safetensors raise many types for damaged files
        raise CheckpointError(
            f"checkpoint {path} could not be loaded ({type(e).__name__}: {e}): delete it to fall back to an "
            f"older one, or start afresh in a new output_dir"
        ) from e
    return state
