"""Shared fixtures: the real MNIST copy, tiny IDX datasets, and running the real entry point."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
MAIN = REPO / "train" / "main.py"


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked `gpu` are skipped, here in one place, where there is no CUDA GPU."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _mnist_root() -> Path:
    return Path(os.environ.get("MNIST_ROOT", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """The real MNIST (MNIST_ROOT, else ../shared/data). CI sets DENOISE_REQUIRE_MNIST=1 so a
    missing copy fails the run instead of skipping what matters."""
    root = _mnist_root()
    if not (root / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        if os.environ.get("DENOISE_REQUIRE_MNIST") == "1":
            pytest.fail(f"MNIST not found under {root}: set MNIST_ROOT")
        pytest.skip(f"MNIST not found under {root}: set MNIST_ROOT to run this test")
    return root


def write_idx(raw: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Write one split in MNIST's IDX format (big-endian header, then uint8 data)."""
    raw.mkdir(parents=True, exist_ok=True)
    n, h, w = images.shape
    (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, n, h, w) + images.tobytes())
    (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, n) + labels.tobytes())


def make_tiny_mnist(root: Path, n_train: int = 96, n_test: int = 30, seed: int = 0) -> Path:
    """A small random dataset in torchvision's MNIST layout under `root`."""
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = (rng.random((n, 28, 28)) ** 3 * 255).astype(np.uint8)  # mostly dark, like digits
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(raw, prefix, images, labels)
    return root


@pytest.fixture
def tiny_mnist(tmp_path: Path) -> Path:
    return make_tiny_mnist(tmp_path / "mnist")


def run_main(args: list[str], launcher: list[str] | None = None, env: dict[str, str] | None = None,
             timeout: float = 300, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run the real entry point (optionally under a launcher such as accelerate launch)."""
    cmd = (launcher or [sys.executable]) + [str(MAIN)] + args
    full_env = {**os.environ, "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def start_main(args: list[str], launcher: list[str] | None = None, env: dict[str, str] | None = None,
               **popen: object) -> subprocess.Popen:
    """Start the real entry point in the background (text pipes for stdout and stderr)."""
    cmd = (launcher or [sys.executable]) + [str(MAIN)] + args
    full_env = {**os.environ, "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1", **(env or {})}
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **popen}
    return subprocess.Popen(cmd, cwd=REPO, env=full_env, text=True, **popen)


def error_lines(stderr: str) -> list[str]:
    """The `error:` lines a run printed (one per failure, whatever the number of ranks)."""
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def accelerate_cpu(num_processes: int) -> list[str]:
    """`accelerate launch` forming a real gloo group of N CPU processes."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
            str(num_processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port())]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_metrics(output_dir: Path, proc: subprocess.Popen, lines: int, timeout: float = 120,
                     log=lambda: "") -> None:
    """Poll until a running job has written `lines` lines of metrics.jsonl (it must stay alive)."""
    import time

    path = output_dir / "metrics.jsonl"
    t0 = time.time()
    while not (path.exists() and path.read_text().count("\n") >= lines):
        assert proc.poll() is None, (proc.communicate(), log())
        assert time.time() - t0 < timeout, f"no metrics after {timeout} s\n{log()}"
        time.sleep(0.2)


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line]


def load_weights(output_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(output_dir / "model.safetensors"))
