"""The real entry point, run as users run it, and what it leaves in the output folder."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO, accelerate_cpu, load_weights, make_tiny_mnist, read_metrics, run_main
from train import checkpoint
from train.config import load_config
from train.model import ConvDenoiser

QUICK = ["--config", "configs/debug.yaml", "data.train_samples=400", "logging.every_n_steps=5",
         "logging.wandb_mode=disabled"]


def _ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def test_single_process_run_writes_every_output(synthetic_mnist, tmp_path):
    out = tmp_path / "run"
    r = _ok(run_main(QUICK + [f"data.root={synthetic_mnist}", f"output_dir={out}", "train.epochs=2"]))
    assert r.stdout.count("setup: distributed_type=NO, world_size=1") == 1
    # Where the loop's time went: two evaluations and two checkpoints, one per epoch.
    split = re.search(r"time: training ([\d.]+) s, evaluation ([\d.]+) s \(2 runs\), checkpoints ([\d.]+) s "
                      r"\(2 saved\)", r.stdout)
    assert split and float(split[1]) > 0 and float(split[2]) > 0, r.stdout

    cfg = load_config(out / "config.yaml")  # the resolved config reloads as a config
    assert cfg.output_dir == str(out) and cfg.data.train_samples == 400 and cfg.train.epochs == 2
    assert json.loads((out / "setup.json").read_text())["mixed_precision"] == "no"

    lines = read_metrics(out)
    train_lines = [m for m in lines if "train/loss" in m]
    eval_lines = [m for m in lines if "eval/mse" in m]
    steps_per_epoch = 400 // 20
    assert [m["step"] for m in eval_lines] == [steps_per_epoch, 2 * steps_per_epoch]
    assert [m["epoch"] for m in eval_lines] == [1, 2]
    for m in eval_lines:
        assert set(m) >= {"step", "epoch", "eval/mse", "eval/psnr_db", "eval/ssim", "eval/noisy_psnr_db"}
        assert m["eval/images"] == 1000  # the whole test set
        assert 9.0 < m["eval/noisy_psnr_db"] < 9.8  # noise factor 0.5, clipped: as on MNIST (9.37 dB)
    assert eval_lines[1]["eval/psnr_db"] > eval_lines[0]["eval/psnr_db"] + 1  # it learns (measured: +2.4 dB)
    assert [m["step"] for m in train_lines] == list(range(5, 41, 5))
    # One meaning of epoch in every line: epochs done, so a tracker gets one value per step.
    assert [m["epoch"] for m in train_lines] == [step / steps_per_epoch for step in range(5, 41, 5)]
    assert all(m["train/loss"] > 0 and m["train/images_per_s"] > 0 for m in train_lines)

    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step_00000020.png", "step_00000040.png"]
    from PIL import Image

    with Image.open(out / "samples" / "step_00000040.png") as im:  # 3 rows (noisy/denoised/clean) x 10 digits
        assert im.size == (10 * 30 + 2, 3 * 30 + 2)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000020", "step_00000040"]

    model = ConvDenoiser()
    model.load_state_dict(load_weights(out))
    assert torch.isfinite(model(torch.rand(2, 1, 28, 28))).all()


def test_a_run_forked_from_the_warm_interpreter_is_a_new_process_run(synthetic_mnist, tmp_path):
    """run_main forks single-process runs from tests/warm_main.py. The same run forked and as a
    new process (`launcher=[python]`) writes the same files, metrics and log (but for times)."""
    from conftest import _warm

    if _warm() is None:
        pytest.skip("no warm interpreter here (CUDA): every run is a new process")
    args = QUICK + [f"data.root={synthetic_mnist}", "train.epochs=1", "data.test_samples=100"]
    runs = {"warm": run_main(args + [f"output_dir={tmp_path / 'warm'}"]),
            "new": run_main(args + [f"output_dir={tmp_path / 'new'}"], launcher=[sys.executable])}
    seen = {}
    for name, r in runs.items():
        out = tmp_path / name
        assert r.returncode == 0 and r.stderr == "", r.stderr
        log = [re.sub(r"^\[[\d:]+\] ", "", line).replace(str(out), "OUT") for line in r.stdout.splitlines()]
        metrics = [{k: v for k, v in m.items() if k not in ("train/images_per_s", "memory/max_rss_gib")}
                   for m in read_metrics(out)]
        files = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
        seen[name] = ([line for line in log if not line.startswith("time:")], metrics, files,
                      (out / "model.safetensors").read_bytes(),
                      {k: v for k, v in json.loads((out / "status.json").read_text()).items() if k != "time"})
    assert seen["warm"] == seen["new"]


def test_wandb_offline_run_holds_config_and_metrics(synthetic_mnist, tmp_path):
    out = tmp_path / "run"
    _ok(run_main(QUICK + [f"data.root={synthetic_mnist}", f"output_dir={out}", "logging.wandb_mode=offline",
                          "data.test_samples=200", "train.epochs=1", "train.seed=5"]))
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # An offline run keeps config and history as protobuf records in run-<id>.wandb (synced
    # later by `wandb sync`); the keys and string values are stored verbatim there.
    records = next(runs[0].glob("run-*.wandb")).read_bytes()
    for needed in (b"per_device_batch_size", b"world_size", b"eval/psnr_db", b"eval/ssim", b"train/loss"):
        assert needed in records, needed
    assert list((runs[0] / "files" / "media" / "images").rglob("*.png")), "sample grid logged as an image"


def test_wandb_gets_the_metrics_from_the_main_process_alone(synthetic_mnist, tmp_path):
    out = tmp_path / "run"
    _ok(run_main(QUICK + [f"data.root={synthetic_mnist}", f"output_dir={out}", "data.test_samples=200",
                          "train.epochs=1", "train.global_batch_size=20", "logging.wandb_mode=offline"],
                 launcher=accelerate_cpu(2)))
    [run] = list((out / "wandb").glob("offline-run-*"))  # one writer: rank 0
    [records] = list(run.glob("run-*.wandb"))
    assert b"eval/psnr_db" in records.read_bytes()


def _error_line(result) -> str:
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


USER_ERRORS = [
    (["--config", "{tmp}/bad.yaml"], ["bad.yaml' is not valid YAML at line", "expected"]),
    (["trian.epochs=1"], ["unknown config key 'trian'", "did you mean train"]),
    (["train.epocs=1"], ["unknown config key 'train.epocs'", "did you mean train.epochs"]),
    (["train.epochs=many"], ["train.epochs", "must be int"]),
    (["train.per_device_batch_size=0"], ["train.per_device_batch_size", ">= 1"]),
    (["noise.factor=-0.5"], ["noise.factor", ">= 0"]),
    (["--config", "configs/nope.yaml"], ["configs/nope.yaml", "not found"]),
    (["--bogus"], ["unrecognized arguments: --bogus", "usage"]),
    (["train.lr=-1"], ["train.lr", "> 0"]),
    (["train.mixed_precision=fp16"], ["fp16 needs a CUDA GPU", "bf16"]),
    (["data.root={tmp}/none", "data.download=false"], ["MNIST not found", "data.root="]),
    (["data.root={tmp}/corrupt"], ["could not be read", "good copy"]),
    (["output_dir={tmp}/file/sub"], ["cannot write to output_dir", "writable"]),
    (["checkpoint.resume={tmp}"], ["is not a checkpoint folder", "auto"]),
]


@pytest.mark.parametrize("overrides,words", USER_ERRORS, ids=[" ".join(e[0]) for e in USER_ERRORS])
def test_user_errors_end_in_one_line_and_exit_2(tmp_path, tiny_mnist, overrides, words):
    (tmp_path / "file").write_text("a file where a folder should be")
    (tmp_path / "bad.yaml").write_text("train:\n  epochs: [1\n")
    corrupt = make_tiny_mnist(tmp_path / "corrupt") / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    corrupt.write_bytes(b"\x00\x00\x08\x01garbage")
    args = [f"data.root={tiny_mnist}", f"output_dir={tmp_path}/out", "logging.wandb_mode=disabled"]
    args += [o.format(tmp=tmp_path) for o in overrides]
    line = _error_line(run_main(args))
    for w in words:
        assert w.format(tmp=tmp_path) in line, (w, line)


def test_debug_flag_shows_the_traceback(tmp_path):
    r = run_main(["--debug", "trian.epochs=1"])
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_resume_none_refuses_to_overwrite_checkpoints(tmp_path, tiny_mnist):
    out = tmp_path / "out"
    args = [f"data.root={tiny_mnist}", f"output_dir={out}", "logging.wandb_mode=disabled", "train.epochs=1",
            "data.train_samples=40", "train.per_device_batch_size=20"]
    _ok(run_main(args))
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.name != "run.lock"}
    line = _error_line(run_main(args + ["checkpoint.resume=none"]))
    assert "already holds checkpoints" in line
    # Nothing touched (run.lock names whoever holds the folder: the refused run did, for a moment).
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.name != "run.lock"} == before


def test_diverged_training_stops_before_checkpointing(tmp_path, tiny_mnist):
    out = tmp_path / "out"
    line = _error_line(run_main([f"data.root={tiny_mnist}", f"output_dir={out}", "logging.wandb_mode=disabled",
                                 "train.lr=1e30", "logging.every_n_steps=2", "train.per_device_batch_size=8"]))
    assert "training loss became nan" in line and "train.lr" in line
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").glob("step_*"))
    assert json.loads((out / "status.json").read_text())["outcome"] == "failed"


def test_collapsed_run_stops_with_one_line_and_keeps_the_checkpoints_before(synthetic_mnist, tmp_path):
    # lr 0.05 drives the reference model to all-black outputs within its first 20 steps
    # (measured: output std exactly 0, test MSE that of predicting zeros).
    out = tmp_path / "out"
    line = _error_line(run_main(QUICK + [f"data.root={synthetic_mnist}", f"output_dir={out}", "data.test_samples=200",
                                         "train.epochs=3", "train.lr=0.05", "eval.collapse_check_from_step=30"]))
    assert "training collapsed by step 40" in line and "no longer depend on the input" in line
    assert "lower train.lr" in line and "checkpoints before the collapse are kept" in line
    # Step 20 was evaluated but not checked (an untrained model is near-constant too); the
    # collapsed state of step 40 was never saved.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000020"]
    evals = [m for m in read_metrics(out) if "eval/mse" in m]
    assert [m["step"] for m in evals] == [20, 40] and evals[-1]["eval/output_std"] < 1e-3
    assert json.loads((out / "status.json").read_text())["outcome"] == "failed"


def test_a_healthy_run_scored_on_one_test_image_is_not_called_collapsed(synthetic_mnist, tmp_path):
    out = tmp_path / "out"
    r = _ok(run_main(QUICK + [f"data.root={synthetic_mnist}", f"output_dir={out}", "data.test_samples=1",
                              "train.epochs=1", "eval.collapse_check_from_step=0"]))
    assert "eval.min_output_std is not applied: it compares test images, and there is only one" in r.stdout
    assert "(1 run), checkpoints" in r.stdout
    [ev] = [m for m in read_metrics(out) if "eval/mse" in m]
    assert ev["eval/images"] == 1 and ev["eval/output_std"] == 0  # below eval.min_output_std, yet it completed


def test_unet_with_salt_and_pepper_per_sample_levels_trains(synthetic_mnist, tmp_path):
    out = tmp_path / "out"
    r = _ok(run_main(QUICK + [f"data.root={synthetic_mnist}", f"output_dir={out}", "data.test_samples=200",
                              "train.epochs=2", "train.lr=0.003", "model.name=unet", "model.unet.channels=8",
                              "model.unet.levels=2", "noise.kind=salt_pepper", "noise.factor=0.3", "noise.train_factor_min=0.1",
                              "noise.train_factor_max=0.5", "eval.collapse_check_from_step=0"]))
    assert "model unet: 6,425 parameters" in r.stdout
    assert "noise: train salt_pepper 0.1-0.5 per sample, test salt_pepper 0.3" in r.stdout
    ev = [m for m in read_metrics(out) if "eval/mse" in m][-1]
    # 30% of pixels flipped to 0 or 1; 40 steps of a small U-Net clean up a good part (measured: +6 dB).
    assert ev["eval/psnr_db"] > ev["eval/noisy_psnr_db"] + 4
    # A resume with other model settings is refused: the weights would not fit.
    line = _error_line(run_main(QUICK + [f"data.root={synthetic_mnist}", f"output_dir={out}", "train.epochs=3",
                                         "model.name=unet", "model.unet.channels=4", "model.unet.levels=2"]))
    assert ("model.settings: saved {'channels': 8, 'levels': 2, 'top_channels': 0}, "
            "now {'channels': 4, 'levels': 2, 'top_channels': 0}") in line
    # A checkpoint saved before a setting existed (here: model.unet.top_channels) resumes while
    # the setting keeps its default, and is refused once it does not.
    newest = sorted((out / "checkpoints").iterdir())[-1]
    state = json.loads((newest / "trainer_state.json").read_text())
    del state["compat"]["model.settings"]["top_channels"]
    (newest / "trainer_state.json").write_text(json.dumps(state))
    manifest = json.loads((newest / "manifest.json").read_text())
    manifest["trainer_state.json"] = checkpoint._file_digest(newest / "trainer_state.json")
    (newest / "manifest.json").write_text(json.dumps(manifest))
    unet8 = ["model.name=unet", "model.unet.channels=8", "model.unet.levels=2", "noise.kind=salt_pepper",
             "noise.factor=0.3", "noise.train_factor_min=0.1", "noise.train_factor_max=0.5"]
    line = _error_line(run_main(QUICK + [f"data.root={synthetic_mnist}", f"output_dir={out}", "train.epochs=3", *unet8,
                                         "model.unet.top_channels=4"]))
    assert "model.settings: saved {'channels': 8, 'levels': 2}, now {'channels': 8, 'levels': 2, 'top_channels': 4}" in line
    r = _ok(run_main(QUICK + [f"data.root={synthetic_mnist}", f"output_dir={out}", "data.test_samples=200", "train.epochs=3",
                              "train.lr=0.003", *unet8, "eval.collapse_check_from_step=0"]))
    assert "resuming from" in r.stdout and "step 60 epoch 3" in r.stdout


def test_cosine_schedule_resumes_exactly_after_a_crash(synthetic_mnist, tmp_path):
    args = QUICK + [f"data.root={synthetic_mnist}", "data.test_samples=100", "data.train_samples=200", "train.epochs=3",
                    "train.lr_schedule=cosine", "train.warmup_steps=4", "checkpoint.every_n_steps=8"]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    _ok(run_main(args + [f"output_dir={straight}"]))
    lrs = [m["train/lr"] for m in read_metrics(straight) if "train/lr" in m]
    assert lrs[0] == pytest.approx(1e-3) and lrs == sorted(lrs, reverse=True) and lrs[-1] < 1e-5
    assert run_main(args + [f"output_dir={crashed}"], env={"DENOISE_FAULT": "after_step:13"}).returncode < 0
    _ok(run_main(args + [f"output_dir={crashed}"]))
    a, b = load_weights(straight), load_weights(crashed)
    assert all(torch.equal(a[k], b[k]) for k in a), "the learning rate is a function of the step: resume is exact"
    # More epochs would stretch the cosine under the saved optimizer: refused.
    line = _error_line(run_main(args + [f"output_dir={crashed}", "train.epochs=4"]))
    assert "train.epochs: saved 3, now 4" in line


def test_a_config_error_is_reported_before_torch_is_imported():
    probe = ("import sys; from train.main import main; code = main(['train.epocs=1']); "
             "print('torch' in sys.modules); sys.exit(code)")
    r = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == "False\n", r
    assert r.stderr.startswith("error: unknown config key 'train.epocs'")
