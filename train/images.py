"""Your own pictures (data.dataset=images): folders of PNG, JPEG or TIFF, read once and held on
the training device, as MNIST is.

Training draws square patches. Sample k of an epoch is a patch of picture k % N (N pictures,
data.patches_per_image samples each), at a position and in one of the 8 flips and rotations
that are hashes of (seed, epoch, k): like the noise, the same on any number of processes, in
any batch, after any resume. Evaluation scores each test picture whole (metrics.evaluate_pictures),
in tiles where it is large (`denoise_tiled`), which `python -m train.denoise` uses too.

What a checkpoint of such a run means includes its training pictures: `fingerprint` is a
digest of their names and bytes, and a resume with other pictures is refused.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from train.errors import DataError, counted
from train.noise import _mix32, _signed32, _uniforms

EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
TILE = 256  # pixels: the core of each tile a big picture is denoised in (memory stays bounded)
MARGIN = 32  # pixels of context around each tile: more than the U-Net's receptive radius (a test measures it)
_PATCH_SALT = _signed32(0x85EBCA6B)  # separates the patch-position stream from the noise's


def find_pictures(folder: str | Path, key: str) -> list[Path]:
    """The pictures under `folder` (recursively, through linked subfolders, each folder once; sorted),
    or one DataError naming `key`."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"{key}={folder} is not a folder: point it at a folder of PNG, JPEG or TIFF pictures")
    def identity(path: str | Path) -> tuple[int, int]:
        st = os.stat(path)
        return st.st_dev, st.st_ino

    found = []
    seen = {identity(p) for p in root.resolve().parents}  # a link up the tree would take in all of it
    for top, folders, files in os.walk(root, followlinks=True):  # a linked subfolder's pictures count too
        folders.sort()  # the same walk everywhere: which of two ways to one folder counts is fixed
        if identity(top) in seen:  # reached again through a link (a loop, or a second way): once only
            folders.clear()
            continue
        seen.add(identity(top))
        found += [Path(top, f) for f in files if Path(f).suffix.lower() in EXTENSIONS and Path(top, f).is_file()]
    found.sort()
    if not found:
        raise DataError(f"{key}={folder} holds no pictures ({', '.join(EXTENSIONS)}, searched recursively): "
                        f"put some there or point {key} elsewhere")
    return found


