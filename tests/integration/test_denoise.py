"""`python -m train.denoise`: a trained run's model applied to PNG files and .npy arrays."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import REPO, run_main
from train.denoise import SIDE, load_trained, main


@pytest.fixture(scope="module")
def run_dir(mnist_root, tmp_path_factory) -> Path:
    """A small U-Net trained for one epoch of 400 digits: enough to denoise visibly."""
    out = tmp_path_factory.mktemp("denoise") / "run"
    r = run_main(["--config", "configs/debug.yaml", f"data.root={mnist_root}", f"output_dir={out}",
                  "data.train_samples=400", "data.test_samples=20", "train.epochs=1", "train.lr=0.003",
                  "model.name=unet", "model.unet.channels=8", "model.unet.levels=2", "logging.wandb_mode=disabled"])
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def digits(mnist_root) -> np.ndarray:
    """Eight MNIST test digits, (8, 28, 28) uint8, white on black."""
    from train.data import load_mnist

    _, test = load_mnist(str(mnist_root), False, torch.device("cpu"), test_samples=8)
    return test.images[:, 0].numpy()


def _model_output(run_dir: Path, images: np.ndarray) -> np.ndarray:
    model, _ = load_trained(run_dir)
    with torch.no_grad():
        return model(torch.from_numpy(images.astype(np.float32) / 255).view(-1, 1, SIDE, SIDE)).numpy()


def test_png_in_png_out_any_size_and_polarity(run_dir, digits, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(digits[0]).save(inputs / "mnist.png")
    # A dark digit on light paper, 2x as large and not square: inverted, padded, shrunk.
    big = np.kron(255 - digits[1], np.ones((2, 2), dtype=np.uint8))
    Image.fromarray(np.pad(big, ((0, 0), (8, 8)), constant_values=255)).convert("RGB").save(inputs / "paper.png")
    assert main(["--checkpoint", str(run_dir), "--out", str(tmp_path / "out"), str(inputs)]) == 0
    with Image.open(tmp_path / "out" / "mnist.png") as im:
        assert im.size == (SIDE, SIDE) and im.mode == "L"
        got = np.asarray(im, dtype=np.float32) / 255
    # The same digit through the model directly: equal up to the PNG's 8-bit rounding.
    assert np.abs(got - _model_output(run_dir, digits[:1])[0, 0]).max() <= 0.5 / 255 + 1e-6
    with Image.open(tmp_path / "out" / "paper.png") as im:
        paper = np.asarray(im, dtype=np.float32) / 255
    assert im.size == (SIDE, SIDE)
    assert paper[0].mean() > 0.8 and paper.min() < 0.3  # written back dark on light, digit still there


def test_npy_batch_keeps_its_shape_and_matches_the_model(run_dir, digits, tmp_path):
    np.save(tmp_path / "batch.npy", digits)  # (8, 28, 28) uint8
    np.save(tmp_path / "one.npy", digits[0].astype(np.float64) / 255)  # (28, 28) float
    assert main(["--checkpoint", str(run_dir), "--out", str(tmp_path / "out"),
                 str(tmp_path / "batch.npy"), str(tmp_path / "one.npy")]) == 0
    batch = np.load(tmp_path / "out" / "batch.npy")
    assert batch.shape == (8, 28, 28) and batch.dtype == np.float32
    np.testing.assert_allclose(batch, _model_output(run_dir, digits)[:, 0], atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "out" / "one.npy"), batch[0], atol=1e-5)


def test_noise_factor_corrupts_first_and_the_model_cleans_it(run_dir, digits, tmp_path):
    np.save(tmp_path / "clean.npy", digits)
    args = ["--checkpoint", str(run_dir / "checkpoints" / "step_00000020"), "--noise-factor", "0.5",
            str(tmp_path / "clean.npy")]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    noisy, out = np.load(tmp_path / "a" / "clean_noisy.npy"), np.load(tmp_path / "a" / "clean.npy")
    assert np.array_equal(noisy, np.load(tmp_path / "b" / "clean_noisy.npy"))  # seeded: repeatable
    clean = digits.astype(np.float32) / 255
    assert ((out - clean) ** 2).mean() < 0.75 * ((noisy - clean) ** 2).mean()  # 20 steps of training: 0.57 measured


BAD_INPUTS = [
    ("missing", ["{tmp}/nope.png"], ["{tmp}/nope.png does not exist"]),
    ("not an image", ["{tmp}/text.png"], ["text.png is not an image", "PNG"]),
    ("wrong shape", ["{tmp}/wide.npy"], ["shape (3, 28, 30)", "(N, 28, 28)"]),
    ("out of range", ["{tmp}/big.npy"], ["outside [0, 1]", "uint8"]),
    ("same stem twice", ["{tmp}/d/a.npy", "{tmp}/e/a.npy"], ["would both be written", "--out"]),
]


@pytest.mark.parametrize("name,inputs,words", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_are_one_line_errors(run_dir, tmp_path, capsys, name, inputs, words):
    (tmp_path / "text.png").write_text("not a PNG")
    np.save(tmp_path / "wide.npy", np.zeros((3, 28, 30), dtype=np.uint8))
    np.save(tmp_path / "big.npy", np.full((2, 28, 28), 3.0))
    for sub in ("d", "e"):
        (tmp_path / sub).mkdir()
        np.save(tmp_path / sub / "a.npy", np.zeros((28, 28), dtype=np.uint8))
    code = main(["--checkpoint", str(run_dir), "--out", str(tmp_path / "out")] + [i.format(tmp=tmp_path) for i in inputs])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err
    for w in words:
        assert w.format(tmp=tmp_path) in err, (w, err)
    assert not (tmp_path / "out").exists()  # nothing written for a failed call


def test_checkpoint_problems_are_one_line_errors(run_dir, tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((28, 28), dtype=np.uint8))
    cases = []
    cases.append((tmp_path / "empty", ["has no model.safetensors", "output_dir"]))
    (tmp_path / "empty").mkdir()
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "model.safetensors").write_bytes((run_dir / "model.safetensors").read_bytes())
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    cfg["model"]["name"] = "transformer9000"
    (unknown / "config.yaml").write_text(yaml.safe_dump(cfg))
    cases.append((unknown, ["cannot read", "'model.name' must be one of: conv_denoiser, unet", "transformer9000"]))
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "model.safetensors").write_bytes((run_dir / "model.safetensors").read_bytes()[:100])
    (damaged / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    cases.append((damaged, ["could not be loaded into model unet", "damaged"]))
    for name, text in (("torn", "model: {name: unet\n  train: ["), ("a list", "- model\n- unet\n"),
                       ("a model that is a string", "model: unet\n")):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model.safetensors").write_bytes((run_dir / "model.safetensors").read_bytes())
        (folder / "config.yaml").write_text(text)
        cases.append((folder, ["has a config this version cannot read"]))
    for path, words in cases:
        assert main(["--checkpoint", str(path), str(tmp_path / "x.npy"), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err
        for w in words:
            assert w in err, (w, err)


def test_the_cli_runs_as_a_module_with_one_line_errors(run_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "train.denoise", "--checkpoint", str(run_dir)]
    r = subprocess.run(cmd + ["--noise-factor", "lots", "x.png"], cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "--noise-factor" in r.stderr
    if not torch.cuda.is_available():
        r = subprocess.run(cmd + ["--device", "cuda", "x.png"], cwd=REPO, env=env, capture_output=True, text=True)
        assert r.returncode == 2 and "no CUDA GPU here" in r.stderr
    if not torch.backends.mps.is_available():  # a device torch names, absent on this machine
        r = subprocess.run(cmd + ["--device", "mps", "x.png"], cwd=REPO, env=env, capture_output=True, text=True)
        assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "--device mps is not a device this machine has" in r.stderr


def test_noisy_copies_never_collide_with_another_inputs_output(run_dir, digits, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("b", "b_noisy"):
        Image.fromarray(digits[0]).save(inputs / f"{name}.png")
    args = ["--checkpoint", str(run_dir), "--out", str(tmp_path / "out"), str(inputs)]
    assert main(args + ["--noise-factor", "0.5"]) == 2
    err = capsys.readouterr().err
    assert f"inputs {inputs / 'b.png'} and {inputs / 'b_noisy.png'} would both be written to" in err
    assert not (tmp_path / "out").exists()
    assert main(args) == 0  # without noisy copies the names do not meet
    assert capsys.readouterr().out.startswith("denoised 2 images from 2 files")
    assert main(["--checkpoint", str(run_dir), "--out", str(tmp_path / "one"), str(inputs / "b.png")]) == 0
    assert capsys.readouterr().out.startswith("denoised 1 image from 1 file with")


def test_results_already_in_out_are_refused_unless_overwrite_which_replaces_links(run_dir, digits, tmp_path, capsys):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    Image.fromarray(digits[0]).save(inputs / "a.png")
    np.save(inputs / "b.npy", digits[:3])
    args = ["--checkpoint", str(run_dir), "--out", str(out), str(inputs)]
    assert main(args) == 0
    first = {name: (out / name).read_bytes() for name in ("a.png", "b.npy")}
    capsys.readouterr()
    # Someone's files where the results go: a file of their own, and a link to one elsewhere.
    (out / "a.png").write_bytes(b"the user's own file")
    elsewhere = tmp_path / "elsewhere.npy"
    elsewhere.write_bytes(b"not ours")
    (out / "b.npy").unlink()
    (out / "b.npy").symlink_to(elsewhere)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"error: {out / 'a.png'} already exists (and 1 more of the files this run writes): "
                           f"choose a new --out folder, or pass --overwrite to replace the results there; "
                           f"nothing was written")
    assert (out / "a.png").read_bytes() == b"the user's own file" and elsewhere.read_bytes() == b"not ours"
    assert main(args + ["--overwrite"]) == 0
    assert not (out / "b.npy").is_symlink() and elsewhere.read_bytes() == b"not ours"  # replaced, not followed
    assert {name: (out / name).read_bytes() for name in first} == first
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.npy"]  # no temporary file left


@pytest.fixture(scope="module")
def picture_run(tmp_path_factory) -> Path:
    """A gray picture model (data.dataset=images), untrained: what it outputs does not matter here."""
    from safetensors.torch import save_file

    from train.config import load_config
    from train.model import build_model

    run = tmp_path_factory.mktemp("pictures") / "run"
    run.mkdir()
    cfg = load_config(None, ["data.dataset=images", "data.train_dir=x", "data.test_dir=x", "data.channels=1",
                             "model.name=unet", "model.unet.channels=4", "model.unet.levels=1"])
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    save_file(build_model("unet", **cfg.model.settings(), **cfg.data.model_settings()).state_dict(),
              str(run / "model.safetensors"))
    return run


def test_a_folder_of_pictures_is_denoised_one_picture_at_a_time(picture_run, tmp_path, capsys):
    """However many pictures a folder holds, one is held at a time (numpy's allocations, traced)."""
    import tracemalloc

    from conftest import write_pictures

    write_pictures(tmp_path / "in", [(600, 600)] * 24, channels=1)  # 1.4 MB each as float32, 35 MB in all
    tracemalloc.start()
    try:
        assert main(["--checkpoint", str(picture_run), "--out", str(tmp_path / "out"), str(tmp_path / "in")]) == 0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert capsys.readouterr().out.startswith("denoised 24 pictures (8.64 megapixels) at full size")
    assert len(list((tmp_path / "out").iterdir())) == 24
    assert peak < 16 * 2**20, f"{peak / 2**20:.0f} MiB held"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_ctrl_c_or_a_kill_is_one_line_and_leaves_only_whole_results(picture_run, tmp_path, signum):
    import time

    from conftest import write_pictures

    write_pictures(tmp_path / "in", [(800, 800)] * 6, channels=1)
    out = tmp_path / "out"
    # Tiles of 16 pixels: about a second a picture, so the signal lands before the last one.
    proc = subprocess.Popen([sys.executable, "-m", "train.denoise", "--checkpoint", str(picture_run), "--tile", "16",
                             "--out", str(out), str(tmp_path / "in")], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "p0.png").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signum)  # mid-picture: writing p1.png or denoising it
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum and err.strip() == ("error: interrupted: each result written so far is whole; "
                                                      "run the same command with --overwrite to finish")
    written = sorted(p.name for p in out.iterdir())
    assert written and len(written) < 6 and all(not n.startswith(".") for n in written)  # no temporary file
    for name in written:
        with Image.open(out / name) as im:
            im.load()  # whole


