"""What operators do to a run at 3 a.m., on the real entry point: two runs in one folder, a
killed launcher, bursts of signals, SIGHUP, a dead rank 0, a full disk, a stalled network.
Each time: no data lost, no hang, no status that lies, one clear line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import (FORWARD, MAIN, MOUNT_REQUIRED, REPO, accelerate_cpu, can_mount, error_lines, load_weights,
                      needs_mount, read_metrics, run_main, start_main, wait_for_metrics)
from train.checkpoint import verify

PREEMPTED_EXIT = 75
# Long enough (2,000+ optimizer steps) to be reliably mid-training when the test acts; the
# tests stop it themselves.
LONG = ["--config", "configs/debug.yaml", "data.train_samples=4000", "data.test_samples=100", "train.epochs=10",
        "logging.every_n_steps=10", "logging.wandb_mode=disabled"]


def _status(out: Path) -> dict:
    return json.loads((out / "status.json").read_text())


def _stopped_cleanly(out: Path, *reasons: str) -> int:
    """Assert the run recorded a stop at step N, for one of `reasons`, with an intact checkpoint
    of step N; return N."""
    status = _status(out)
    assert status["outcome"] == "preempted" and status["exit_code"] == PREEMPTED_EXIT, status
    assert any(reason in status["message"] for reason in reasons), status
    ckpt = out / "checkpoints" / f"step_{status['step']:08d}"
    assert verify(ckpt) is None, f"the stop checkpoint {ckpt} is missing or damaged"
    steps = [(m["step"], "eval/mse" in m) for m in read_metrics(out)]
    assert len(steps) == len(set(steps)), "metrics.jsonl has a step written twice"
    return status["step"]


def _checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir()) if (out / "checkpoints").exists() else []


def _our_traceback(stderr: str) -> bool:
    return any(line.startswith('  File "') and "/train/" in line for line in stderr.splitlines())


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            pass
    return kids


# -- 1. one run per output_dir -------------------------------------------------------------
@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_a_second_run_in_the_same_output_dir_is_refused_and_touches_nothing(synthetic_mnist, tmp_path, nproc):
    out = tmp_path / "run"
    args = LONG + [f"data.root={synthetic_mnist}", f"output_dir={out}"]
    first = start_main(args)
    try:
        wait_for_metrics(out, first, lines=1)
        before = _checkpoints(out)
        second = run_main(args + [f"train.per_device_batch_size={20 // nproc}"],
                          launcher=accelerate_cpu(nproc) if nproc > 1 else None, timeout=120)
        assert second.returncode != 0 and first.poll() is None, second.stderr[-2000:]
        assert error_lines(second.stderr) == [
            f"error: output_dir {out} is in use by another run (host {socket.gethostname()}, pid {first.pid}, "
            f"started {json.loads((out / 'run.lock').read_text())['started']}): wait for it to end or stop it, "
            f"or choose another output_dir"], second.stderr[-2000:]
        assert not _our_traceback(second.stderr)  # (accelerate launch adds one of its own)
        assert "setup:" not in second.stdout
        assert _status(out)["outcome"] == "running"  # the first run's record
        assert all(name in before or name.startswith("step_") for name in _checkpoints(out))
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == PREEMPTED_EXIT
    _stopped_cleanly(out, "SIGTERM")


def test_the_status_command_and_the_next_run_record_a_killed_run_as_failed(synthetic_mnist, tmp_path):
    out, copy = tmp_path / "run", tmp_path / "copy"
    args = LONG + [f"data.root={synthetic_mnist}", "train.epochs=1", "checkpoint.every_n_steps=50"]
    assert run_main(args + [f"output_dir={out}"], env={"DENOISE_FAULT": "after_step:120"}).returncode == -signal.SIGKILL
    assert _status(out)["outcome"] == "running"  # a SIGKILLed process can write nothing...
    killed_at = _status(out)["step"]
    assert 100 <= killed_at < 120, _status(out)  # ...but its record keeps the last logged step
    shutil.copytree(out, copy)  # the same killed run, for each of the two readers
    status = subprocess.run([sys.executable, "-m", "train.status", str(copy)], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert status.stdout == "failed 1\n", status  # ...but no reader is told it still runs
    assert _status(copy)["outcome"] == "failed" and "without recording an outcome" in _status(copy)["message"]

    resumed = run_main(args + [f"output_dir={out}"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "the previous run in" in resumed.stdout and "was killed without recording an outcome" in resumed.stdout
    assert f"(it said 'running' at step {killed_at})" in resumed.stdout
    assert "resuming from" in resumed.stdout and _status(out)["outcome"] == "completed"


def test_a_run_refused_at_start_up_leaves_the_finished_runs_status(synthetic_mnist, tmp_path):
    out = tmp_path / "run"
    args = ["--config", "configs/debug.yaml", f"data.root={synthetic_mnist}", f"output_dir={out}",
            "data.train_samples=200", "data.test_samples=50", "train.epochs=1"]
    assert run_main(args).returncode == 0
    done = (out / "status.json").read_bytes()
    for bad in (["train.no_such_key=1"], ["train.seed=5"]):  # a config error; a checkpoint it cannot resume
        r = run_main(args + bad)
        assert r.returncode == 2 and len(error_lines(r.stderr)) == 1 and "Traceback" not in r.stderr
        assert (out / "status.json").read_bytes() == done


# -- 2. workers end with their launcher -----------------------------------------------------
@pytest.mark.slow
def test_workers_checkpoint_and_end_when_their_launcher_is_killed(synthetic_mnist, tmp_path):
    out = tmp_path / "run"
    args = LONG + [f"data.root={synthetic_mnist}", f"output_dir={out}", "train.per_device_batch_size=10"]
    with open(tmp_path / "log", "w") as log:  # a file, not a pipe: orphaned workers keep writing to it
        launcher = start_main(args, launcher=accelerate_cpu(2), env=FORWARD, stdout=log, stderr=subprocess.STDOUT)
        wait_for_metrics(out, launcher, lines=2, log=lambda: (tmp_path / "log").read_text())
        workers = _children(launcher.pid)
        assert len(workers) == 2
        launcher.kill()
        launcher.wait()
        t0 = time.time()
        while any(_alive(pid) for pid in workers):
            assert time.time() - t0 < 60, "workers outlived their launcher by a minute"
            time.sleep(0.2)
    # Rank 0 records the stop: its own launcher watch, or rank 1's first, through the stop vote.
    stopped = _stopped_cleanly(out, "the death of its launcher", "stopped by a signal on another rank")
    # Resumed for 20 more steps, not the ~2,000 left: the resume is what is tested here.
    resumed = run_main(args + [f"train.max_steps={stopped + 20}"], launcher=accelerate_cpu(2), env=FORWARD)
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout, resumed.stderr[-2000:]
    assert f"step_{stopped:08d}" in resumed.stdout and _status(out)["outcome"] == "completed"


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_to_accelerate_launch_saves_although_it_ends_wandbs_process_too(synthetic_mnist, tmp_path, stop):
    # The README's one-process `accelerate launch`, with wandb as it is by default (offline): on
    # SIGTERM or Ctrl-C the launcher ends every process under it, wandb's service among them.
    out = tmp_path / "run"
    args = LONG + [f"data.root={synthetic_mnist}", f"output_dir={out}", "logging.wandb_mode=offline"]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no"]
    proc = start_main(args, launcher=launcher)
    wait_for_metrics(out, proc, lines=2)
    proc.send_signal(stop)
    stdout, stderr = proc.communicate(timeout=120)
    stopped = _stopped_cleanly(out, "stopped by SIGTERM")  # what the launcher sends its worker, either way
    assert "Traceback" not in stderr, stderr[-3000:]
    assert read_metrics(out)[-1]["step"] == stopped  # the steps before the stop are all in the record


# -- 5. stop signals -------------------------------------------------------------------------
def test_a_burst_of_stop_signals_is_one_stop_request(synthetic_mnist, tmp_path):
    out = tmp_path / "run"
    proc = start_main(LONG + [f"data.root={synthetic_mnist}", f"output_dir={out}"])
    wait_for_metrics(out, proc, lines=1)
    for name in ("SIGINT", "SIGTERM", "SIGTERM"):  # a few ms apart, as SLURM and a forwarding launcher send them
        proc.send_signal(getattr(signal, name))
        time.sleep(0.02)  # apart enough that each runs the handler (signals closer than that merge)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT, stderr[-2000:]
    _stopped_cleanly(out, "SIGINT")


@pytest.mark.parametrize("nohup", [False, True])
def test_sighup_is_a_stop_request_unless_the_run_was_started_under_nohup(synthetic_mnist, tmp_path, nohup):
    """The SIGHUP disposition is set for the run itself, whatever the test runner's is (a
    pytest started under nohup would pass its ignored SIGHUP on)."""
    out = tmp_path / "run"
    disposition = signal.SIG_IGN if nohup else signal.SIG_DFL
    proc = start_main(LONG + [f"data.root={synthetic_mnist}", f"output_dir={out}"], launcher=[sys.executable],
                      preexec_fn=lambda: signal.signal(signal.SIGHUP, disposition))
    wait_for_metrics(out, proc, lines=1)
    proc.send_signal(signal.SIGHUP)
    stdout, stderr = proc.communicate(timeout=120)
    if nohup:  # the user asked the run to outlive the terminal: it trains to the end
        assert proc.returncode == 0 and _status(out)["outcome"] == "completed", stderr[-2000:]
        return
    assert proc.returncode == PREEMPTED_EXIT, stderr[-2000:]
    _stopped_cleanly(out, "SIGHUP")


def test_a_second_request_after_the_first_stops_at_once_and_records_it(tmp_path):
    probe = REPO / "tests" / "probes" / "stop_twice_probe.py"
    r = subprocess.run([sys.executable, str(probe), str(tmp_path / "record")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == -signal.SIGTERM, r.stderr  # the default way, so the shell sees the signal
    record = json.loads((tmp_path / "record").read_text())  # recorded before the signal ended it
    assert (record["outcome"], record["exit_code"]) == ("failed", 128 + signal.SIGTERM), record
    assert record["message"].startswith("stopped at once by a second stop signal (SIGTERM)"), record
    assert "burst ignored" in r.stdout


# -- 6. a dead rank 0 ------------------------------------------------------------------------
@pytest.mark.slow
def test_a_dead_rank_0_ends_the_job_in_bounded_time_and_its_status_is_failed(synthetic_mnist, tmp_path):
    out = tmp_path / "run"
    t0 = time.time()
    r = run_main(LONG + [f"data.root={synthetic_mnist}", f"output_dir={out}", "train.per_device_batch_size=10",
                         "train.collective_timeout_s=20"],
                 launcher=accelerate_cpu(2), env={"DENOISE_FAULT": "after_step:15@0"}, timeout=180)
    assert r.returncode != 0 and time.time() - t0 < 90
    status = _status(out)  # written by the surviving rank: rank 0 was killed before it could
    assert status["outcome"] == "failed" and status["message"].startswith("lost contact with another rank"), status
    [line] = error_lines(r.stderr)
    assert line.startswith("error: lost contact with another rank (") and "run the same command" in line, r.stderr
    assert "[rank1]: Traceback" not in r.stderr  # the survivor's one line, no traceback of its own


# -- 7. a full disk --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def unwritable_runs(synthetic_mnist, tmp_path_factory):
    """The arguments of the full-disk runs, and the weights they end with uninterrupted."""
    straight = tmp_path_factory.mktemp("straight") / "run"
    args = ["--config", "configs/debug.yaml", f"data.root={synthetic_mnist}", "data.train_samples=4000",
            "data.test_samples=100", "train.epochs=1", "logging.every_n_steps=10", "checkpoint.every_n_steps=50",
            "checkpoint.keep_last=5"]
    assert run_main(args + [f"output_dir={straight}"]).returncode == 0
    return args, straight


@pytest.mark.slow
@needs_mount
@pytest.mark.parametrize("mode", ["full", "readonly"])
def test_a_full_disk_or_a_read_only_folder_is_one_line_keeps_the_checkpoints_and_resumes(unwritable_runs, tmp_path,
                                                                                         mode):
    args, straight = unwritable_runs
    probe = REPO / "tests" / "probes" / "disk_full_probe.py"
    r = subprocess.run(["unshare", "-m", sys.executable, str(probe), str(tmp_path), json.dumps(args), mode],
                       cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads((tmp_path / "result.json").read_text())
    full = result["full"]
    assert full["returncode"] == 2, full
    [line] = error_lines(full["stderr"])
    if mode == "full":
        assert line.startswith("error: disk full: writing ") and "MiB free on its filesystem" in line, line
    else:
        assert line.startswith("error: cannot write ") and "(Read-only file system): make it writable again" in line
    assert "Traceback" not in full["stderr"]
    assert full["status"]["outcome"] == "failed" and full["status"]["exit_code"] == 2, full["status"]
    assert full["checkpoints"] and all(problem is None for problem in full["checkpoints"].values()), full
    resumed = result["resumed"]
    assert resumed["returncode"] == 0 and "resuming from" in resumed["stdout"], resumed
    assert resumed["status"]["outcome"] == "completed"
    a, b = result["weights"], load_weights(straight)
    assert a == {k: v.flatten().tolist() for k, v in b.items()}, "the resumed run must end as the uninterrupted one"


# -- 8. start-up that waits on the network ---------------------------------------------------
@pytest.fixture
def stalled_proxy():
    """A local HTTP(S) proxy that accepts connections and never answers: a stalled network."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=serve, daemon=True).start()
    url = f"http://127.0.0.1:{server.getsockname()[1]}"
    yield {"https_proxy": url, "http_proxy": url, "HTTPS_PROXY": url, "HTTP_PROXY": url, "no_proxy": "",
           "NO_PROXY": ""}, held
    server.close()
    for s in held:
        s.close()


