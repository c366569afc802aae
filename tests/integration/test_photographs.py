"""Training on a folder of pictures (data.dataset=images) through the real entry point: exact
resume, 1 and 2 processes alike, full-size inference, and bad folders in one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, accelerate_cpu, error_lines, load_weights, read_metrics, run_main, write_pictures

# A tiny recipe: 4 pictures x 8 patches of 16x16 = 32 samples, 8 steps an epoch at batch 4.
PICS = ["--config", "configs/images_cpu.yaml", "model.unet.channels=4", "model.unet.levels=2", "data.patch_size=16",
        "data.patches_per_image=8", "train.per_device_batch_size=4", "train.epochs=2", "train.warmup_steps=2",
        "eval.every_n_epochs=1", "logging.every_n_steps=4", "logging.wandb_mode=disabled", "checkpoint.every_n_steps=0"]


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    root = tmp_path_factory.mktemp("pictures")
    write_pictures(root / "train", [(40, 52), (33, 47), (64, 30), (45, 45)], channels=3)
    write_pictures(root / "test", [(50, 70), (37, 41)], channels=3, seed=1)
    return root


def _args(pictures, out, *more):
    return PICS + [f"data.train_dir={pictures / 'train'}", f"data.test_dir={pictures / 'test'}", f"output_dir={out}",
                   *more]


def _ok(r):
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.slow
def test_pictures_train_resume_exactly_and_denoise_at_full_size(pictures, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    r = _ok(run_main(_args(pictures, whole)))
    assert "pictures: 4 training pictures (8 patches of 16x16 each per epoch), 2 test pictures, 1 channel(s)" in r.stdout
    evals = [m for m in read_metrics(whole) if "eval/psnr_db" in m]
    assert [m["eval/images"] for m in evals] == [2, 2] and evals[-1]["eval/psnr_db"] > evals[-1]["eval/noisy_psnr_db"]
    assert (whole / "samples" / "step_00000016.png").is_file()
    # SIGKILLed mid-epoch 2, then resumed: the same weights as the run never stopped.
    assert run_main(_args(pictures, killed), env={"DENOISE_FAULT": "after_step:11"}).returncode < 0
    _ok(run_main(_args(pictures, killed)))
    a, b = load_weights(whole), load_weights(killed)
    assert all(torch.equal(a[k], b[k]) for k in a), "a resume on pictures must be bit-exact"

    # Full-size inference keeps each picture's size, mode and bit depth; tiles change nothing.
    from PIL import Image

    inputs = tmp_path / "in"
    rgb = write_pictures(inputs, [(45, 61)], channels=3)[0]
    deep = write_pictures(tmp_path / "deep", [(70, 90)], channels=1, bits=16)[0].rename(inputs / "deep.png")
    jpeg = write_pictures(tmp_path / "jpeg", [(30, 33)], channels=1, suffix=".jpg")[0].rename(inputs / "photo.jpg")
    rgba = np.dstack([np.asarray(Image.open(rgb)), np.linspace(0, 255, 45 * 61).reshape(45, 61).astype(np.uint8)])
    Image.fromarray(rgba).save(inputs / "clear.png")
    (inputs / "scan").write_bytes(rgb.read_bytes())  # no suffix: written as PNG
    (inputs / "p0.v2.png").write_bytes(rgb.read_bytes())  # a dotted name keeps its own output
    outputs = {}
    for tile in (16, 256):
        out = tmp_path / f"out{tile}"
        r = subprocess.run([sys.executable, "-m", "train.denoise", "--checkpoint", str(whole), str(inputs), "--out",
                            str(out), "--tile", str(tile)], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "denoised 6 pictures" in r.stdout, r.stderr
        outputs[tile] = {p.name: Image.open(p) for p in out.iterdir()}
    assert sorted(outputs[16]) == ["clear.png", "deep.png", "p0.png", "p0.v2.png", "photo.jpg", "scan.png"]
    assert np.array_equal(np.asarray(outputs[16]["scan.png"]), np.asarray(outputs[16]["p0.png"]))
    for name, source in (("p0.png", rgb), ("deep.png", deep), ("photo.jpg", jpeg), ("clear.png", inputs / "clear.png"),
                         ("p0.v2.png", rgb)):
        original, written = Image.open(source), outputs[16][name]
        assert (written.size, written.mode) == (original.size, original.mode), name
    assert np.array_equal(np.asarray(outputs[16]["clear.png"])[..., 3], rgba[..., 3])  # alpha kept as it was
    deep16 = np.asarray(outputs[16]["deep.png"]).astype(np.int64)
    assert len(np.unique(deep16 % 256)) > 1  # all 16 bits written, not 8 bits scaled up
    for name in ("p0.png", "deep.png", "clear.png"):  # 90 pixels at --tile 16: tiled; at 256: one pass
        diff = np.abs(np.asarray(outputs[16][name]).astype(np.int64) - np.asarray(outputs[256][name]).astype(np.int64))
        assert diff.max() <= (2 if name == "deep.png" else 1), (name, diff.max())  # to rounding


@pytest.mark.slow
def test_one_and_two_processes_train_alike_on_pictures(pictures, tmp_path):
    runs = {}
    for nproc in (1, 2):
        for mode in ("default", "exact"):
            out = tmp_path / f"{mode}{nproc}"
            more = ["train.global_batch_size=8"] + (["train.exact_reduction=true"] if mode == "exact" else [])
            _ok(run_main(_args(pictures, out, *more, "train.per_device_batch_size=4"),
                         launcher=accelerate_cpu(nproc) if nproc > 1 else None))
            runs[mode, nproc] = load_weights(out)
    exact1, exact2 = runs["exact", 1], runs["exact", 2]
    assert all(torch.equal(exact1[k], exact2[k]) for k in exact1), "exact reduction: bit-identical on 1 and 2"
    d1, d2 = runs["default", 1], runs["default", 2]
    assert max((d1[k] - d2[k]).abs().max().item() for k in d1) < 1e-4  # the same batches; rounding apart


@pytest.mark.slow
def test_a_resume_with_other_pictures_is_refused_and_changes_nothing(pictures, tmp_path):
    mine = tmp_path / "pictures"
    shutil.copytree(pictures, mine)
    out = tmp_path / "run"
    _ok(run_main(_args(mine, out, "train.epochs=1")))
    write_pictures(mine / "train", [(40, 52)], channels=3, seed=9)  # p0.png replaced
    before = (out / "status.json").read_bytes()
    r = run_main(_args(mine, out, "train.epochs=2"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    [line] = error_lines(r.stderr)
    assert "data.fingerprint: saved" in line and "the training pictures it was trained on back in data.train_dir" in line
    assert (out / "status.json").read_bytes() == before


@pytest.mark.parametrize("case", ["empty", "unreadable", "mixed", "small", "model"])
def test_a_bad_picture_folder_is_one_line_and_leaves_no_run(pictures, tmp_path, case):
    train = tmp_path / "train"
    train.mkdir()
    more = []
    if case in ("unreadable", "small", "model"):
        shutil.copytree(pictures / "train", train, dirs_exist_ok=True)
    if case == "unreadable":
        (train / "notes.png").write_text("a text file with a picture's name")
    if case == "mixed":
        write_pictures(train, [(40, 40)], channels=3)
        write_pictures(train / "gray", [(40, 40)], channels=1)
        more = ["data.channels=0"]
    if case == "small":
        more = ["data.patch_size=48"]
    if case == "model":
        more = ["model.name=conv_denoiser"]
    out = tmp_path / "run"
    r = run_main(PICS + [f"data.train_dir={train}", f"data.test_dir={pictures / 'test'}", f"output_dir={out}", *more])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    [line] = error_lines(r.stderr)
    assert {"empty": "holds no pictures", "unreadable": "1 picture Pillow cannot read: notes.png",
            "mixed": "mixes gray and colour pictures", "small": "smaller than 48 pixels a side",
            "model": "must be unet with data.dataset=images"}[case] in line, line
    assert not out.exists()


@pytest.mark.slow
def test_the_photographs_benchmark_tabulates_every_method(pictures, tmp_path):
    run = tmp_path / "run"
    _ok(run_main(_args(pictures, run, "train.epochs=1")))
    out = tmp_path / "photos.json"
    r = subprocess.run([sys.executable, "bench/photos.py", "--work", str(tmp_path / "work"), "--sigmas", "25", "--run",
                        str(run), "--limit", "1", "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {(row["method"], row["picture"]) for row in report["rows"]} == {
        (m, "astronaut") for m in ("model", "nl_means", "bm3d", "noisy")}
    by = {row["method"]: row for row in report["rows"]}
    assert by["bm3d"]["psnr_db"] > by["nl_means"]["psnr_db"] > by["noisy"]["psnr_db"] + 5  # the classics work
    assert "| 25 | bm3d |" in report["table"] and sorted((tmp_path / "work" / "train").iterdir())
