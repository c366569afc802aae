"""One wandb run for one training run, however many times it was requeued.

Each requeue of an offline run writes another segment (OUTPUT_DIR/wandb/offline-run-*) under
the same run id, and syncing the segments one by one can lose some of them (wandb#3841).
metrics.jsonl is the gap-free record of the whole run (a resume trims it to its checkpoint),
so this rebuilds the run from it: one offline run, the checkpoint's run id, the resolved config
and setup, every metrics line and samples image at its step. Upload that one instead of the segments:

    python slurm/wandb_rebuild.py OUTPUT_DIR    # writes OUTPUT_DIR/wandb-rebuilt/; prints the sync command
    wandb sync OUTPUT_DIR/wandb-rebuilt/wandb/offline-run-*

Not carried over: system metrics (CPU, GPU and memory use over time).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: train.*

from train.config import read_yaml  # noqa: E402
from train.errors import UserError, counted  # noqa: E402
from train.tracking import METRICS_FILE, SAMPLES_KEY  # noqa: E402

REBUILT = "wandb-rebuilt"


def run_id_of(output_dir: Path) -> str:
    """The wandb run id the run's newest checkpoint holds."""
    from train.checkpoint import CHECKPOINTS, STATE_FILE

    states = sorted((output_dir / CHECKPOINTS).glob(f"step_*/{STATE_FILE}"))
    for state in reversed(states):
        try:
            saved = json.loads(state.read_text())
        except (OSError, ValueError):
            continue  # a damaged checkpoint: the one before it has the same id
        run_id = saved.get("run_id") if isinstance(saved, dict) else None
        if isinstance(run_id, str) and run_id:
            return run_id
    raise UserError(f"no checkpoint in {output_dir / CHECKPOINTS} holds a wandb run id: is {output_dir} a run's output_dir?")


def rebuild(output_dir: Path) -> tuple[Path, str, int]:
    """Write the run as one offline wandb run; returns (its folder, its id, the metrics lines logged)."""
    metrics_path = output_dir / METRICS_FILE
    if not metrics_path.is_file():
        raise UserError(f"{metrics_path} not found: give the output_dir of a run that has logged metrics")
    run_id = run_id_of(output_dir)
    config = read_yaml(output_dir / "config.yaml", f"{output_dir / 'config.yaml'}")
    if not isinstance(config, dict) or not isinstance(config.get("logging"), dict):
        raise UserError(f"{output_dir / 'config.yaml'} is not the resolved config a run writes: give a run's output_dir")
    setup_path = output_dir / "setup.json"
    try:
        config["setup"] = json.loads(setup_path.read_text()) if setup_path.exists() else {}
    except (OSError, ValueError):
        config["setup"] = {}  # torn or unreadable: the run's settings are in config.yaml
    lines = []
    for line in metrics_path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a torn last line: the next resume drops it too
        if isinstance(record, dict) and isinstance(record.get("step"), int):  # else not a record of ours
            lines.append(record)
    target = output_dir / REBUILT
    shutil.rmtree(target, ignore_errors=True)  # ours alone: rebuilt from scratch each time
    target.mkdir()

    import wandb

    by_step: dict[int, dict] = {}
    for record in lines:
        by_step.setdefault(record["step"], {}).update({k: v for k, v in record.items() if k != "step"})
    images = {int(p.stem[5:]): p for p in (output_dir / SAMPLES_KEY.rsplit("/", 1)[-1]).glob("step_*.png")
              if p.stem[5:].isdigit() and int(p.stem[5:]) in by_step}  # those of steps the run kept
    logging = config["logging"]
    run = wandb.init(project=logging["wandb_project"], group=logging.get("wandb_group") or None, dir=str(target),
                     id=run_id, config=config, mode="offline", settings=wandb.Settings(silent=True, x_disable_stats=True))
    for step in sorted(by_step):  # wandb takes steps in order only
        values = by_step[step]
        if step in images:
            values[SAMPLES_KEY] = wandb.Image(str(images[step]))
        run.log(values, step=step)
    run.finish()
    [folder] = (target / "wandb").glob("offline-run-*")
    return folder, run_id, len(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("error: usage is python slurm/wandb_rebuild.py OUTPUT_DIR", file=sys.stderr)
        return 2
    try:
        folder, run_id, n = rebuild(Path(args[0]))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"rebuilt wandb run {run_id} from {counted(n, 'metrics line')} in {folder}; upload it with: wandb sync {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