def test_a_stalled_download_times_out_with_one_line(tmp_path, stalled_proxy):
    env, held = stalled_proxy
    t0 = time.time()
    r = run_main(["--config", "configs/debug.yaml", f"data.root={tmp_path / 'data'}", f"output_dir={tmp_path / 'run'}",
                  "data.download_timeout_s=1"], env=env, timeout=120)
    assert r.returncode == 2 and time.time() - t0 < 60 and held, r.stderr[-2000:]
    [line] = error_lines(r.stderr)
    assert "the download stalled: no answer within data.download_timeout_s=1 s (no network?)" in line
    assert "Traceback" not in r.stderr
    # A failed first run leaves nothing that looks like a data set or a run: no folders at all.
    assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_wandb_online_without_an_answering_server_is_one_line_at_once(synthetic_mnist, tmp_path, stalled_proxy, nproc):
    """On 2 ranks too, where the main process alone starts wandb: the other rank used to wait for
    it at the first step, then print a lost peer and record it over the main process's record."""
    _, held = stalled_proxy
    (url,) = {v for k, v in stalled_proxy[0].items() if k == "http_proxy"}  # the server that never answers
    t0 = time.time()
    out = tmp_path / "run"
    r = run_main(["--config", "configs/debug.yaml", f"data.root={synthetic_mnist}", f"output_dir={out}",
                  "logging.wandb_mode=online", "train.global_batch_size=20"],
                 launcher=accelerate_cpu(2) if nproc > 1 else None, timeout=120,
                 env={"WANDB_BASE_URL": url, "WANDB_API_KEY": "x" * 40,
                      "DENOISE_STATUS_FILE": str(tmp_path / "rank-{rank}.json")})
    assert r.returncode == (2 if nproc == 1 else 1) and time.time() - t0 < 45 and held, r.stderr[-2000:]
    [line] = error_lines(r.stderr)
    assert f"logging.wandb_mode=online, but the wandb server {url} did not answer within 10 s" in line
    assert "logging.wandb_mode=offline" in line and ("Traceback" not in r.stderr or nproc > 1)  # the launcher's
    for record in [out / "status.json", *(tmp_path / f"rank-{rank}.json" for rank in range(nproc))]:
        assert json.loads(record.read_text())["exit_code"] == 2, record.read_text()


