"""Checkpoints: `accelerator.save_state` plus our own progress counters, written atomically.

Layout: OUTPUT_DIR/checkpoints/step_00001234/ holding accelerate's files (model, optimizer,
scaler, per-rank RNG states), `trainer_state.json` and `manifest.json` (size and SHA-256 of
every other file). Each is written into a temporary folder that is renamed into place only
after every rank has finished writing, so a crash mid-write leaves only a `.tmp-*` folder
(removed when the next run starts, or by the next save). A folder damaged later (disk full,
truncated copy) fails its manifest check; `resume=auto` then reports it and takes the
previous good checkpoint, and refuses to start when every checkpoint is damaged. Pruning
keeps the newest `keep_last` intact checkpoints and never deletes one for a damaged one.
Checkpoints live on a filesystem all ranks share (as `output_dir` does on a cluster).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from accelerate import Accelerator

from train.errors import UserError, brief
from train.faults import fault_point
from train.rundir import WEIGHTS, chunks_of, read_own, usual_mode

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"


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
    world_size: int = 0
    """processes that wrote the checkpoint (for the log: any number may resume it); 0 = unknown"""
    compat: dict = dataclasses.field(default_factory=dict)
    """settings the saved state depends on; resuming with other values is refused"""
    metrics_lines: int = -1
    """records in metrics.jsonl when this was saved: a resume keeps those and drops what came
    after (-1: not recorded by older versions; the metrics up to `step` are kept)"""


def _check_state(state: dict, path: Path, fix: str) -> TrainerState:
    """A TrainerState from a checkpoint's JSON, each field of its own type (checksums only say
    the file is the one that was saved, not that what was saved is sane)."""
    fields = {f.name: f for f in dataclasses.fields(TrainerState)}
    state = state if isinstance(state, dict) else {}
    unknown = sorted(set(state) - set(fields))
    wrong = [name for name, value in state.items() if name in fields and not (
        isinstance(value, dict) if name == "compat" else isinstance(value, str) if name == "run_id"
        else isinstance(value, int) and not isinstance(value, bool))]
    if not state or unknown or wrong:
        bad = unknown[:1] or wrong[:1] or ["not a mapping of its fields"]
        raise CheckpointError(f"checkpoint {path} has an unreadable {STATE_FILE} ({bad[0]}): {fix}")
    return TrainerState(**state)


def _step_dirs(output_dir: Path) -> list[Path]:
    root = output_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name[5:]))


def remove_unfinished(output_dir: Path) -> list[str]:
    """Delete the `.tmp-*` folders of saves that never finished (a crash, a full disk), and put
    back a checkpoint that a save of the same step had set aside (`.old-*`) when that save never
    took its place. Only while holding the run lock: another run's save in progress looks the same."""
    root = output_dir / CHECKPOINTS
    notes = []
    for path in sorted(root.glob(".old-step_*")) if root.is_dir() else []:
        final = root / path.name.removeprefix(".old-")
        if final.exists() or path.is_symlink() or not path.is_dir():
            _discard(path)
        else:
            os.replace(path, final)
            notes.append(f"restored {final}, which a save of the same step had set aside before it was killed")
    leftovers = sorted(root.glob(".tmp-step_*")) if root.is_dir() else []
    for path in leftovers:
        _discard(path)
    return notes + [f"removed {path}, a checkpoint whose writing never finished" for path in leftovers]


