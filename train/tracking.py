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


def _step_of(line: str) -> int | None:
    """The step of one metrics.jsonl line; None for a line that is not a whole record."""
    try:
        record = json.loads(line)
        return int(record["step"]) if isinstance(record, dict) else None
    except (ValueError, KeyError, TypeError):
        return None
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
        self._bar = None
        self._trim_metrics(resume_step)
        self._wandb = None
        if wandb_mode != "disabled":
            import wandb  # deferred: slow to import, and only the main process needs it

            # mode is passed explicitly and WANDB_SILENT keeps it from ever prompting.
            self._wandb = wandb.init(project=wandb_project, dir=str(output_dir), config=config, mode=wandb_mode,
                                     id=run_id, resume="allow", settings=wandb.Settings(silent=True))

    def _trim_metrics(self, resume_step: int | None) -> None:
        """Keep the lines up to the checkpoint's step, atomically. A line that is not a whole
        record (the tail torn by a kill or a full disk) is dropped and reported, never fatal."""
        if not self.metrics_path.exists():
            return
        if resume_step is None:
            self.metrics_path.unlink()
            return
        lines = self.metrics_path.read_text(errors="replace").splitlines()
        steps = [_step_of(line) for line in lines]
        torn = [line for line, step in zip(lines, steps) if step is None and line.strip()]
        kept = [line for line, step in zip(lines, steps) if step is not None and step <= resume_step]
        tmp = self.metrics_path.with_name(METRICS_FILE + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.metrics_path)
        if torn:
            self.info(f"{self.metrics_path}: dropped {len(torn)} damaged line(s) ({sum(map(len, torn))} bytes, "
                      f"written as the run was killed or the disk filled); the rest is kept")

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