def test_a_stop_signal_during_start_up_ends_the_run_at_once(tmp_path, stalled_proxy):
    env, held = stalled_proxy
    proc = start_main(["--config", "configs/debug.yaml", f"data.root={tmp_path / 'data'}",
                       f"output_dir={tmp_path / 'run'}", "data.download_timeout_s=600"], env=env)
    t0 = time.time()
    while not held:  # until it is stuck in the download
        assert proc.poll() is None and time.time() - t0 < 60, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    t1 = time.time()
    _, stderr = proc.communicate(timeout=30)
    assert time.time() - t1 < 10 and proc.returncode == PREEMPTED_EXIT, stderr
    assert "stopped: stopped by SIGTERM during start-up, before training began" in stderr
    assert "Traceback" not in stderr


@pytest.mark.slow
def test_a_config_error_is_printed_when_the_main_process_starts_later_than_the_others(tmp_path):
    """A config error is the same on every rank and only the main process prints it. When rank
    0 starts seconds late (another node, a slow filesystem), the others fail first and the
    launcher's SIGTERM would find rank 0 before main.py holds its stop signals."""
    probe = REPO / "tests" / "probes" / "slow_start_probe.py"
    r = run_main(["train.lr=-1", f"output_dir={tmp_path / 'run'}"], launcher=accelerate_cpu(2), script=probe,
                 env={"SLOW_START_S": "3"})
    assert r.returncode != 0 and error_lines(r.stderr) == ["error: config key 'train.lr' must be > 0, got -1.0"], \
        r.stderr[-3000:]


