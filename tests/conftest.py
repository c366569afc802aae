"""Shared fixtures and helpers for both tiers of tests.

tests/unit/ runs in this process (seconds in all); tests/integration/ launches the real entry
point or a script in new processes, and its tests are marked `integration` here. The slowest of
those are marked `slow` as well: `pytest -m "not slow"` is the quick pass before a commit.
Plumbing tests train on generated strokes in MNIST's format (`synthetic_mnist`); the tests of
what the model learns on MNIST itself use the real copy (`mnist_root`)."""

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


def slurm_script(name: str):
    """slurm/<name>.py as a module (the SLURM scripts are not part of the `train` package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"slurm_{name}", REPO / "slurm" / f"{name}.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look it up there
    spec.loader.exec_module(module)
    return module
MAIN = REPO / "train" / "main.py"


# Fixtures that train runs several tests read: under pytest-xdist the tests that use one share a
# worker (an xdist group), so its runs happen once; other tests go to whichever worker is free.
_SHARED_RUNS = {"uninterrupted": "interrupted runs", "straight": "fault-tolerance runs",
                "killed": "fault-tolerance runs", "debug_runs": "debug runs", "two_ranks_bf16": "probe run",
                "runs": "speed-setting runs", "run_dir": "denoise run",
                "unwritable_runs": "unwritable runs"}


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the xdist_group marks
def pytest_collection_modifyitems(config, items) -> None:
    """Marks the tests under tests/integration/ `integration`, groups the tests that share runs
    (see _SHARED_RUNS; pyproject.toml sets `--dist loadgroup`), and skips those marked `gpu`
    where there is no CUDA GPU: all here, in one place."""
    import torch

    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if (REPO / "tests" / "integration") in item.path.parents:
            item.add_marker(pytest.mark.integration)
        group = next((_SHARED_RUNS[name] for name in item.fixturenames if name in _SHARED_RUNS), None)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))
        if "gpu" in item.keywords and not torch.cuda.is_available():
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


def strokes(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 28, 28) uint8: one to three bright strokes on black, about as much ink as an MNIST digit.

    Digit-like enough that the model learns to denoise them, so plumbing tests need no MNIST copy."""
    yy, xx = np.mgrid[0:28, 0:28].astype(np.float32)
    ink = np.zeros((n, 28, 28), np.float32)
    for stroke in range(3):
        start, end = rng.uniform(4, 24, (2, n, 2, 1, 1)).astype(np.float32)
        d = end - start
        along = ((xx - start[:, 0]) * d[:, 0] + (yy - start[:, 1]) * d[:, 1]) / ((d ** 2).sum(1) + 1e-6)
        t = np.clip(along, 0, 1)
        dist = np.hypot(xx - start[:, 0] - t * d[:, 0], yy - start[:, 1] - t * d[:, 1])
        drawn = (rng.random(n) < (1.0, 0.9, 0.6)[stroke])[:, None, None]  # 1 to 3 strokes
        ink = np.maximum(ink, np.clip(2.3 - dist, 0, 1) * drawn)  # lines ~4 px wide, soft edges
    return (ink * 255).round().astype(np.uint8)


def make_tiny_mnist(root: Path, n_train: int = 96, n_test: int = 30, seed: int = 0) -> Path:
    """A generated data set in torchvision's MNIST layout under `root` (strokes; labels 0..9 in turn)."""
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(raw, prefix, strokes(n, rng), (np.arange(n) % 10).astype(np.uint8))
    return root


def mnist_copy(source: Path, root: Path, edited: str = "") -> Path:
    """A copy of the data set at `source` under `root`; with `edited` ("train" or "t10k"), one
    pixel of that split's first image changed: other data in the same layout."""
    import shutil

    shutil.copytree(source, root)
    if edited:
        images = root / "MNIST" / "raw" / f"{edited}-images-idx3-ubyte"
        data = bytearray(images.read_bytes())
        data[16 + 100] ^= 0xFF  # after the 16-byte header
        images.write_bytes(bytes(data))
    return root


