"""MNIST as two uint8 tensors on the training device, and the per-rank order of its samples.

MNIST is small (47 MB as uint8): it lives on the device for the whole run and batches are gathered there by
index, so there is no DataLoader, no per-sample Python and no host-to-device copy per step.
The training order is torch's `DistributedSampler`'s (shuffled by seed and epoch), computed
with tensor ops (EpochOrder) and never passed through `accelerator.prepare`, which would
shard it twice.
"""

from __future__ import annotations

import errno
import hashlib
import math
import shutil
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from train.errors import DataError, UserError, brief, counted


@dataclass
class Split:
    """One MNIST split: images (N, 1, 28, 28) uint8 and labels (N,) int64, on one device."""

    images: torch.Tensor
    labels: torch.Tensor
    fingerprint: str = ""
    """digest of the images' bytes: part of what a checkpoint means (another copy, e.g.
    Fashion-MNIST in MNIST's layout, is other data)"""

    def __len__(self) -> int:
        return len(self.images)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def batch(self, indices: torch.Tensor, key: int | torch.Tensor | None = None) -> torch.Tensor:
        """Clean float32 images in [0, 1] for `indices` (a tensor on the same device); `key`
        (the epoch's stream, which picks a picture's patches) is not needed here."""
        return self.images[indices].to(torch.float32).div_(255.0)


def _why_download_failed(e: Exception, root: Path, timeout_s: float) -> str:
    """What went wrong with a download, in a few words: torchvision wraps most of it in RuntimeError."""
    if isinstance(e, PermissionError) or getattr(e, "errno", None) in (errno.EROFS, errno.EACCES):
        return f"it cannot be downloaded there: data.root {root} is not writable ({brief(e)})"
    if isinstance(e, TimeoutError) or "timed out" in str(e):
        return f"the download stalled: no answer within data.download_timeout_s={timeout_s:g} s (no network?)"
    return f"the download failed (no network? {brief(e)})"


def _read_idx(path: Path, ndim: int) -> torch.Tensor:
    """One IDX file of uint8 (MNIST's format): magic 0x0800 + ndim, ndim big-endian uint32 sizes, the bytes.

    Read here, not through torchvision: importing it would slow every process's start, and only
    a download needs it."""
    data = path.read_bytes()
    header = 4 * (ndim + 1)
    if len(data) < header:
        raise ValueError(f"{path.name} is {len(data)} bytes, shorter than an IDX header")
    magic, *shape = struct.unpack(f">{ndim + 1}I", data[:header])
    if magic != 0x800 + ndim:
        raise ValueError(f"{path.name} starts with {magic:#x}, not the IDX magic number {0x800 + ndim:#x}")
    if len(data) - header != math.prod(shape):
        raise ValueError(f"{path.name} holds {len(data) - header} bytes of data, its header says {math.prod(shape)}")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=header).view(*shape)


def _download(root: Path, timeout_s: float) -> None:
    from torchvision.datasets import MNIST  # deferred: torchvision is slow to import

    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)  # urllib (inside torchvision) has no timeout of its own: it would wait forever
    made = [p for p in (root / "MNIST" / "raw", root / "MNIST", root) if not p.exists()]
    try:
        MNIST(root=str(root), download=True)  # fetches, checks and unpacks all four files
    except Exception as e:  # torchvision raises RuntimeError, URLError, OSError, AssertionError...
        if made:  # a failed download leaves no half-filled folder that looks like a data set
            shutil.rmtree(made[-1], ignore_errors=True)
        raise DataError(
            f"MNIST not found in {root / 'MNIST' / 'raw'} and {_why_download_failed(e, root, timeout_s)}: put the four "
            f"MNIST IDX files there or point data.root at a folder that holds MNIST/raw/ (e.g. data.root=/path/to/data)"
        ) from e
    finally:
        socket.setdefaulttimeout(previous_timeout)


def _load_split(root: Path, train: bool, download: bool, timeout_s: float) -> Split:
    raw = root / "MNIST" / "raw"
    prefix = "train" if train else "t10k"
    files = raw / f"{prefix}-images-idx3-ubyte", raw / f"{prefix}-labels-idx1-ubyte"
    if not all(f.is_file() for f in files):
        if not download:
            raise DataError(
                f"MNIST not found in {raw} and data.download is false: put the four MNIST IDX files there "
                f"or point data.root at a folder that holds MNIST/raw/ (e.g. data.root=/path/to/data)"
            )
        _download(root, timeout_s)
    try:
        images, labels = _read_idx(files[0], 3), _read_idx(files[1], 1)
    except (OSError, ValueError) as e:
        raise DataError(
            f"MNIST files in {raw} could not be read ({brief(e)}): "
            f"replace them with a good copy (delete them and set data.download=true, or point data.root elsewhere)"
        ) from e
    if images.shape[1:] != (28, 28) or len(images) == 0 or len(labels) != len(images):
        raise DataError(
            f"MNIST {prefix} split in {raw} has images {tuple(images.shape)} "
            f"and {len(labels)} labels, expected (N, 28, 28) and N labels: replace the files with a good copy"
        )
    return Split(images.unsqueeze(1).contiguous(), labels.to(torch.int64))