@pytest.mark.parametrize("config", ["train:\n  lr: -1\n", "train:\n  lr: 0.001\n"], ids=["bad", "good"])
def test_a_stop_signal_while_the_config_loads_waits_for_the_config(tmp_path, config):
    """A launcher SIGTERMs the other ranks as soon as one exits. A config error is the same on
    every rank and only the main process prints it: it must live to print it, whichever rank
    failed first. With a good config the held signal stops the run at once, cleanly."""
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    proc = start_main(["--config", str(fifo), f"output_dir={tmp_path / 'run'}"])
    with open(fifo, "w") as f:  # open returns once the run has opened it: it is loading its config
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # time to die, where the signal is not held
        assert proc.poll() is None, proc.communicate()
        f.write(config)
    _, stderr = proc.communicate(timeout=120)
    assert "Traceback" not in stderr
    if "-1" in config:
        assert proc.returncode == 2 and error_lines(stderr) == ["error: config key 'train.lr' must be > 0, got -1.0"]
    else:
        assert proc.returncode == PREEMPTED_EXIT, stderr
        assert "stopped: stopped by SIGTERM during start-up, before training began" in stderr
    assert not (tmp_path / "run").exists()


# -- 10. launch mistakes and small ones -----------------------------------------------------
@pytest.mark.slow
def test_num_processes_without_multi_gpu_is_refused(synthetic_mnist, tmp_path):
    out = tmp_path / "run"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2"]
    r = run_main(["--config", "configs/debug.yaml", f"data.root={synthetic_mnist}", f"output_dir={out}"], launcher=launcher)
    assert r.returncode != 0 and not out.exists()
    assert error_lines(r.stderr) == [
        "error: accelerate launch --num_processes 2 started ONE process: without --multi_gpu it runs a single process; "
        "add --multi_gpu (on a machine without GPUs: ACCELERATE_USE_CPU=true accelerate launch --multi_gpu "
        "--num_processes 2 ...)"]


