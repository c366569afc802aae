"""bench/results.py: trains its runs, scores them for real and writes docs/results.md."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch
from accelerate import Accelerator
from PIL import Image

from conftest import REPO
from train import metrics
from train.data import load_mnist
from train.denoise import load_trained
from train.noise import NoiseSpec


def _results_module():
    spec = importlib.util.spec_from_file_location("results", REPO / "bench" / "results.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["results"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_results_script_trains_scores_and_writes_the_page(mnist_root, tmp_path):
    pytest.importorskip("matplotlib", reason="the plot needs the results extra (CI installs it)")
    results = _results_module()
    work, docs = tmp_path / "work", tmp_path / "docs"
    common = ["--work", str(work), "--data-root", str(mnist_root)]
    assert results.main(common + ["train", "unet", "reference_best", "--set", "data.train_samples=200",
                                  "data.test_samples=50", "train.epochs=2", "model.unet.channels=4",
                                  "model.unet.top_channels=4"]) == 0
    timing = json.loads((work / "unet" / "timing.json").read_text())
    assert timing["wall_s"] > 0 and timing["attempts"][0]["exit_code"] == 0 and "vCPUs" in timing["attempts"][0]["machine"]
    assert results.main(common + ["report", "--docs", str(docs), "--test-samples", "50",
                                  "--denoise-repeats", "1"]) == 0

    # The page's numbers are real evaluations: recompute one directly.
    scores = json.loads((docs / "results" / "scores.json").read_text())
    _, test = load_mnist(str(mnist_root), False, torch.device("cpu"), 0, 50)
    model, _ = load_trained(work / "unet")
    direct = metrics.evaluate(model, test, Accelerator(cpu=True), NoiseSpec("salt_pepper", 0.3, 0.3), 1234, 1000)
    assert scores["salt_pepper/0.3/unet"]["eval/psnr_db"] == pytest.approx(direct["eval/psnr_db"], abs=1e-9)
    assert len(scores) == len(results.NOISES) * 3  # noisy input + 2 runs, at each noise
    page = (docs / "results.md").read_text()
    assert f"| `unet` | {direct['eval/psnr_db']:.2f}" not in page  # (the PSNR table is per noise, checked next)
    row = next(line for line in page.splitlines() if line.startswith("| `unet` |") and "dB" not in line)
    assert f"{scores['gaussian/0.5/unet']['eval/psnr_db']:.2f}" in row
    assert "| `reference_best` | reference model" in page and "2 |" in page  # epochs column
    for kind, level in results.GRIDS:  # rows: noisy, 2 runs, clean; 10 digits each
        with Image.open(docs / "results" / f"samples-{kind}-{level:g}.png") as im:
            assert im.size == (10 * 30 + 2, 4 * 30 + 2)
    with Image.open(docs / "results" / "psnr-per-epoch.png") as im:
        assert im.size[0] > 300
    speed = json.loads((docs / "results" / "denoise-speed.json").read_text())
    assert speed["images"] == 50 and speed["best_wall_s"] > 0 and speed["psnr_db_of_pngs"] > 5


def test_results_train_needs_known_run_names(tmp_path, capsys):
    results = _results_module()
    with pytest.raises(SystemExit):
        results.main(["--work", str(tmp_path), "train", "resnet"])
    assert "unknown: ['resnet']" in capsys.readouterr().err
