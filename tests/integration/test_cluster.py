"""Cluster recipes on real launchers: a run that changes world size between resumes, torchrun's
elastic restarts after a worker or a whole node is lost, one wandb run rebuilt from a requeued run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ENV, MAIN, REPO, _free_port, accelerate_cpu, load_weights, read_metrics, run_main

# 600 images, global batch 12: 50 optimizer steps an epoch, 100 in all; 12 splits over 1 to 4
# processes (3 per process on 4, 6 on 2, 4 on 3).
ELASTIC = ["--config", "configs/debug.yaml", "data.train_samples=600", "data.test_samples=200", "train.epochs=2",
           "train.global_batch_size=12", "logging.every_n_steps=5", "logging.wandb_mode=disabled",
           "checkpoint.every_n_steps=10", "checkpoint.keep_last=20"]
# Rounding differs between world sizes (the all-reduce sums in another order), so the runs agree
# to rounding step by step and drift apart slowly. Measured (1 against 4 -> 2 -> 3 processes,
# 100 Adam steps): losses to 1.3e-7 relative, weights to 1.8e-5, test PSNR to 1e-6 dB.
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-4
PSNR_ATOL_DB = 1e-3


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def one_process(synthetic_mnist, tmp_path_factory) -> Path:
    """ELASTIC trained without interruption by one process."""
    out = tmp_path_factory.mktemp("one_process") / "run"
    _ok(run_main(ELASTIC + [f"data.root={synthetic_mnist}", f"output_dir={out}"]))
    return out


def _assert_same_run(out: Path, ref: Path) -> None:
    """Same steps logged, losses equal to rounding, the end equal in quality. (`out` also
    evaluated where each of its segments stopped.)"""
    def by_step(path: Path, key: str) -> dict[int, float]:
        return {m["step"]: m[key] for m in read_metrics(path) if key in m}

    losses, ref_losses = by_step(out, "train/loss"), by_step(ref, "train/loss")
    assert sorted(losses) == sorted(ref_losses) == list(range(5, 101, 5))  # gap-free across the resumes
    for step, loss in ref_losses.items():  # the same images and the same noise in every global batch
        assert losses[step] == pytest.approx(loss, rel=LOSS_RTOL), step
    psnr, ref_psnr = by_step(out, "eval/psnr_db"), by_step(ref, "eval/psnr_db")
    for step in (50, 100):  # the epochs' ends
        assert psnr[step] == pytest.approx(ref_psnr[step], abs=PSNR_ATOL_DB), step
    weights, ref_weights = load_weights(out), load_weights(ref)
    for key in ref_weights:
        torch.testing.assert_close(weights[key], ref_weights[key], rtol=0, atol=WEIGHT_ATOL, msg=key)


@pytest.mark.slow
def test_a_checkpoint_resumes_on_4_then_2_then_3_processes(synthetic_mnist, tmp_path, one_process):
    out = tmp_path / "run"
    args = ELASTIC + [f"data.root={synthetic_mnist}", f"output_dir={out}"]
    _ok(run_main(args + ["train.max_steps=30"], launcher=accelerate_cpu(4)))
    r = _ok(run_main(args + ["train.max_steps=60"], launcher=accelerate_cpu(2)))
    assert "step_00000030" in r.stdout and "written by 4 processes, now 2" in r.stdout
    r = _ok(run_main(args, launcher=accelerate_cpu(3)))
    assert "step_00000060" in r.stdout and "written by 2 processes, now 3" in r.stdout
    assert "3 per process" not in r.stdout and "(4 per process per micro-step)" in r.stdout
    assert json.loads((out / "setup.json").read_text())["world_size"] == 3
    _assert_same_run(out, one_process)
    # Negative control: a step of training moves the weights by far more than the tolerance.
    from safetensors.torch import load_file

    before = load_file(str(out / "checkpoints" / "step_00000090" / "model.safetensors"))
    ref = load_weights(one_process)
    assert max((before[k] - ref[k]).abs().max().item() for k in ref) > 10 * WEIGHT_ATOL


def test_a_global_batch_that_does_not_split_over_the_processes_is_one_line(synthetic_mnist, tmp_path):
    r = run_main(ELASTIC + [f"data.root={synthetic_mnist}", f"output_dir={tmp_path / 'run'}",
                            "train.global_batch_size=20"], launcher=accelerate_cpu(3))
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode != 0, r.stderr[-3000:]  # (accelerate launch adds its own traceback of the exit status)
    assert errors == ["error: config key 'train.global_batch_size' (20) does not split evenly over 3 processes x 1 "
                      "accumulation steps: make it a multiple of 3, or launch a number of processes that divides it"]


def _worker_pid(run_id: str, rank: int, timeout: float = 60) -> int:
    """The pid of the training process of `rank` under the torchrun run `run_id`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for proc in Path("/proc").iterdir():
            try:
                env = (proc / "environ").read_bytes().split(b"\0")
            except (OSError, ValueError):
                continue
            if f"TORCHELASTIC_RUN_ID={run_id}".encode() in env and f"RANK={rank}".encode() in env:
                return int(proc.name)
        time.sleep(0.2)
    raise AssertionError(f"no rank {rank} of torchrun run {run_id}")