def test_data_problems_say_what_really_failed(synthetic_mnist, tmp_path, tiny_mnist):
    r = run_main(["--config", "configs/debug.yaml", f"data.root={tiny_mnist}", f"output_dir={tmp_path / 'a'}",
                  "data.train_samples=500", "train.epochs=1"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"data.train_samples=500 is more than the 96 train images in {tiny_mnist}: using all 96" in r.stdout
    if not MOUNT_REQUIRED and not can_mount():  # in CI it must run
        pytest.skip("a read-only data.root needs a private read-only mount (root)")
    ro = tmp_path / "ro"
    ro.mkdir()
    cmd = (f"mount -t tmpfs -o ro,size=1m tmpfs {ro} && exec {sys.executable} {MAIN} --config configs/debug.yaml "
           f"data.root={ro} output_dir={tmp_path / 'b'}")
    r = subprocess.run(["unshare", "-m", "sh", "-c", cmd], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    [line] = error_lines(r.stderr)
    assert f"it cannot be downloaded there: data.root {ro} is not writable" in line and "no network" not in line


@pytest.mark.slow
def test_the_launch_warning_the_readme_explains_is_harmless(tiny_mnist, tmp_path):
    # No accelerate config file here (a fresh HOME): accelerate warns about its defaults.
    r = run_main(["--config", "configs/debug.yaml", f"data.root={tiny_mnist}", f"output_dir={tmp_path / 'run'}",
                  "train.epochs=1"], launcher=[sys.executable, "-m", "accelerate.commands.launch"],
                 env={"HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "cache"), "HF_HOME": str(tmp_path / "hf")})
    # What the README says of it: the run trains as one process, and completes.
    assert r.returncode == 0, r.stderr[-2000:]
    assert "world_size=1" in r.stdout and json.loads((tmp_path / "run" / "status.json").read_text())["outcome"] == \
        "completed"
    assert "harmless: with no flags\naccelerate starts one process" in (REPO / "README.md").read_text()