def _discard(path: Path) -> None:
    """Delete a checkpoint folder, or what was put in its place: a link is removed, never followed
    (a save into a planted link would write over the files where it points)."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _file_digest(path: Path) -> dict:
    """Size and SHA-256 of a plain file (never through a link), read in pieces: memory stays bounded."""
    sha, size = hashlib.sha256(), 0
    for piece in chunks_of(path):
        sha.update(piece)
        size += len(piece)
    return {"bytes": size, "sha256": sha.hexdigest()}


def verify(path: Path) -> str | None:
    """None if the checkpoint folder is complete and intact, else what is wrong with it."""
    try:
        manifest = json.loads(read_own(path / MANIFEST))
    except (OSError, ValueError) as e:
        return f"no readable {MANIFEST} ({getattr(e, 'strerror', None) or type(e).__name__})"
    # save() lists the checkpoint's own files by name: anything else was not written by it.
    if not isinstance(manifest, dict) or not all(isinstance(n, str) and "/" not in n and n.strip(".") for n in manifest):
        return f"{MANIFEST} does not list the checkpoint's files by name"
    for name, expected in manifest.items():
        try:
            digest = _file_digest(path / name)
        except OSError:
            return f"{name} is missing or not a plain file"
        if digest != expected:
            return f"{name} does not match its checksum (truncated or overwritten)"
    return None


def find_resume(output_dir: Path, resume: str, warn=print) -> Path | None:
    """The checkpoint to resume from: the newest intact one in output_dir (damaged newer ones
    are reported through `warn` and skipped); none; or a checkpoint folder, which only starts
    the run: once output_dir holds an intact checkpoint of its own, the run continues from the
    newest of those, so that the same command resumes a preempted run instead of starting it
    again from that folder."""
    if resume == "none":
        return None
    damaged = []
    for path in reversed(_step_dirs(output_dir)):
        problem = verify(path)
        if problem is None:
            _INTACT.add(path)
            if resume != "auto" and Path(resume).resolve() != path.resolve():
                warn(f"resuming from {path}, the newest checkpoint in {output_dir}, not checkpoint.resume={resume}: "
                     f"a checkpoint.resume folder only starts a run; to start again from it, give a new output_dir")
            return path
        warn(f"checkpoint {path} is damaged ({problem}); falling back to the one before it")
        damaged.append(f"{path.name}: {problem}")
    if resume == "auto":
        if damaged:  # starting afresh would bury the run's work under new checkpoints
            raise CheckpointError(
                f"every checkpoint in {output_dir / CHECKPOINTS} is damaged ({'; '.join(damaged)}): restore one "
                f"from a backup, give an intact copy as checkpoint.resume=PATH, or start afresh in a new output_dir; "
                f"nothing was deleted"
            )
        return None
    path = Path(resume)
    if not ((path / MANIFEST).exists() or (path / STATE_FILE).exists()):
        raise CheckpointError(
            f"checkpoint.resume={resume} is not a checkpoint folder: give a folder like "
            f"{output_dir / CHECKPOINTS}/step_00000100, or auto, or none"
        )
    problem = verify(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} is damaged ({problem}): pick another one, or checkpoint.resume=auto")
    return path


def is_own(output_dir: Path, path: Path) -> bool:
    """Whether checkpoint `path` is one of output_dir's own (else a run is started from it:
    a new wandb run, and metrics.jsonl holds none of its history)."""
    return path.resolve().parent == (output_dir / CHECKPOINTS).resolve()


def remedy(own: bool) -> str:
    """What a refusal of a checkpoint that cannot be resumed advises: one of the run's own may
    go, so that the run falls back to the one before it; another run's is not ours to delete."""
    if own:
        return "delete it to fall back to an older one, or start afresh in a new output_dir"
    return "it is another run's: leave it, and give checkpoint.resume another checkpoint, or start afresh"


