"""Denoise digits, or your own pictures at full size, with a trained model.

    python -m train.denoise --checkpoint outputs/unet noisy/*.png           # -> denoised/*.png
    python -m train.denoise --checkpoint outputs/unet batch.npy --out out/  # -> out/batch.npy
    python -m train.denoise --checkpoint outputs/unet --noise-factor 0.5 clean_digits/  # demo

`--checkpoint` is a finished run's output_dir (model.safetensors + config.yaml) or one of its
checkpoints/step_* folders; the model and its settings come from the saved config.yaml, so
no training YAML is needed. Inputs are image files (anything Pillow reads), folders of them,
or .npy arrays.

Images are made to look like MNIST: converted to grayscale (an image with transparency is
first laid on a background that contrasts with its strokes, so dark strokes on a transparent
background read as the digit they show); inverted when the background is
light (the median of the border pixels is above one half), since MNIST digits are light on
dark; padded to a square with the background; resized to 28x28 (area averaging). The output
is the denoised 28x28 digit, inverted back to the input's polarity. A .npy array holds
(28, 28), (N, 28, 28) or (N, 1, 28, 28) images, uint8 in [0, 255] or float in [0, 1]; the
output .npy has the same shape, float32 in [0, 1].

A model trained on pictures (data.dataset=images) denoises each picture at its own size and
writes it back in its own format, size, mode and bit depth (8- or 16-bit gray, RGB; alpha
kept as it was; palette and CMYK pictures come back as RGB, or gray where all their colours
are, 1-bit ones as 8-bit gray; as PNG where Pillow cannot write that format in that mode):
big pictures go through the model in tiles (--tile, with overlap, no seams), and a folder's
pictures one at a time, so memory stays bounded. --noise-sigma S corrupts them first (0-255 scale).

`--noise-factor F` corrupts the inputs first with the checkpoint's noise kind (or
`--noise-kind`) at level F and also writes the noisy versions (`*_noisy.*`): a way to see
the model work on clean digits. No input file is ever overwritten: an --out that would do so
is refused, as is one that already holds a file of this run's results, unless --overwrite
(each result is written whole, and a link in --out is replaced, never written through).
Exit status 0 done, 2 a mistake to fix (one line on stderr), 128 + the signal's number when
interrupted (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP: each result written so far is whole).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from train.errors import UserError, brief, counted
from train.rundir import WEIGHTS, write_atomic

SIDE = 28  # pixels: MNIST digits
CONFIG = "config.yaml"


class DenoiseError(UserError):
    """An input or checkpoint the denoiser cannot use."""


def load_trained(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, object]:
    """The model of a run folder (or one of its checkpoints/step_* folders) and the run's
    config, in eval mode on `device`."""
    from train.config import ConfigError, load_config
    from train.model import build_model

    path = Path(path)
    weights = path / WEIGHTS
    run_dir = path if (path / CONFIG).is_file() else path.parent.parent  # checkpoints/step_N -> run folder
    if not weights.is_file() or not (run_dir / CONFIG).is_file():
        missing = WEIGHTS if not weights.is_file() else f"{CONFIG} (looked in {run_dir})"
        raise DenoiseError(f"checkpoint {path} has no {missing}: give a finished run's output_dir "
                           f"or one of its checkpoints/step_* folders")
    try:
        cfg = load_config(run_dir / CONFIG)  # a model this version cannot build is refused as model.name
    except ConfigError as e:
        raise DenoiseError(f"checkpoint {path} has a config this version cannot read ({e}): use the version "
                           f"of mnist-denoise that trained it") from e
    from safetensors.torch import load_file

    model = build_model(cfg.model.name, **cfg.model.settings(), **cfg.data.model_settings())
    try:
        model.load_state_dict(load_file(str(weights)))
    except Exception as e:  # safetensors and load_state_dict raise several types
        raise DenoiseError(f"checkpoint {weights} could not be loaded into model {cfg.model.name} ({brief(e)}): "
                           f"it is damaged or from another run; retrain or pick another checkpoint") from e
    return model.to(device).eval(), cfg


# -- inputs ---------------------------------------------------------------------------------
@dataclass
class Item:
    """One input file: its images as the model sees them, float32 in [0, 1] ((N, 1, 28, 28)
    digits, or one (1, C, H, W) picture), and how to write the result back."""

    source: Path
    images: torch.Tensor | None  # None: a picture not read yet (read_inputs)
    kind: str  # "image" or "npy"; "picture" for a model trained on pictures (full size)
    inverted: bool = False
    npy_shape: tuple[int, ...] = ()
    mode: str = ""  # a picture's Pillow mode, written back as it was
    alpha: np.ndarray | None = None  # a picture's transparency, kept as it was


def _read(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """images.read_picture's (H x W x C array, transparency), or one DenoiseError."""
    from train.images import read_picture

    try:
        return read_picture(path)
    except ValueError as e:
        raise DenoiseError(f"input {path} is not an image Pillow can read ({e}): give PNG, JPEG or TIFF images "
                           f"(or .npy arrays of digits)") from None


