"""Sweep files: the grid, each task's arguments and folder, and mistakes caught before submitting."""

from __future__ import annotations

import json

import pytest

from conftest import slurm_script
from train.errors import UserError

_sweep = slurm_script("sweep")
check, format_table, load_sweep, main, summary = (_sweep.check, _sweep.format_table, _sweep.load_sweep, _sweep.main,
                                                  _sweep.summary)


@pytest.fixture
def sweep_file(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: s\nconfig: configs/debug.yaml\noutput_root: %s\noverrides: [train.epochs=1]\n"
                    "grid:\n  train.lr: [0.001, 0.002]\n  model.name: [conv_denoiser, unet]\n" % (tmp_path / "out"))
    return path


def test_every_point_of_the_grid_is_a_task_with_its_own_folder(sweep_file, tmp_path):
    sweep = load_sweep(sweep_file)
    tasks = sweep.tasks()
    assert [t.point for t in tasks] == [{"train.lr": lr, "model.name": m} for lr in (0.001, 0.002)
                                        for m in ("conv_denoiser", "unet")]
    assert len({t.output_dir for t in tasks}) == 4 and all(t.output_dir.parent == tmp_path / "out" for t in tasks)
    assert tasks[3].args(sweep, ["data.root=/d"]) == [
        "--config", "configs/debug.yaml", "logging.wandb_group=s", "train.epochs=1", "train.lr=0.002", "model.name=unet", "data.root=/d",
        f"output_dir={tasks[3].output_dir}"]
    assert check(sweep, ["data.root=/d"]) == 4
    # Editing the grid moves a point to a new folder instead of resuming another point's run.
    sweep_file.write_text(sweep_file.read_text().replace("0.002", "0.003"))
    edited = load_sweep(sweep_file).tasks()
    assert edited[0].output_dir == tasks[0].output_dir and edited[3].output_dir != tasks[3].output_dir


@pytest.mark.parametrize("text, words", [
    ("grid: {train.lr: []}", "non-empty lists"),
    ("gird: {train.lr: [1]}", "unknown key 'gird'"),
    ("grid: {train.lr: [1]}\noverrides: train.epochs=1", "'overrides' must be a list"),
    ("[1, 2]", "must be a mapping"),
    ("grid: {train.lr: [1", "not valid YAML"),
])
def test_a_bad_sweep_file_is_one_line(tmp_path, text, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=words):
        load_sweep(path)


def test_a_task_with_a_bad_config_fails_the_check_naming_the_task(sweep_file, capsys):
    assert main(["count", str(sweep_file), "train.epocs=2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: sweep task 0 (") and "unknown config key 'train.epocs'" in err


def test_the_summary_ranks_the_tasks_by_best_psnr(sweep_file):
    sweep = load_sweep(sweep_file)
    tasks = sweep.tasks()
    for task, psnrs in zip(tasks[:2], ([10.0, 12.5], [11.0, 13.0])):
        task.output_dir.mkdir(parents=True)
        lines = [{"step": 10 * (i + 1), "eval/psnr_db": p} for i, p in enumerate(psnrs)]
        (task.output_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines) + '{"torn')
        (task.output_dir / "status.json").write_text(json.dumps({"outcome": "completed", "exit_code": 0}))
    rows = summary(sweep)
    assert [(r["task"], r["outcome"], r["best_psnr_db"], r["best_step"]) for r in rows] == [
        (0, "completed", 12.5, 20), (1, "completed", 13.0, 20), (2, "not started", None, None),
        (3, "not started", None, None)]
    table = format_table(rows).splitlines()
    assert table[0].split()[:3] == ["task", "train.lr", "model.name"] and table[1].split()[0] == "1"


def test_the_summary_shows_grid_values_as_given(sweep_file, tmp_path):
    sweep_file.write_text(sweep_file.read_text().replace("[0.001, 0.002]", "[0.0005, 0.001]"))
    sweep = load_sweep(sweep_file)
    task = sweep.tasks()[0]
    task.output_dir.mkdir(parents=True)
    (task.output_dir / "metrics.jsonl").write_text('[1, 2]\n{"step": 10, "eval/psnr_db": 12.34567}\n')
    table = format_table(summary(sweep))
    assert "0.0005" in table and "0.001 " in table and "12.346" in table


@pytest.mark.parametrize("text, words", [
    ("a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdefg", "bcdefgh")) + "grid: {train.lr: *h}\n", "more than 10,000 values"),
    ("grid: {train.lr: " + str(list(range(200))) + ", train.seed: " + str(list(range(200))) + "}", "40,000 points"),
])
def test_a_sweep_file_that_expands_past_any_sweep_is_refused_at_once(tmp_path, text, words):
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=words) as e:
        load_sweep(path)
    assert len(str(e.value)) < 300