def load_mnist(root: str, download: bool, device: torch.device, train_samples: int = 0,
               test_samples: int = 0, download_timeout_s: float = 60.0) -> tuple[Split, Split]:
    """Both splits, truncated to the first N samples where N > 0 (all of them where the split
    has fewer), moved to `device` once."""
    splits = []
    for train, limit in ((True, train_samples), (False, test_samples)):
        split = _load_split(Path(root), train, download, download_timeout_s)
        images, labels = (split.images[:limit], split.labels[:limit]) if limit else (split.images, split.labels)
        digest = hashlib.sha256(images.numpy()).hexdigest()[:16]  # a fraction of the time reading the files takes
        splits.append(Split(images.to(device), labels.to(device), digest))
    return splits[0], splits[1]


def build_splits(dc, accelerator, notes: list[str]) -> tuple:
    """The run's training and test data (`dc`: its DataConfig) on the accelerator's device;
    what the log should say of them goes to `notes`."""
    if dc.dataset == "images":
        from train.images import load_patches

        return load_patches(dc, accelerator.device, notes)
    from train.distributed import decided_on_main

    def load() -> tuple[Split, Split]:
        return load_mnist(dc.root, dc.download, accelerator.device, dc.train_samples, dc.test_samples,
                          dc.download_timeout_s)

    # Download once: the global main process first (its DataError, e.g. no data and no network,
    # stops every rank at once instead of leaving them waiting for it), then each node's main
    # process (for nodes without a shared filesystem), then everyone else reads the files.
    loaded: list = []
    decided_on_main(accelerator, lambda: loaded.append(load()))
    with accelerator.local_main_process_first():
        splits = loaded[0] if loaded else load()
    for key, asked, split in zip(("train", "test"), (dc.train_samples, dc.test_samples), splits):
        if asked > len(split):
            notes.append(f"data.{key}_samples={asked} is more than the {len(split)} {key} images in {dc.root}: "
                         f"using all {len(split)}")
    return splits


class EpochOrder:
    """Which training samples this rank uses at each micro-step of an epoch.

    Global micro-batch k is positions [k*G, (k+1)*G) of the epoch's shuffled order
    (G = per-device batch x world size): `DistributedSampler` deals position p to rank
    p % world, so rank r's k-th batch of b samples is exactly its share of that slice.
    The same seed therefore gives the same global batches on 1 process with batch G as on
    G/b processes with batch b.

    The remainder (len % G samples, fewer than one global batch) is left out of that epoch,
    for every world size alike; the sampler's padding, which lies past the last full global
    batch, is never used. Shuffling changes which samples are left out each epoch.

    With `blocked` (train.exact_reduction), rank r's k-th batch is instead the block of
    positions [(k*world + r)*b, (k*world + r + 1)*b): each forward pass holds the same images on
    any world size, and an optimizer step of a global batches' worth of forward passes the same
    positions.
    """

    def __init__(self, num_samples: int, per_device_batch_size: int, num_replicas: int, rank: int, seed: int,
                 blocked: bool = False):
        self.per_device_batch_size, self.blocked = per_device_batch_size, blocked
        global_micro_batch = per_device_batch_size * num_replicas
        self.steps_per_epoch = num_samples // global_micro_batch  # micro-steps
        if self.steps_per_epoch == 0:
            raise UserError(
                f"the training set ({num_samples} images) is smaller than one global micro-batch "
                f"({per_device_batch_size} per device x {counted(num_replicas, 'process')}): lower "
                f"train.global_batch_size or train.per_device_batch_size, or use more data"
            )
        self.num_samples, self.num_replicas, self.rank, self.seed = num_samples, num_replicas, rank, seed

    def epoch_indices(self, epoch: int, device: torch.device) -> torch.Tensor:
        """This rank's sample indices for `epoch`, shape (steps_per_epoch, per_device_batch_size).

        What DistributedSampler(shuffle=True, seed, drop_last=False) deals this rank at
        `epoch` (tests/unit/test_data.py holds the two equal): the same seeded permutation, of which
        the rank takes positions rank, rank + world, rank + 2 world, ...; the sampler's padding
        lies past the last global batch and never enters. Tensor ops, not the sampler's
        iterator, which builds Python lists: it runs when an epoch starts, after the previous
        epoch's checkpoint synced the device, so the device waits for it, which matters when
        an epoch is a few large steps (bench/epoch_order.py; docs/performance.md).
        """
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.num_samples, generator=generator)
        global_micro_batch = self.per_device_batch_size * self.num_replicas
        if self.blocked:
            used = order[: self.steps_per_epoch * global_micro_batch].view(
                self.steps_per_epoch, self.num_replicas, self.per_device_batch_size)[:, self.rank].contiguous()
        else:
            used = order[self.rank : self.steps_per_epoch * global_micro_batch : self.num_replicas].contiguous()
            used = used.view(self.steps_per_epoch, self.per_device_batch_size)
        if device.type == "cuda":  # the one host-to-device copy of an epoch, off the critical path
            return used.pin_memory().to(device, non_blocking=True)
        return used.to(device)


def eval_shard(num_samples: int, num_replicas: int, rank: int) -> torch.Tensor:
    """Test indices this rank evaluates: rank r takes r, r+W, r+2W, ... with no padding.

    Together the ranks cover each test image exactly once; shards differ in length by at
    most one, which the metrics' gather handles (see metrics.evaluate).
    """
    return torch.arange(rank, num_samples, num_replicas, dtype=torch.int64)