def _as_float(array: np.ndarray) -> torch.Tensor:
    """(H, W, C) uint8 or uint16 as (1, C, H, W) float32 in [0, 1]."""
    scale = 65535.0 if array.dtype == np.uint16 else 255.0
    return torch.from_numpy(array.astype(np.float32).transpose(2, 0, 1) / scale)[None]


def _read_digit(path: Path) -> Item:
    """An image made to look like MNIST (see the module's docstring)."""
    from train.images import to_channels

    array, alpha = _read(path)
    x = _as_float(to_channels(array, 1))[0, 0]
    if alpha is not None:  # transparent pixels take the background that contrasts with the strokes
        a = torch.from_numpy(alpha.astype(np.float32) / 255.0)
        strokes = float((x * a).sum() / max(float(a.sum()), 1e-6))  # mean grey of what is visible
        x = x * a + (1.0 if strokes < 0.5 else 0.0) * (1.0 - a)
    border = torch.cat([x[0], x[-1], x[:, 0], x[:, -1]])
    inverted = bool(border.median() > 0.5)  # dark digit on light paper: MNIST is the other way round
    if inverted:
        x = 1.0 - x
    h, w = x.shape
    if (h, w) != (SIDE, SIDE):
        side = max(h, w)  # pad to a square with the (now dark) background, centred, then shrink
        top, left = (side - h) // 2, (side - w) // 2
        x = F.pad(x, (left, side - w - left, top, side - h - top))
        x = F.interpolate(x[None, None], size=(SIDE, SIDE), mode="area")[0, 0]
    return Item(path, x.clamp(0, 1).view(1, 1, SIDE, SIDE), "image", inverted)


def _read_npy(path: Path) -> Item:
    try:
        a = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DenoiseError(f"input {path} is not a readable .npy array ({brief(e)}): save it with numpy.save") from e
    shape = tuple(a.shape)
    if shape[-2:] != (SIDE, SIDE) or len(shape) not in (2, 3, 4) or (len(shape) == 4 and shape[1] != 1):
        raise DenoiseError(f"input {path} has shape {shape}: give (28, 28), (N, 28, 28) or (N, 1, 28, 28) images")
    if a.dtype == np.uint8:
        x = torch.from_numpy(a.astype(np.float32) / 255.0)
    elif np.issubdtype(a.dtype, np.floating):
        x = torch.from_numpy(a.astype(np.float32))
        if x.numel() and not (torch.isfinite(x).all() and x.min() >= 0 and x.max() <= 1):
            raise DenoiseError(f"input {path} holds floats outside [0, 1] (or NaN): scale them to [0, 1] or give uint8")
    else:
        raise DenoiseError(f"input {path} has dtype {a.dtype}: give uint8 (0-255) or float (0-1) images")
    return Item(path, x.reshape(-1, 1, SIDE, SIDE), "npy", npy_shape=shape)


def _mode_of(array: np.ndarray, alpha: np.ndarray | None) -> str:
    """The Pillow mode a picture read by `_read` is written back in."""
    if array.dtype == np.uint16:
        return "I;16"
    return ("L" if array.shape[2] == 1 else "RGB") + ("A" if alpha is not None else "")