def test_names_with_dots_keep_every_output(run_dir, digits, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i, name in enumerate(("scan.v1.png", "scan.v2.png", "2024.01.05.png")):
        Image.fromarray(digits[i]).save(inputs / name)
    out = tmp_path / "out"
    assert main(["--checkpoint", str(run_dir), "--out", str(out), "--noise-factor", "0.5", str(inputs)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["2024.01.05.png", "2024.01.05_noisy.png", "scan.v1.png",
                                                    "scan.v1_noisy.png", "scan.v2.png", "scan.v2_noisy.png"]
    assert capsys.readouterr().out.startswith("denoised 3 images from 3 files")


def test_a_picture_is_written_in_its_own_format_where_pillow_keeps_its_mode_else_as_png():
    from train.denoise import Item, _suffix

    def suffix(name: str, mode: str) -> str:
        alpha = np.zeros((2, 2), np.uint8) if mode.endswith("A") else None
        return _suffix(Item(Path(name), torch.zeros(1), "picture", mode=mode, alpha=alpha))

    kept = [("a.png", "I;16"), ("a.PNG", "RGBA"), ("a.jpg", "L"), ("a.tif", "I;16"), ("a.gif", "RGBA"),
            ("a.webp", "RGB")]
    assert [suffix(name, mode) for name, mode in kept] == [Path(name).suffix for name, _ in kept]
    # No suffix, formats Pillow only reads, and modes a format cannot hold (JPEG has no alpha or
    # 16 bits, BMP no 16 bits, WebP stores gray as RGB) come back as PNG, which holds them all.
    png = [("scan", "RGB"), ("a.psd", "RGB"), ("a.xpm", "L"), ("a.jpg", "RGBA"), ("a.bmp", "I;16"), ("a.webp", "L")]
    assert [suffix(name, mode) for name, mode in png] == [".png"] * len(png)


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height grey pixels (all a reader checks before decoding)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def test_inputs_are_never_overwritten_and_odd_images_are_handled(run_dir, digits, tmp_path, capsys):
    def denoise(*args: str) -> tuple[int, str]:
        code = main(["--checkpoint", str(run_dir), *args])
        return code, capsys.readouterr().err

    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(digits[0]).save(folder / "a.png")
    original = (folder / "a.png").read_bytes()
    (tmp_path / "link").symlink_to(folder)
    for out in (folder, tmp_path / "link"):  # the input folder, however it is reached
        code, err = denoise("--out", str(out), str(folder))
        assert code == 2 and err.strip() == (f"error: writing {out / 'a.png'} would overwrite the input file of "
                                             f"that name: choose an --out folder that holds no inputs (e.g. --out "
                                             f"denoised)")
        assert (folder / "a.png").read_bytes() == original
    _png_header_only(tmp_path / "bomb.png", 14000, 14000)
    code, err = denoise("--out", str(tmp_path / "o"), str(tmp_path / "bomb.png"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"{tmp_path / 'bomb.png'} has more than" in err and "use smaller pictures" in err
    # Dark strokes on a transparent background (RGB black everywhere; the digit is in alpha).
    rgba = np.zeros((SIDE, SIDE, 4), dtype=np.uint8)
    rgba[..., 3] = digits[2]
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "ink.png")
    code, err = denoise("--out", str(tmp_path / "o"), str(tmp_path / "ink.png"))
    assert code == 0, err
    with Image.open(tmp_path / "o" / "ink.png") as im:
        got = 1 - np.asarray(im, dtype=np.float32) / 255  # written back dark on light, as it shows
    assert np.abs(got - _model_output(run_dir, digits[2:3])[0, 0]).max() <= 0.5 / 255 + 1e-6


@pytest.mark.gpu
def test_gpu_gives_the_cpu_result(run_dir, digits, tmp_path):
    np.save(tmp_path / "b.npy", digits)
    for device in ("cpu", "cuda"):
        assert main(["--checkpoint", str(run_dir), "--device", device, "--out", str(tmp_path / device),
                     str(tmp_path / "b.npy")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "cuda" / "b.npy"), np.load(tmp_path / "cpu" / "b.npy"), atol=1e-4)