def picture(height: int, width: int, channels: int, rng: np.random.Generator) -> np.ndarray:
    """A made-up photograph, H x W x C float64 in [0, 1]: discs of flat colour over a smooth wave."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    image = 0.3 * np.sin(10 * x * rng.random() + 7 * y * rng.random())[..., None] + np.zeros(channels)
    for _ in range(6):
        cy, cx, r = rng.random(3)
        image = image + rng.random(channels) * (((y - cy) ** 2 + (x - cx) ** 2) < (0.1 + 0.3 * r) ** 2)[..., None]
    return (image - image.min()) / (np.ptp(image) + 1e-9)


def write_pictures(folder: Path, sizes: list[tuple[int, int]], channels: int = 3, seed: int = 0,
                   suffix: str = ".png", bits: int = 8) -> list[Path]:
    """Made-up photographs of `sizes` (height, width) as files in `folder` (created)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (h, w) in enumerate(sizes):
        image = picture(h, w, channels, rng)
        if bits == 16:
            pil = Image.fromarray((image[..., 0] * 65535).round().astype(np.uint16))  # mode I;16
        else:
            array = (image * 255).round().astype(np.uint8)
            pil = Image.fromarray(array[..., 0] if channels == 1 else array)
        paths.append(folder / f"p{i}{suffix}")
        pil.save(paths[-1])
    return paths


@pytest.fixture
def tiny_mnist(tmp_path: Path) -> Path:
    return make_tiny_mnist(tmp_path / "mnist")


@pytest.fixture(scope="session")
def synthetic_mnist(tmp_path_factory) -> Path:
    """The plumbing tests' data set: 4,000 train and 1,000 test images of strokes, MNIST's format.
    Tests of what the model learns on MNIST itself (quality, the README's claims) use `mnist_root`."""
    return make_tiny_mnist(tmp_path_factory.mktemp("synthetic"), n_train=4000, n_test=1000)


# One epoch of 100 optimizer steps at a global batch of 20 (2,000 images): long enough to be
# mid-training when a test interrupts it. The signal tests and the SLURM preemption test resume
# it and compare with `uninterrupted`.
INTERRUPTIBLE = ["--config", "configs/debug.yaml", "data.train_samples=2000", "data.test_samples=100",
                 "train.epochs=1", "logging.every_n_steps=10", "logging.wandb_mode=disabled"]
# torchrun (under accelerate launch) forwards only these signals to the workers by default;
# SIGUSR1 must be added, as launch/ and slurm/ do.
FORWARD = {"PET_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"}


def interruptible(data_root: Path, out: Path, nproc: int) -> list[str]:
    """INTERRUPTIBLE's arguments for `nproc` ranks (global batch 20) writing to `out`."""
    return INTERRUPTIBLE + [f"data.root={data_root}", f"output_dir={out}", "train.global_batch_size=20"]


# train.exact_reduction at INTERRUPTIBLE's global batch of 20: forward passes of 5 images, so
# 1, 2 and 4 ranks take 4, 2 and 1 micro-steps per optimizer step.
EXACT = ["train.exact_reduction=true", "train.per_device_batch_size=5"]


@pytest.fixture(scope="session")
def uninterrupted(synthetic_mnist, tmp_path_factory):
    """`uninterrupted(nproc, *overrides)`: the final weights of INTERRUPTIBLE (and `overrides`)
    on `nproc` ranks, trained once per session."""
    weights = {}

    def get(nproc: int, *overrides: str) -> dict:
        key = (nproc, *overrides)
        if key not in weights:
            out = tmp_path_factory.mktemp(f"uninterrupted{nproc}") / "run"
            r = run_main(interruptible(synthetic_mnist, out, nproc) + list(overrides),
                         launcher=accelerate_cpu(nproc) if nproc > 1 else None)
            assert r.returncode == 0, r.stderr[-3000:]
            weights[key] = load_weights(out)
        return weights[key]

    return get


