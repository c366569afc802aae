"""Sweeps: a grid of config overrides run as one SLURM job array (slurm/sweep.sh), one task per
point, each in its own output_dir, and a table of how the finished points did.

A sweep file (YAML):

    name: lr-batch                       # names the array job and the output folder
    config: configs/default.yaml         # the base config (optional)
    output_root: outputs/sweeps/lr-batch # task K writes to output_root/task-K-HASH
    overrides: [data.root=/shared/mnist] # for every task (optional)
    grid:                                # every combination: here 3 x 2 = 6 tasks
      train.lr: [0.0005, 0.001, 0.002]
      train.global_batch_size: [20, 40]

HASH is a digest of the task's overrides: a task whose point changed (the grid was edited)
gets a new folder rather than resuming another point's checkpoint.

    python slurm/sweep.py count SWEEP.yaml [override ...]    # checks every task's config; prints N
    python slurm/sweep.py args SWEEP.yaml K [override ...]   # task K's arguments for train/main.py
    python slurm/sweep.py summary SWEEP.yaml                 # the tasks' outcomes and best metrics

Light on imports: no torch here.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: train.*

from train.config import ConfigError, load_config, read_yaml  # noqa: E402
from train.errors import UserError  # noqa: E402

SWEEP_KEYS = ("name", "config", "output_root", "overrides", "grid")
MAX_TASKS = 10_000  # far above SLURM's default MaxArraySize (1001); a grid past it is a mistake


@dataclass(frozen=True)
class Task:
    index: int
    point: dict[str, object]
    """this task's values of the grid's keys"""
    output_dir: Path

    def overrides(self, sweep: "Sweep", extra: list[str]) -> list[str]:
        """This task's config overrides; `extra` ones come after the sweep's."""
        points = [f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in self.point.items()]
        group = [f"logging.wandb_group={sweep.name}"]  # the sweep's runs together in wandb
        return group + sweep.overrides + points + list(extra) + [f"output_dir={self.output_dir}"]

    def args(self, sweep: "Sweep", extra: list[str]) -> list[str]:
        """train/main.py's arguments for this task."""
        return (["--config", sweep.config] if sweep.config else []) + self.overrides(sweep, extra)


@dataclass(frozen=True)
class Sweep:
    name: str
    config: str | None
    output_root: Path
    overrides: list[str]
    grid: dict[str, list]

    def tasks(self) -> list[Task]:
        keys = list(self.grid)
        tasks = []
        for index, values in enumerate(itertools.product(*(self.grid[k] for k in keys))):
            point = dict(zip(keys, values))
            digest = hashlib.sha256(json.dumps(point, sort_keys=True).encode()).hexdigest()[:8]
            tasks.append(Task(index, point, self.output_root / f"task-{index:03d}-{digest}"))
        return tasks


def load_sweep(path: str | Path) -> Sweep:
    """Read and check a sweep file; every mistake is a UserError naming the key."""
    path = Path(path)
    try:
        data = read_yaml(path, f"sweep file '{path}'")
    except ConfigError as e:
        raise UserError(str(e)) from None
    if not isinstance(data, dict):
        raise UserError(f"sweep file '{path}' must be a mapping with the keys {', '.join(SWEEP_KEYS)}")
    unknown = sorted(set(data) - set(SWEEP_KEYS))
    if unknown:
        raise UserError(f"sweep file '{path}': unknown key '{unknown[0]}'; the keys are {', '.join(SWEEP_KEYS)}")
    grid = data.get("grid")
    if not isinstance(grid, dict) or not grid or not all(isinstance(v, list) and v for v in grid.values()):
        raise UserError(f"sweep file '{path}': 'grid' must map config keys to non-empty lists of values, "
                        f"e.g. grid: {{train.lr: [0.001, 0.002]}}")
    if math.prod(len(v) for v in grid.values()) > MAX_TASKS:
        raise UserError(f"sweep file '{path}': the grid has {math.prod(len(v) for v in grid.values()):,} points, "
                        f"more than {MAX_TASKS:,} tasks: split it into several sweeps")
    overrides = data.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise UserError(f"sweep file '{path}': 'overrides' must be a list of section.key=value strings")
    name = str(data.get("name") or path.stem)
    root = data.get("output_root") or f"outputs/sweeps/{name}"
    return Sweep(name, data.get("config"), Path(str(root)), overrides, grid)


def check(sweep: Sweep, extra: list[str]) -> int:
    """Load every task's config as train/main.py will (a typo fails here, before any job starts)."""
    for task in sweep.tasks():
        try:
            load_config(sweep.config, task.overrides(sweep, extra))
        except UserError as e:
            raise UserError(f"sweep task {task.index} ({task.point}): {e}") from None
    return len(sweep.tasks())


def summary(sweep: Sweep) -> list[dict]:
    """One row per task: its point, outcome, steps, and best and last test PSNR (dB)."""
    from train.rundir import settle

    rows = []
    for task in sweep.tasks():
        status = settle(task.output_dir) if task.output_dir.exists() else None
        metrics = []
        path = task.output_dir / "metrics.jsonl"
        if path.exists():
            for line in path.read_text(errors="replace").splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a torn last line
                if isinstance(record, dict) and isinstance(record.get("step"), int):
                    metrics.append(record)
        evals = [m for m in metrics if "eval/psnr_db" in m]
        best = max(evals, key=lambda m: m["eval/psnr_db"], default=None)
        rows.append({"task": task.index, **task.point, "outcome": status["outcome"] if status else "not started",
                     "step": metrics[-1]["step"] if metrics else 0,
                     "best_psnr_db": best["eval/psnr_db"] if best else None, "best_step": best["step"] if best else None,
                     "last_psnr_db": evals[-1]["eval/psnr_db"] if evals else None, "output_dir": str(task.output_dir)})
    return rows


def format_table(rows: list[dict]) -> str:
    """Rows as aligned text columns, best PSNR first: PSNRs to 3 decimals, grid values as given."""
    rows = sorted(rows, key=lambda r: -(r["best_psnr_db"] if r["best_psnr_db"] is not None else float("-inf")))
    columns = list(rows[0]) if rows else []

    def cell(column: str, value: object) -> str:
        if value is None:
            return "-"
        return f"{value:.3f}" if column.endswith("_db") else str(value)  # str(0.0005) is '0.0005'

    table = [columns] + [[cell(c, r[c]) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in table)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        if len(args) >= 2 and args[0] == "count":
            print(check(load_sweep(args[1]), args[2:]))
        elif len(args) >= 3 and args[0] == "args" and args[2].isdigit():
            sweep = load_sweep(args[1])
            tasks = sweep.tasks()
            if int(args[2]) >= len(tasks):
                raise UserError(f"sweep {args[1]} has {len(tasks)} tasks (0..{len(tasks) - 1}), not task {args[2]}")
            print("\n".join(tasks[int(args[2])].args(sweep, args[3:])))
        elif len(args) == 2 and args[0] == "summary":
            print(format_table(summary(load_sweep(args[1]))))
        else:
            raise UserError("usage is python slurm/sweep.py count|args|summary SWEEP.yaml [K] [override ...]")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
