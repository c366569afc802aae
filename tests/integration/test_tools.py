"""The small commands beside training (train.status, slurm/wandb_rebuild.py) on files a person or
a crash left odd: one line and exit 2, or the part that is sound, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

from conftest import ENV, REPO, error_lines
from train.config import Config


def _run(*args: str) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS`, or `python SCRIPT ARGS` for a .py path."""
    command = list(args) if args[0].endswith(".py") else ["-m", *args]
    return subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **ENV})


def test_the_status_command_on_a_record_that_is_not_whole(tmp_path):
    for record in ({"outcome": "completed"}, {"outcome": "failed", "exit_code": "2"}, [1, 2]):
        (tmp_path / "status.json").write_text(json.dumps(record))
        r = _run("train.status", str(tmp_path))
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert error_lines(r.stderr) == [f"error: {tmp_path / 'status.json'} is missing or not a whole status record "
                                         f"(outcome and exit_code): no run recorded there"]
    (tmp_path / "status.json").write_text(json.dumps({"outcome": "completed", "exit_code": 0}))
    assert _run("train.status", str(tmp_path)).stdout == "completed 0\n"


def test_wandb_rebuild_skips_metrics_lines_that_are_not_records(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / "step_00000001").mkdir(parents=True)
    (out / "checkpoints" / "step_00000001" / "trainer_state.json").write_text(json.dumps({"run_id": "abcd1234"}))
    (out / "config.yaml").write_text(yaml.safe_dump(Config().to_dict()))
    (out / "checkpoints" / "step_00000002").mkdir(parents=True)  # newer, its state not a mapping: skipped
    (out / "checkpoints" / "step_00000002" / "trainer_state.json").write_text(json.dumps([{"run_id": "x"}]))
    (out / "setup.json").write_text('{"world_si')  # torn
    (out / "metrics.jsonl").write_text('[1, 2]\n"text"\n{"no step": 1}\n{"step": 1, "train/loss": 0.5}\n{"st')
    r = _run("slurm/wandb_rebuild.py", str(out))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "rebuilt wandb run abcd1234 from 1 metrics line in" in r.stdout
    for text in ("[torn", "- a list\n"):  # a config.yaml torn, or not the one a run writes
        (out / "config.yaml").write_text(text)
        r = _run("slurm/wandb_rebuild.py", str(out))
        assert r.returncode == 2 and "Traceback" not in r.stderr and len(error_lines(r.stderr)) == 1, r.stderr
        assert str(out / "config.yaml") in r.stderr


def test_the_slurm_script_finds_the_output_dir_as_training_reads_it(tmp_path):
    """slurm/output_dir.py: the config file's output_dir, unless an override (OUTPUT_DIR, which
    slurm/denoise.sh passes first, or an output_dir= argument after it) names another."""
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "from_yaml"), "train": {"epochs": 1}}))
    for args, expected in ((["--config", str(config)], tmp_path / "from_yaml"),
                           ([f"output_dir={tmp_path / 'env'}", "--config", str(config)], tmp_path / "env"),
                           ([f"output_dir={tmp_path / 'env'}", "--config", str(config), "output_dir=~/arg"],
                            os.path.expanduser("~/arg")),
                           ([], Config().output_dir)):
        r = _run("slurm/output_dir.py", *args)
        assert r.returncode == 0 and r.stdout == f"{expected}\n", (args, r.stderr)
    r = _run("slurm/output_dir.py", "--config", str(config), "train.lr=-1")
    assert r.returncode == 2 and r.stdout == "" and error_lines(r.stderr) == [
        "error: config key 'train.lr' must be > 0, got -1.0"]