ENV = {"WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}  # every run's environment, on top of ours


def run_main(args: list[str], launcher: list[str] | None = None, env: dict[str, str] | None = None,
             timeout: float = 300, cwd: Path = REPO, script: Path = MAIN) -> subprocess.CompletedProcess:
    """Run the real entry point: `python train/main.py ARGS` (forked from a warm interpreter
    where it can be: see _warm), or under `launcher` (e.g. accelerate launch) as a new process.
    `script`: a probe to run in its place (it calls main.py's main)."""
    full_env = {**os.environ, **ENV, **(env or {})}
    if launcher is None and _warm() is not None:
        import shutil

        job = _WarmJob(script, args, full_env, cwd, new_session=False)
        try:
            stdout, stderr = job.communicate(timeout)
        except subprocess.TimeoutExpired:
            job.kill()
            raise
        shutil.rmtree(job.files)
        return subprocess.CompletedProcess(job.args, job.returncode, stdout, stderr)
    cmd = (launcher or [sys.executable]) + [str(script)] + args
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def start_main(args: list[str], launcher: list[str] | None = None, env: dict[str, str] | None = None,
               **popen: object) -> subprocess.Popen:
    """Start the real entry point in the background (its stdout and stderr read as text by
    `communicate`), forked from the warm interpreter where it can be."""
    full_env = {**os.environ, **ENV, **(env or {})}
    if launcher is None and set(popen) <= {"start_new_session"} and _warm() is not None:
        return _WarmJob(MAIN, args, full_env, REPO, new_session=bool(popen.get("start_new_session")))
    cmd = (launcher or [sys.executable]) + [str(MAIN)] + args
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **popen}
    return subprocess.Popen(cmd, cwd=REPO, env=full_env, text=True, **popen)


_server: list[subprocess.Popen] = []


def _warm() -> subprocess.Popen | None:
    """tests/warm_main.py, started at the first run (one per pytest process); None where CUDA
    is, which a forked child could not use, or where DENOISE_COLD_RUNS=1 asks for new processes."""
    import atexit

    import torch

    if torch.cuda.is_available() or os.environ.get("DENOISE_COLD_RUNS") == "1":
        return None
    if not _server:
        server = subprocess.Popen([sys.executable, str(REPO / "tests" / "warm_main.py")], cwd=REPO,
                                  env={**os.environ, **ENV}, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert "ready" in server.stdout.readline(), "tests/warm_main.py did not start"
        atexit.register(server.stdin.close)  # EOF: it ends
        _server.append(server)
    return _server[0]


class _WarmJob:
    """`python SCRIPT ARGS` forked by tests/warm_main.py, with the Popen methods the tests use."""

    def __init__(self, script: Path, args: list[str], env: dict[str, str], cwd: Path, new_session: bool) -> None:
        import tempfile

        self.args = [sys.executable, str(script)] + args
        self.returncode: int | None = None
        self.files = Path(tempfile.mkdtemp(prefix="warm-job-"))  # its stdout, stderr and exit status
        server = _warm()
        request = {"script": str(script), "argv": args, "env": env, "cwd": str(cwd), "new_session": new_session,
                   **{name: str(self.files / name) for name in ("stdout", "stderr", "status")}}
        server.stdin.write(json.dumps(request) + "\n")
        server.stdin.flush()
        self.pid = json.loads(server.stdout.readline())["pid"]

    def poll(self) -> int | None:
        status = self.files / "status"
        if self.returncode is None and status.exists():
            self.returncode = int(status.read_text())
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        import time

        t0 = time.monotonic()
        while self.poll() is None:
            if timeout is not None and time.monotonic() - t0 > timeout:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.02)
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        return (self.files / "stdout").read_text(), (self.files / "stderr").read_text()

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        import signal

        self.send_signal(signal.SIGKILL)


def can_mount() -> bool:
    """Whether this process may mount a private tmpfs (root, with unshare -m)."""
    import shutil

    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True).returncode == 0


# .ci/run sets DENOISE_REQUIRE_MOUNT=1: there a test that needs the mount fails without it, never skips.
MOUNT_REQUIRED = os.environ.get("DENOISE_REQUIRE_MOUNT") == "1" or os.environ.get("CI") == "true"
needs_mount = pytest.mark.skipif(not MOUNT_REQUIRED and not can_mount(),
                                 reason="needs root for a private tmpfs (unshare -m); CI has it")


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