@pytest.mark.slow
def test_torchrun_restarts_a_killed_worker_and_the_run_resumes_from_its_checkpoint(synthetic_mnist, tmp_path,
                                                                                  one_process):
    out, run_id = tmp_path / "run", f"elastic-{os.getpid()}-{time.time_ns()}"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1:2", "--nproc-per-node=2",
                "--max-restarts=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}",
                f"--rdzv-id={run_id}", "--rdzv-conf=last_call_timeout=1"]  # don't wait 30 s for a second node
    proc = subprocess.Popen(torchrun + [str(MAIN)] + ELASTIC + [f"data.root={synthetic_mnist}", f"output_dir={out}"],
                            cwd=REPO, env={**os.environ, **ENV}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.time() + 120
        while not (out / "checkpoints" / "step_00000020").is_dir() and proc.poll() is None:
            assert time.time() < deadline, "no checkpoint at step 20"
            time.sleep(0.2)
        os.kill(_worker_pid(run_id, 1), signal.SIGKILL)  # a worker lost mid-run (OOM killer, a bad GPU)
        log, _ = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, log[-4000:]
    [resumed] = [line for line in log.splitlines() if "resuming from" in line]
    assert "step_000000" in resumed and "written by 2 processes, now 2" in resumed
    assert int(resumed.split("step_")[1][:8]) >= 20  # from the newest checkpoint, not from the start
    assert json.loads((out / "status.json").read_text())["outcome"] == "completed"
    _assert_same_run(out, one_process)  # gap-free metrics, the same losses, the same end


def read_wandb_records(path: Path) -> list:
    """The records of an offline run's .wandb file, parsed with wandb's own protobuf schema. The
    file is a LevelDB-style log (a 7-byte header, then 32 KiB blocks of chunks, each with a
    7-byte header: CRC, length, type); wandb 0.31 has no Python reader of its own for it."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1), "not a .wandb file"
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk  # FULL, FIRST | MIDDLE, LAST
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


@pytest.mark.slow
def test_a_requeued_runs_wandb_segments_are_rebuilt_as_one_run(synthetic_mnist, tmp_path):
    out = tmp_path / "run"
    args = ELASTIC + [f"data.root={synthetic_mnist}", f"output_dir={out}", "logging.wandb_mode=offline"]
    _ok(run_main(args + ["train.max_steps=40"]))  # stopped, then requeued twice: three segments
    _ok(run_main(args + ["train.max_steps=70"]))
    _ok(run_main(args))
    assert len(list((out / "wandb").glob("offline-run-*"))) == 3
    r = subprocess.run([sys.executable, "slurm/wandb_rebuild.py", str(out)], cwd=REPO, capture_output=True,
                       text=True, env={**os.environ, **ENV})
    assert r.returncode == 0 and "wandb sync " in r.stdout, r.stdout + r.stderr
    [folder] = (out / "wandb-rebuilt" / "wandb").glob("offline-run-*")
    records = read_wandb_records(next(folder.glob("run-*.wandb")))
    [run] = [rec.run for rec in records if rec.WhichOneof("record_type") == "run"]
    state = json.loads(sorted((out / "checkpoints").glob("step_*"))[-1].joinpath("trainer_state.json").read_text())
    assert run.run_id == state["run_id"]  # the id the three segments share
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["train"]["global_batch_size"] == 12 and config["setup"]["world_size"] == 1
    logged: dict[int, dict] = {}
    for rec in records:
        if rec.WhichOneof("record_type") == "history":
            for item in rec.history.item:  # a scalar: [key]; an image: [key, field] for each of its fields
                keys = [item.key] if item.key else list(item.nested_key)
                if len(keys) == 1 or keys[1] == "_type":
                    logged.setdefault(rec.history.step.num, {})[keys[0]] = json.loads(item.value_json)
    expected: dict[int, dict] = {}
    for m in read_metrics(out):
        expected.setdefault(m["step"], {}).update({k: v for k, v in m.items() if k != "step"})
    assert sorted(logged) == sorted(expected) == list(range(5, 101, 5))
    assert all("eval/psnr_db" in logged[step] for step in (40, 50, 70, 100))  # each segment's end, each epoch's
    images = {step for step, values in logged.items() if values.get("eval/samples") == "image-file"}
    assert images == {int(p.stem[5:]) for p in (out / "samples").glob("step_*.png")} == {40, 50, 70, 100}
    for step, values in expected.items():
        for key, value in values.items():
            assert logged[step][key] == pytest.approx(value), (step, key)


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(proc.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


@pytest.mark.slow
def test_torchrun_goes_on_with_fewer_nodes_when_one_is_lost(synthetic_mnist, tmp_path, one_process):
    out, run_id, port = tmp_path / "run", f"shrink-{os.getpid()}-{time.time_ns()}", _free_port()

    def node(name: str) -> subprocess.Popen:  # one torchrun agent per "node", 2 workers each, on this host
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1:2", "--nproc-per-node=2",
                    "--max-restarts=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                    f"--rdzv-id={run_id}", "--rdzv-conf=last_call_timeout=5"]  # 5 s for the second node to join
        return subprocess.Popen(torchrun + [str(MAIN)] + ELASTIC + [f"data.root={synthetic_mnist}", f"output_dir={out}"],
                                cwd=REPO, env={**os.environ, **ENV}, stdout=(tmp_path / f"{name}.log").open("w"),
                                stderr=subprocess.STDOUT)

    first = node("first")  # it hosts the rendezvous, so it is the one to stay
    time.sleep(1)
    second = node("second")
    try:
        deadline = time.time() + 120
        while not (out / "checkpoints" / "step_00000020").is_dir():
            assert time.time() < deadline and first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.2)
        for pid in [second.pid] + _children(second.pid):  # the second node is lost: its agent and its workers
            os.kill(pid, signal.SIGKILL)
        assert first.wait(timeout=240) == 0, (tmp_path / "first.log").read_text()[-4000:]
    finally:
        first.kill(), second.kill()
    log = (tmp_path / "first.log").read_text()
    assert "world_size=4" in log and "world_size=2" in log, log[-3000:]
    [resumed] = [line for line in log.splitlines() if "resuming from" in line]
    assert "written by 4 processes, now 2" in resumed and int(resumed.split("step_")[1][:8]) >= 20
    assert json.loads((out / "status.json").read_text())["outcome"] == "completed"
    _assert_same_run(out, one_process)  # the same global batches on 4 and then 2 processes