def read_picture(path: Path, data: bytes | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """The picture at `path` (its bytes `data`, if already read) as an H x W x C array (C 1 or 3)
    of uint8, or uint16 for a 16-bit gray one, and its transparency (H x W uint8; None when it
    has none). Raises ValueError (unreadable) or DataError (too large)."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # Pillow only warns up to 2x its limit
        try:
            with Image.open(io.BytesIO(data) if data is not None else path) as im:
                im.load()
                picture = im.copy()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise DataError(f"{path} has more than {Image.MAX_IMAGE_PIXELS:,} pixels, Pillow's limit for a picture "
                            f"that could be a decompression bomb: use smaller pictures (or crop this one)") from None
        except (OSError, SyntaxError) as e:
            raise ValueError(str(e) or type(e).__name__) from None
    if picture.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(picture)
        if array.min() < 0 or array.max() > 65535:
            raise ValueError(f"{picture.mode} values outside 0-65535")
        return array.astype(np.uint16)[:, :, None], None
    if picture.mode == "F":
        raise ValueError("32-bit floating-point pixels (save it as an 8- or 16-bit picture)")
    clear = "A" in picture.getbands() or "transparency" in picture.info
    alpha = np.asarray(picture.convert("RGBA"))[..., 3].copy() if clear else None
    gray = picture.mode in ("1", "L", "LA") or (picture.mode == "P" and _gray_palette(picture))
    array = np.asarray(picture.convert("L" if gray else "RGB"))
    return (array[:, :, None] if gray else array), alpha


def _gray_palette(picture) -> bool:
    rgb = np.asarray(picture.convert("RGB"))
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())


def to_channels(array: np.ndarray, channels: int) -> np.ndarray:
    """`array` (H x W x C) with `channels` channels: gray repeated, or colour as luminance
    (ITU-R 601, as Pillow's conversion to gray)."""
    if array.shape[2] == channels:
        return array
    if channels == 3:
        return np.repeat(array, 3, axis=2)
    luma = array.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    return np.rint(luma).astype(array.dtype)[:, :, None]


@dataclass
class Pictures:
    """Pictures of any sizes and one channel count, on one device: one flat tensor of their
    pixels (uint8, or float32 in [0, 1] when any is 16-bit) and where each one starts."""

    pixels: torch.Tensor
    offsets: torch.Tensor  # int64 (N,): where picture i starts in `pixels`
    heights: torch.Tensor  # int64 (N,)
    widths: torch.Tensor  # int64 (N,)
    channels: int
    paths: list[Path]
    fingerprint: str  # digest of the pictures' names and bytes

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def mib(self) -> float:
        return self.pixels.numel() * self.pixels.element_size() / 2**20

    def picture(self, i: int) -> torch.Tensor:
        """Picture i as (1, C, H, W) float32 in [0, 1]."""
        h, w, start = int(self.heights[i]), int(self.widths[i]), int(self.offsets[i])
        flat = self.pixels[start:start + self.channels * h * w].view(1, self.channels, h, w)
        return _as_float(flat)


def _as_float(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.to(torch.float32).div_(255.0) if pixels.dtype == torch.uint8 else pixels.to(torch.float32)


def load_pictures(folder: str, key: str, channels: int, device: torch.device, memory_limit_mib: float,
                  min_side: int = 11) -> Pictures:
    """Every picture under `folder`, with `channels` channels (0: as they are, all alike), each
    at least `min_side` pixels a side, taking at most `memory_limit_mib` on `device`; every
    problem is one DataError naming the files."""
    paths = find_pictures(folder, key)
    least = sum(map(_pixel_count, paths))  # bytes: a decoded pixel takes at least one (uint8, one channel)
    if least > memory_limit_mib * 2**20:  # refused before the host holds more than one picture
        raise _over_limit(key, folder, f"at least {least / 2**20:,.1f} MiB decoded", memory_limit_mib)
    arrays, unreadable, digest = [], [], hashlib.sha256()
    for path in paths:
        try:
            data = path.read_bytes()
            arrays.append(read_picture(path, data)[0])  # the bytes read once: the digest and the picture
        except (OSError, ValueError) as e:
            unreadable.append(f"{path.relative_to(folder)} ({e})")
            continue
        digest.update(f"{path.relative_to(folder).as_posix()}\0{hashlib.sha256(data).hexdigest()}\0".encode())
    if unreadable:
        shown = "; ".join(unreadable[:3]) + (f" and {len(unreadable) - 3} more" if len(unreadable) > 3 else "")
        raise DataError(f"{key}={folder}: {counted(len(unreadable), 'picture')} Pillow cannot read: {shown}: "
                        f"remove or replace them")
    counts = {a.shape[2] for a in arrays}
    if channels == 0 and len(counts) > 1:
        gray = next(p for p, a in zip(paths, arrays) if a.shape[2] == 1)
        colour = next(p for p, a in zip(paths, arrays) if a.shape[2] == 3)
        raise DataError(f"{key}={folder} mixes gray and colour pictures (e.g. {gray.name} and {colour.name}): set "
                        f"data.channels=1 or 3 to convert them all, or keep one kind in the folder")
    channels = channels or counts.pop()
    small = [p.relative_to(folder).as_posix() for p, a in zip(paths, arrays) if min(a.shape[:2]) < min_side]
    if small:
        raise DataError(f"{key}={folder}: {counted(len(small), 'picture')} smaller than {min_side} pixels a side "
                        f"({', '.join(small[:3])}{' ...' if len(small) > 3 else ''}): remove them"
                        + (" or lower data.patch_size" if key == "data.train_dir" else ""))
    wide = any(a.dtype == np.uint16 for a in arrays)
    arrays = [to_channels(a, channels) for a in arrays]
    size = sum(a.size for a in arrays) * (4 if wide else 1)
    if size > memory_limit_mib * 2**20:
        raise _over_limit(key, folder, f"{size / 2**20:,.1f} MiB decoded ({'float32' if wide else 'uint8'})",
                          memory_limit_mib)
    flat = [torch.from_numpy(np.array(a.transpose(2, 0, 1))).flatten() for a in arrays]  # a writable copy
    if wide:  # one scale for all: [0, 1] in float32
        flat = [f.to(torch.float32) / (65535.0 if a.dtype == np.uint16 else 255.0) for f, a in zip(flat, arrays)]
    sizes = torch.tensor([len(f) for f in flat], dtype=torch.int64)
    return Pictures(torch.cat(flat).to(device), (sizes.cumsum(0) - sizes).to(device),
                    torch.tensor([a.shape[0] for a in arrays], device=device),
                    torch.tensor([a.shape[1] for a in arrays], device=device),
                    channels, paths, digest.hexdigest()[:16])


def _pixel_count(path: Path) -> int:
    """Width x height from the picture's header alone; 0 where Pillow cannot read it (decoding
    it then names the problem)."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as im:
                return im.width * im.height
        except Exception:  # any damage or bomb the header shows: reported when the picture is decoded
            return 0


def _over_limit(key: str, folder: str, taken: str, memory_limit_mib: float) -> DataError:
    return DataError(f"{key}={folder}: the pictures take {taken}, more than the {memory_limit_mib:,.1f} MiB that "
                     f"data.memory_limit_mib leaves them on the training device: raise the limit if the device has "
                     f"room, or use fewer or smaller pictures")


def load_patches(dc, device: torch.device, notes: list[str]) -> tuple[Patches, Pictures]:
    """data.dataset=images (`dc`: the DataConfig): the training patches and the test pictures on
    `device`, together within data.memory_limit_mib; what they are goes to `notes`."""
    train = load_pictures(dc.train_dir, "data.train_dir", dc.channels, device, dc.memory_limit_mib,
                          min_side=dc.patch_size)
    test = load_pictures(dc.test_dir, "data.test_dir", train.channels, device, dc.memory_limit_mib - train.mib)
    notes.append(f"pictures: {counted(len(train), 'training picture')} ({dc.patches_per_image} patches of "
                 f"{dc.patch_size}x{dc.patch_size} each per epoch), {counted(len(test), 'test picture')}, "
                 f"{train.channels} channel(s), {train.mib + test.mib:.1f} MiB on {device} "
                 f"(data.memory_limit_mib={dc.memory_limit_mib}); fingerprint {train.fingerprint}")
    return Patches(train, dc.patch_size, dc.patches_per_image), test


class Patches:
    """The training samples of `pictures`: data.patches_per_image square patches of each per
    epoch, gathered on the device by `batch(indices, key)`."""

    def __init__(self, pictures: Pictures, patch_size: int, patches_per_image: int) -> None:
        self.pictures, self.patch_size, self.per_image = pictures, patch_size, patches_per_image
        self.sample_shape = (pictures.channels, patch_size, patch_size)
        device = pictures.pixels.device
        p = patch_size
        self._rows = torch.arange(p, device=device).view(1, 1, p, 1)
        self._cols = torch.arange(p, device=device).view(1, 1, 1, p)
        self._planes = torch.arange(pictures.channels, device=device).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return len(self.pictures) * self.per_image

    def batch(self, indices: torch.Tensor, key: int | torch.Tensor) -> torch.Tensor:
        """Clean (N, C, p, p) float32 patches for sample `indices` of the epoch whose stream is
        `key` (noise.stream_key(seed, epoch))."""
        pics, p = self.pictures, self.patch_size
        picture = indices % len(pics)
        h, w = pics.heights[picture], pics.widths[picture]
        salt = _mix32(torch.as_tensor(key, dtype=torch.int32, device=indices.device) ^ _PATCH_SALT)
        counter = indices.to(torch.int32)[:, None] * 4 + torch.arange(3, device=indices.device, dtype=torch.int32)
        u = _uniforms(counter, salt)  # (N, 3): row, column, which of the 8 flips and rotations
        top = (u[:, 0] * (h - p + 1)).to(torch.int64).view(-1, 1, 1, 1)
        left = (u[:, 1] * (w - p + 1)).to(torch.int64).view(-1, 1, 1, 1)
        flip = (u[:, 2] * 8).to(torch.int64).view(-1, 1, 1, 1)
        rows, cols = self._rows, self._cols
        rows, cols = torch.where(flip & 4 > 0, cols, rows), torch.where(flip & 4 > 0, rows, cols)  # transpose
        rows = torch.where(flip & 1 > 0, p - 1 - rows, rows)
        cols = torch.where(flip & 2 > 0, p - 1 - cols, cols)
        h, w = h.view(-1, 1, 1, 1), w.view(-1, 1, 1, 1)
        where = pics.offsets[picture].view(-1, 1, 1, 1) + self._planes * h * w + (top + rows) * w + (left + cols)
        return _as_float(pics.pixels[where])


def denoise_tiled(model: torch.nn.Module, noisy: torch.Tensor, tile: int = TILE, margin: int = MARGIN) -> torch.Tensor:
    """The model's output for one picture (1, C, H, W), computed in tiles of `tile` pixels a side
    with `margin` pixels of context each, so memory stays bounded: equal, to rounding, to one
    pass over the whole picture. Tile corners and margins are multiples of 4, the U-Net's
    pooling grid, so each tile pools as the whole picture would; the margin exceeds the
    network's receptive radius, so what a tile keeps never sees the tile's edge."""
    assert tile % 4 == 0 and margin % 4 == 0, "tiles must follow the U-Net's 4-pixel pooling grid"
    _, _, height, width = noisy.shape
    if height <= tile + 2 * margin and width <= tile + 2 * margin:
        return model(noisy)
    out = torch.empty_like(noisy)
    for top in range(0, height, tile):
        for left in range(0, width, tile):
            bottom, right = min(top + tile, height), min(left + tile, width)
            y0, x0 = max(top - margin, 0), max(left - margin, 0)
            piece = model(noisy[..., y0:min(bottom + margin, height), x0:min(right + margin, width)])
            out[..., top:bottom, left:right] = piece[..., top - y0:bottom - y0, left - x0:right - x0]
    return out