def save(accelerator: Accelerator, output_dir: Path, state: TrainerState, keep_last: int) -> Path:
    """Save on every rank (accelerate writes per-rank RNG files); main renames and prunes."""
    root = output_dir / CHECKPOINTS
    final = root / f"step_{state.step:08d}"
    tmp = root / f".tmp-step_{state.step:08d}"
    if accelerator.is_main_process:
        _discard(tmp)  # leftovers of a crash mid-save
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    fault_point("in_save", state.step, accelerator.process_index)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for weights in tmp.glob("*.safetensors"):
            usual_mode(weights)
        (tmp / STATE_FILE).write_text(json.dumps(dataclasses.asdict(state), indent=1))
        manifest = {p.name: _file_digest(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        old = root / f".old-{final.name}"
        if final.exists():  # the same step saved again (a stop at an epoch's end, then its evaluation)
            _discard(old)
            os.replace(final, old)  # set aside, not deleted, until the new one is in its place
            fault_point("in_resave", state.step, accelerator.process_index)
        os.replace(tmp, final)
        _INTACT.add(final)
        _discard(old)
        for old in _prunable(output_dir, keep_last):
            _discard(old)
    accelerator.wait_for_everyone()
    return final


def save_weights(accelerator: Accelerator, model, output_dir: Path) -> Path:
    """OUTPUT_DIR/model.safetensors: the trained weights, written by the main process."""
    accelerator.save_model(model, str(output_dir))
    if accelerator.is_main_process:
        usual_mode(output_dir / WEIGHTS)
    return output_dir / WEIGHTS


_INTACT: set[Path] = set()  # checkpoints this process saved or verified: never hashed again


def _prunable(output_dir: Path, keep_last: int) -> list[Path]:
    """Checkpoints older than the newest `keep_last` intact ones (damaged or not): a damaged
    checkpoint never counts towards `keep_last`, and nothing newer than those is deleted.
    Each checkpoint is hashed once per process: those saved by this run are known intact."""
    intact = []
    for path in reversed(_step_dirs(output_dir)):
        if len(intact) == keep_last:
            break
        if path in _INTACT or verify(path) is None:
            _INTACT.add(path)
            intact.append(path)
    if len(intact) < keep_last:
        return []
    oldest_kept = int(intact[-1].name[5:])
    return [p for p in _step_dirs(output_dir) if int(p.name[5:]) < oldest_kept]


def compat_of(cfg, plan, mixed_precision: str, train_split) -> dict[str, object]:
    """What a checkpoint must share with this run to resume it: the weights' shapes, the
    global micro-batch (which fixes the data order) and the accumulation (which groups it
    into optimizer steps), the seed, the data and its training noise, the precision, and
    where the learning rate depends on the step, its schedule. (`cfg`: the run's Config;
    `plan`: its BatchPlan; `train_split`: its training data, whose fingerprint counts.)"""
    pictures = getattr(train_split, "pictures", None)  # data.dataset=images
    tc = cfg.train
    # The forward passes of a step: exact reduction fixes each one's images on any world size.
    batches = ({"train.exact_reduction": True, "train.per_device_batch_size": plan.per_device_batch_size,
                "train.global_batch_size": plan.global_batch} if tc.exact_reduction else
               {"global_micro_batch": plan.global_micro_batch, "train.gradient_accumulation_steps": plan.accumulation})
    compat = {
        "model.name": cfg.model.name,
        **({"model.settings": cfg.model.settings()} if cfg.model.settings() else {}),  # they set the weights' shapes
        **batches,
        "train.seed": tc.seed,
        "data.train_samples": cfg.data.train_samples,
        "data.fingerprint": pictures.fingerprint if pictures is not None else train_split.fingerprint,
        "training_noise": cfg.noise.train_spec().describe(),  # what the model learns to remove
        "mixed_precision": mixed_precision,
    }
    if pictures is not None:  # which patches an epoch's samples are, and what the model takes
        dc = cfg.data
        compat.update({"data.dataset": "images", "data.channels": pictures.channels, "data.patch_size": dc.patch_size,
                       "data.patches_per_image": dc.patches_per_image})
    if tc.lr_schedule != "constant" or tc.warmup_steps:  # the learning rate of each step depends on these
        compat.update({"train.lr_schedule": tc.lr_schedule, "train.warmup_steps": tc.warmup_steps,
                       "train.epochs": tc.epochs, "train.max_steps": tc.max_steps})
    return compat


def choose_resume(output_dir: Path, resume: str) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume from (for the main process to choose: see
    distributed.decided_on_main), and notes: the unfinished saves it first cleared away (the
    main process holds the run lock by now) and the damaged checkpoints skipped. Refuses
    checkpoint.resume=none where it would overwrite another run's checkpoints, and a new run
    where a finished one's outputs are (model.safetensors) and no checkpoint of its own to go on from."""
    try:
        notes = remove_unfinished(output_dir)
    except OSError as e:
        raise CheckpointError(f"cannot clear away an unfinished save in {output_dir / CHECKPOINTS} ({e.strerror}): "
                              f"make the folder writable, then run the same command") from None
    path = find_resume(output_dir, resume, warn=notes.append)
    if path is None and resume == "none" and _step_dirs(output_dir):
        raise CheckpointError(
            f"output_dir {output_dir} already holds checkpoints (of an earlier run, or of this one before it "
            f"stopped) and checkpoint.resume=none would overwrite them: set checkpoint.resume=auto to continue "
            f"from them, or choose a new output_dir"
        )
    if (path is None or not is_own(output_dir, path)) and os.path.lexists(output_dir / WEIGHTS):
        raise CheckpointError(  # its checkpoints deleted to save space, say: the outputs are still the run's
            f"output_dir {output_dir} holds a finished run ({WEIGHTS}, its metrics and samples) and no checkpoint of "
            f"its own to continue from: a new run would overwrite them; choose a new output_dir, nothing was changed"
        )
    return path, notes


def _differs(saved: object, now: object, default: object) -> bool:
    """Whether a compat value changed. In a mapping of settings (`default` gives their
    defaults) a key missing on one side stands for its default: a setting added after a
    checkpoint was saved leaves that checkpoint resumable as long as the setting keeps it."""
    if isinstance(saved, dict) and isinstance(now, dict) and isinstance(default, dict):
        return any(saved.get(k, default.get(k)) != now.get(k, default.get(k)) for k in saved.keys() | now.keys())
    return saved != now


def _restoring_overrides(keys: list[str], saved: dict, num_processes: int) -> list[str]:
    """The overrides that give back the saved values of `keys`, where one config key does it."""
    fixes = []
    for key in keys:
        value = saved.get(key)
        if key == "global_micro_batch" and isinstance(value, int):
            accumulation = saved.get("train.gradient_accumulation_steps", 1)
            fixes.append(f"train.global_batch_size={value * accumulation}")  # on any world size that divides it
        elif key == "mixed_precision":
            fixes.append(f"train.mixed_precision={value}")
        elif key == "data.fingerprint":
            fixes.append("the training pictures it was trained on back in data.train_dir" if "data.dataset" in saved
                         else "data.root at the MNIST copy it was trained on")
        elif key == "training_noise":
            fixes.append(f"noise.* as it trained: {value}")
        elif "." in key and isinstance(value, (int, float, str)):
            fixes.append(f"{key}={value}")
    return fixes


# What the compat keys of a learning-rate schedule are when a run has none: a checkpoint of a
# constant-rate run records none of them (its steps did not depend on them).
_NO_SCHEDULE = {"train.lr_schedule": "constant", "train.warmup_steps": 0}


_SCHEDULE_KEYS = (*_NO_SCHEDULE, "train.epochs", "train.max_steps")

# Compat keys that checkpoints written before them do not hold: compared only where recorded,
# so such a checkpoint still resumes.
_RECORDED_SINCE = ("training_noise", "data.fingerprint")


def _shown(compat: dict, key: str, side: str) -> str:
    """One side of a changed compat key, for the refusal."""
    if key in compat:
        return f"{side} {compat[key]!r}"
    if key in _SCHEDULE_KEYS:
        return f"{side}: none (a constant learning rate)"
    return f"{side}: not recorded (the checkpoint predates the key)" if side == "saved" else f"{side}: not used"


def load(accelerator: Accelerator, path: Path, compat: dict, optimizer, defaults: dict | None = None,
         notes: list[str] | None = None, fix: str = "") -> TrainerState:
    """Restore model, optimizer, scaler and RNG states from `path`; return our counters.
    `defaults` holds, per compat key whose value is a mapping of settings, their defaults.
    `optimizer` keeps this run's hyperparameters (lr, betas, eps, weight decay, capturable):
    the saved state brings back the saved ones, which the run's config and log would not show;
    each one that changed is reported in `notes`. `fix`: what a refusal advises (remedy())."""
    fix = fix or remedy(own=True)
    try:
        state = _check_state(json.loads(read_own(path / STATE_FILE)), path, fix)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is unreadable ({brief(e)}): {fix}") from e
    defaults = defaults or {}
    compared = [k for k in compat.keys() | state.compat.keys() if k in state.compat or k not in _RECORDED_SINCE]
    differing = sorted(k for k in compared if _differs(state.compat.get(k), compat.get(k), defaults.get(k)))
    if differing:
        pairs = ", ".join(f"{k}: {_shown(state.compat, k, 'saved')}, {_shown(compat, k, 'now')}" for k in differing)
        saved = {**{k: v for k, v in _NO_SCHEDULE.items() if k not in state.compat}, **state.compat}
        fixes = " ".join(_restoring_overrides(differing, saved, accelerator.num_processes))
        raise CheckpointError(
            f"checkpoint {path} was made with other settings ({pairs}): resume with its settings"
            f"{f' ({fixes})' if fixes else ''}, or start afresh in a new output_dir"
        )
    ours = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    try:
        accelerator.load_state(str(path))
    except Exception as e:  # torch/safetensors raise many types for damaged files
        raise CheckpointError(f"checkpoint {path} could not be loaded ({brief(e)}): {fix}") from e
    for group, settings in zip(optimizer.param_groups, ours):
        changed = sorted(k for k, v in settings.items() if group.get(k) != v)
        if changed and notes is not None and group is optimizer.param_groups[0]:
            notes.append("the optimizer runs this run's settings, not the checkpoint's: " + ", ".join(
                f"{k} {group.get(k)!r} -> {settings[k]!r}" for k in changed))
        group.update(settings)
    return state


def check_same_state(accelerator: Accelerator, state: TrainerState, path: Path) -> None:
    """Refuse, on every rank, when the ranks loaded different progress from `path` (a node that
    sees another version of the folder: output_dir must be one filesystem every node shares)."""
    if accelerator.num_processes == 1:
        return
    import torch

    mine = torch.tensor([state.step, state.epoch, state.micro_step], dtype=torch.int64, device=accelerator.device)
    every = accelerator.gather(mine).view(accelerator.num_processes, 3).tolist()
    if any(row != every[0] for row in every):
        steps = ", ".join(f"rank {rank}: step {row[0]}" for rank, row in enumerate(every))
        raise CheckpointError(f"the ranks read different progress from {path} ({steps}): output_dir must be on a "
                              f"filesystem that every node shares and sees alike; nothing was trained or changed")
