"""Everything a run shows or writes for people: console lines, progress bar, metrics.jsonl,
sample PNGs and wandb. Gated here, in one place, on the global main process: the other ranks
get a `NullTracker` with the same methods that does nothing.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from accelerate import Accelerator

METRICS_FILE = "metrics.jsonl"
STATUS_FILE = "status.json"


def write_status(path: Path, outcome: str, exit_code: int, step: int | None = None, message: str = "") -> None:
    """Record how the run ended where scripts can read it: `accelerate launch` reports every
    failure as status 1, so the SLURM script tells "preempted" from "failed" by this file.
    outcome = running | completed | preempted | failed. Main process only."""
    record = {"outcome": outcome, "exit_code": exit_code, "step": step, "message": message,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record) + "\n")
    tmp.replace(path)


class NullTracker:
    """What ranks other than the global main process get: every call is a no-op."""

    def info(self, message: str) -> None:
        pass

    def log(self, metrics: dict[str, Any]) -> None:
        pass

    def log_image(self, key: str, path: Path, step: int) -> None:
        pass

    def progress(self, total: int, initial: int) -> None:
        pass

    def advance(self, n: int = 1, **postfix: Any) -> None:
        pass

    def finish(self) -> None:
        pass


class Tracker(NullTracker):
    """The main process's tracker. `resume_step` trims metrics.jsonl to what the checkpoint
    being resumed had seen, so a resumed run's metrics have no gaps and no duplicates."""

    def __init__(self, output_dir: Path, config: dict[str, Any], wandb_mode: str, wandb_project: str,
                 run_id: str, resume_step: int | None) -> None:
        self.metrics_path = output_dir / METRICS_FILE
        self._trim_metrics(resume_step)
        self._bar = None
        self._wandb = None
        if wandb_mode != "disabled":
            import wandb  # deferred: slow to import, and only the main process needs it

            # mode is passed explicitly and WANDB_SILENT keeps it from ever prompting.
            self._wandb = wandb.init(project=wandb_project, dir=str(output_dir), config=config, mode=wandb_mode,
                                     id=run_id, resume="allow", settings=wandb.Settings(silent=True))

    def _trim_metrics(self, resume_step: int | None) -> None:
        if not self.metrics_path.exists():
            return
        if resume_step is None:
            self.metrics_path.unlink()
            return
        kept = [line for line in self.metrics_path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= resume_step]
        self.metrics_path.write_text("".join(line + "\n" for line in kept))

    def info(self, message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        if self._bar is not None:
            self._bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def log(self, metrics: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in metrics.items() if k != "step"}, step=metrics["step"])

    def log_image(self, key: str, path: Path, step: int) -> None:
        if self._wandb is not None:
            import wandb

            self._wandb.log({key: wandb.Image(str(path))}, step=step)

    def progress(self, total: int, initial: int) -> None:
        from tqdm.auto import tqdm

        # A bar only on a terminal: in batch-job logs it would be thousands of lines.
        self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, disable=None)

    def advance(self, n: int = 1, **postfix: Any) -> None:
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def build_tracker(accelerator: Accelerator, output_dir: Path, config: dict[str, Any], wandb_mode: str,
                  wandb_project: str, run_id: str, resume_step: int | None) -> NullTracker:
    """The one place that decides who writes: the global main process, and nobody else."""
    if not accelerator.is_main_process:
        return NullTracker()
    return Tracker(output_dir, config, wandb_mode, wandb_project, run_id, resume_step)