def _read_picture(path: Path) -> Item:
    """A picture at its own size, with the mode it is written back in and its transparency."""
    array, alpha = _read(path)
    return Item(path, _as_float(array), "picture", mode=_mode_of(array, alpha), alpha=alpha)


def _write_picture(item: Item, pixels: torch.Tensor, target: io.BytesIO, fmt: str) -> None:
    """`pixels` (1, C, H, W) in [0, 1] as a picture of `item`'s mode in Pillow's format `fmt`."""
    from PIL import Image

    if item.mode == "I;16":
        Image.fromarray((pixels[0, 0] * 65535.0).round().numpy().astype(np.uint16)).save(target, fmt)  # mode I;16
        return
    array = (pixels[0] * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()
    if item.alpha is not None:
        array = np.concatenate([array, item.alpha[..., None]], axis=2)
    array = array[..., 0] if array.shape[2] == 1 else array
    kept = {"quality": 95} if fmt == "JPEG" else {}
    Image.fromarray(array).save(target, fmt, **kept)  # uint8 with 1, 2, 3 or 4 channels: L, LA, RGB or RGBA


@functools.cache
def _writes_back(suffix: str, mode: str) -> bool:
    """Whether Pillow writes a picture of `mode` in the format of `suffix` so that it reads back
    in that mode (bit depth and transparency kept): tried on a 2 x 2 picture. False for a suffix
    Pillow only reads (.psd, .xpm, ...) or none."""
    from PIL import Image

    fmt = Image.registered_extensions().get(suffix)  # after Pillow has loaded every format
    if fmt not in Image.SAVE:
        return False
    channels = 1 if mode in ("L", "LA", "I;16") else 3
    alpha = np.array([[0, 255], [255, 0]], dtype=np.uint8) if mode.endswith("A") else None
    probe = Item(Path(f"probe{suffix}"), None, "picture", mode=mode, alpha=alpha)  # type: ignore[arg-type]
    buffer = io.BytesIO()
    try:
        _write_picture(probe, torch.linspace(0, 1, channels * 4).view(1, channels, 2, 2), buffer, fmt)
        from train.images import read_picture

        return _mode_of(*read_picture(probe.source, buffer.getvalue())) == mode
    except (OSError, ValueError):  # what Pillow raises for a mode a format cannot hold
        return False


@torch.no_grad()
def denoise_picture(model: nn.Module, picture: torch.Tensor, channels: int, device: torch.device,
                    tile: int) -> torch.Tensor:
    """The model's output for one picture (1, C, H, W), tiled (images.denoise_tiled), on the CPU.
    A gray model denoises each channel of a colour picture alone; a colour model sees a gray
    picture as three equal channels, and their mean comes back."""
    from train.images import denoise_tiled

    x = picture.to(device)
    if x.shape[1] != channels:
        x = x.transpose(0, 1) if channels == 1 else x.expand(-1, 3, -1, -1)
    out = denoise_tiled(model, x, tile=tile).float().clamp_(0, 1)
    if out.shape[1] != picture.shape[1]:
        out = out.transpose(0, 1) if channels == 1 else out.mean(1, keepdim=True)
    return out.cpu()


def read_inputs(paths: list[str], pictures: bool = False) -> list[Item]:
    """Every input, in order; a folder stands for the files directly in it (sorted). A picture's
    pixels are not kept (`images` None): `run` reads each again as it denoises it, so that one
    picture at a time is held, however many there are."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
        elif p.is_file():
            files.append(p)
        else:
            raise DenoiseError(f"input {p} does not exist: give image files, .npy files or folders of them")
    if not files:
        raise DenoiseError(f"no input files in {', '.join(paths)}: give image files, .npy files or folders of them")
    if pictures:  # read whole once here: a picture Pillow cannot read is refused before any is written
        return [dataclasses.replace(_read_picture(f), images=None, alpha=None) for f in files]
    return [_read_npy(f) if f.suffix.lower() == ".npy" else _read_digit(f) for f in files]


# -- outputs --------------------------------------------------------------------------------
def _suffix(item: Item) -> str:
    """.npy for arrays, .png for digits; a picture keeps its own format where Pillow writes it
    back in the picture's mode, else PNG (which holds every mode read)."""
    if item.kind != "picture":
        return ".npy" if item.kind == "npy" else ".png"
    return item.source.suffix if _writes_back(item.source.suffix.lower(), item.mode) else ".png"


def _write(item: Item, images: torch.Tensor, path: Path) -> None:
    """`images` as `path`'s file, whole: a temporary file renamed over it (rundir.write_atomic)."""
    from PIL import Image

    data = io.BytesIO()
    if item.kind == "picture":
        _write_picture(item, images, data, Image.registered_extensions()[path.suffix.lower()])
    elif item.kind == "npy":
        np.save(data, images.reshape(item.npy_shape).numpy())
    else:
        x = 1.0 - images[0, 0] if item.inverted else images[0, 0]
        Image.fromarray((x * 255.0).round().to(torch.uint8).numpy(), mode="L").save(data, "PNG")
    write_atomic(path, data.getvalue())


def _out_paths(items: list[Item], out_dir: Path, noisy: bool, overwrite: bool) -> list[tuple[Path, Path]]:
    """Each item's (denoised, noisy) output file: the input's name with its last suffix
    replaced, `_noisy` before it. Refuses two outputs on one file (e.g. b.png's noisy copy and
    b_noisy.png's result), an output on an input, and, unless `overwrite`, on any file there."""
    pairs = [(out_dir / f"{item.source.stem}{_suffix(item)}", out_dir / f"{item.source.stem}_noisy{_suffix(item)}")
             for item in items]
    seen: dict[Path, Path] = {}  # every file the run writes, and the input it is for
    inputs = {item.source.resolve() for item in items}
    for pair, item in zip(pairs, items):
        for out in pair if noisy else pair[:1]:
            if out in seen:
                raise DenoiseError(f"inputs {seen[out]} and {item.source} would both be written to {out}: "
                                   f"rename one, or denoise them in two runs with different --out")
            seen[out] = item.source
            if out.resolve() in inputs:
                raise DenoiseError(f"writing {out} would overwrite the input file of that name: "
                                   f"choose an --out folder that holds no inputs (e.g. --out denoised)")
    there = [out for out in seen if os.path.lexists(out)]
    if there and not overwrite:
        more = f" (and {len(there) - 1} more of the files this run writes)" if len(there) > 1 else ""
        raise DenoiseError(f"{there[0]} already exists{more}: choose a new --out folder, or pass --overwrite to "
                           f"replace the results there; nothing was written")
    return pairs


@torch.no_grad()
def denoise(model: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int) -> torch.Tensor:
    """The model's output for (N, 1, 28, 28) images in [0, 1], in batches, back on the CPU."""
    outs = [model(chunk.to(device)).float().clamp_(0, 1).cpu() for chunk in images.split(batch_size)]
    return torch.cat(outs) if outs else images.clone()


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DenoiseError(f"--device {name} asked for, but there is no CUDA GPU here: use --device cpu (or auto)")
    try:
        device = torch.device(name)
        torch.empty(1, device=device)  # a device torch knows of may still be absent here (mps on Linux)
    except (RuntimeError, AssertionError) as e:
        raise DenoiseError(f"--device {name} is not a device this machine has ({brief(e)}): use auto, cpu or cuda") from e
    return device


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        raise DenoiseError(f"{message}: usage is python -m train.denoise --checkpoint OUTPUT_DIR "
                           f"[--noise-factor F] [--out DIR] inputs...")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _ArgumentParser(prog="python -m train.denoise", description=__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    # type=expanduser: the shell leaves ~ alone in --out=~/x (as the config's paths are)
    parser.add_argument("--checkpoint", required=True, type=os.path.expanduser,
                        help="a run's output_dir or a checkpoints/step_* folder")
    parser.add_argument("inputs", nargs="+", help="image files, .npy files, or folders of them")
    parser.add_argument("--out", default="denoised", type=os.path.expanduser,
                        help="folder for the results (default: denoised)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace result files already in --out (default: refuse them)")
    parser.add_argument("--noise-factor", type=float, help="corrupt the inputs at this level first (a demo)")
    parser.add_argument("--noise-kind", choices=("gaussian", "salt_pepper"),
                        help="noise for --noise-factor (default: the one the model was trained on)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --noise-factor noise")
    parser.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda or cuda:N")
    parser.add_argument("--batch-size", type=int, default=1000, help="images per forward pass")
    parser.add_argument("--noise-sigma", type=float,
                        help="pictures: corrupt them first with Gaussian noise of this std, 0-255 scale (a demo)")
    parser.add_argument("--tile", type=int, default=256,
                        help="pictures: side of the tiles a big picture is denoised in, a multiple of 4 (memory)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors too")
    args = parser.parse_args(argv)
    if args.noise_factor is not None and not args.noise_factor >= 0:
        raise DenoiseError(f"--noise-factor must be >= 0, got {args.noise_factor}")
    if args.batch_size < 1:
        raise DenoiseError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.noise_sigma is not None:
        if not 0 <= args.noise_sigma <= 255:
            raise DenoiseError(f"--noise-sigma is a std on the 0-255 scale: give 0 to 255, got {args.noise_sigma}")
        if args.noise_factor is not None:
            raise DenoiseError("--noise-sigma and --noise-factor both set the noise: give one of them")
        args.noise_factor, args.noise_kind = args.noise_sigma / 255, "gaussian"
    if args.tile < 16 or args.tile % 4:
        raise DenoiseError(f"--tile must be a multiple of 4, at least 16 pixels, got {args.tile}")
    return args


def run(args: argparse.Namespace) -> int:
    from train import noise

    t0 = time.perf_counter()
    device = _device(args.device)
    model, cfg = load_trained(args.checkpoint, device)
    pictures = cfg.data.dataset == "images"  # each picture at its own size, mode and bit depth
    items = read_inputs(args.inputs, pictures)
    out_dir = Path(args.out)
    paths = _out_paths(items, out_dir, noisy=args.noise_factor is not None, overwrite=args.overwrite)
    spec = None
    if args.noise_factor is not None:
        kind = args.noise_kind or cfg.noise.kind
        if kind == "salt_pepper" and args.noise_factor > 1:
            raise DenoiseError(f"--noise-factor {args.noise_factor} is a fraction of pixels for salt_pepper: give <= 1")
        spec = noise.NoiseSpec(kind, args.noise_factor, args.noise_factor)
    done = pixels = 0
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for item, (path, noisy_path) in zip(items, paths):
            item = _read_picture(item.source) if pictures else item
            images = item.images
            if spec is not None:  # sample k of the call is keyed by k, whichever file holds it
                index = torch.arange(done, done + len(images))
                images = noise.add_noise(images, index, spec, args.seed, noise.EVAL_EPOCH, wide=pictures)
                _write(item, images, noisy_path)
            clean = denoise_picture(model, images, cfg.data.channels, device, args.tile) if pictures else \
                denoise(model, images, device, args.batch_size)
            _write(item, clean, path)
            done, pixels = done + len(images), pixels + images[0, 0].numel() * len(images)
    except OSError as e:
        raise DenoiseError(f"cannot write to {out_dir} ({e.strerror}): choose a writable --out folder") from e
    what = f"{counted(done, 'picture')} ({pixels / 1e6:.2f} megapixels) at full size" if pictures else \
        f"{counted(done, 'image')} from {counted(len(items), 'file')}"
    print(f"denoised {what} with {cfg.model.name} on {device} in {time.perf_counter() - t0:.1f} s: {out_dir}/")
    return 0


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt(signum)


def main(argv: list[str] | None = None) -> int:
    debug = "--debug" in (sys.argv[1:] if argv is None else argv) or os.environ.get("DENOISE_DEBUG") == "1"
    for sig in (signal.SIGTERM, signal.SIGHUP):  # a kill or a closed terminal ends it as Ctrl-C does
        if signal.getsignal(sig) != signal.SIG_IGN:  # under nohup: asked to outlive the terminal
            signal.signal(sig, _interrupt)
    try:
        return run(parse_args(argv))
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or a signal `_interrupt` took
        if debug:
            raise
        print("error: interrupted: each result written so far is whole; run the same command with --overwrite to "
              "finish", file=sys.stderr, flush=True)
        return 128 + (e.args[0] if e.args else signal.SIGINT)


if __name__ == "__main__":
    sys.exit(main())
