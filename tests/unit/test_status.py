"""A job's outcome from its ranks' records (slurm/job_outcome.py; slurm/denoise.sh acts on it)."""

from __future__ import annotations

import json

import pytest

from conftest import needs_mount, slurm_script
from train.lifecycle import RunStatus
from train.rundir import RunDir, read_status, write_status

_job = slurm_script("job_outcome")
NODE_FAILURE, job_outcome, settle_job = _job.NODE_FAILURE, _job.job_outcome, _job.settle_job


def rec(outcome: str, code: int = 0, node: str = "n1") -> dict:
    return {"outcome": outcome, "exit_code": code, "node": node}


@pytest.mark.parametrize("records, expected", [
    ([rec("completed"), rec("completed", node="n2")], ("completed", 0, [])),
    ([rec("preempted", 75), rec("preempted", 75, "n2")], ("preempted", 75, [])),
    # ranks of n2 died without a word while n1's lived to record the lost peer
    ([rec("failed", 1), rec("running", node="n2"), rec("running", node="n2")], (NODE_FAILURE, 1, ["n2"])),
    ([rec("failed", 1), rec("running", node="n1")], (NODE_FAILURE, 1, ["n1"])),  # one node, one rank killed
    ([rec("failed", 1), {**rec("failed", 1, "n2"), "stuck": True}], (NODE_FAILURE, 1, ["n2"])),  # n2 hung
    ([{**rec("failed", 1), "stuck": True}, rec("running", node="n2")], ("missing", 1, [])),  # nobody lived to tell
    ([rec("failed", 2), rec("running", node="n2")], ("failed", 2, [])),  # a mistake to fix is never a bad node
    ([rec("running"), rec("running", node="n2")], ("missing", 1, [])),  # all killed: nobody to blame
    ([None, rec("failed", 1)], ("failed", 1, [])),  # a torn record is no evidence
    ([], ("missing", 1, [])),
])
def test_job_outcome(records, expected):
    assert job_outcome(records) == expected


def test_settle_job_names_the_bad_node_in_the_runs_status(tmp_path, monkeypatch):
    job, out = tmp_path / "job", tmp_path / "run"
    job.mkdir(), out.mkdir()  # the script makes the job's folder, the run its output_dir
    monkeypatch.setenv("SLURMD_NODENAME", "node1")
    write_status(out / "status.json", "failed", 1, 40, "lost contact with another rank")
    write_status(job / "rank-0.json", "failed", 1, 40)
    monkeypatch.setenv("SLURMD_NODENAME", "node2")
    write_status(job / "rank-1.json", "running", 0, None)
    assert settle_job(job, out) == (NODE_FAILURE, 1, "node2")
    status = read_status(out / "status.json")
    assert (status["outcome"], status["step"], status["node"]) == ("failed", 40, "node2")
    assert status["message"].startswith("ranks on node2 died without recording an outcome")


def test_each_rank_records_everything_in_its_own_file_and_only_rank_0_in_the_shared_one(tmp_path, monkeypatch):
    monkeypatch.setenv("DENOISE_STATUS_FILE", str(tmp_path / "job" / "rank-{rank}.json"))
    monkeypatch.setenv("SLURMD_NODENAME", "node7")
    (tmp_path / "run").mkdir()  # output_dir, made by the run's claim; status.json never makes it
    for rank, outcome, code in (("0", "preempted", 75), ("1", "completed", 0)):
        monkeypatch.setenv("RANK", rank)
        status = RunStatus()
        status.rundir, status.accepted = RunDir(tmp_path / "run"), True
        status.record("running", 0)
        status.record(outcome, code)
    assert json.loads((tmp_path / "job" / "rank-1.json").read_text())["outcome"] == "completed"
    assert read_status(tmp_path / "job" / "rank-0.json")["node"] == "node7"
    assert read_status(tmp_path / "run" / "status.json")["outcome"] == "preempted"


def test_a_planted_file_of_gigabytes_is_never_held_whole(tmp_path):
    """status.json, run.lock and a checkpoint's JSON are read whole, and a checkpoint's files
    hashed: a huge file planted in their place must not take the process's memory."""
    import tracemalloc

    from train.checkpoint import _file_digest, verify

    big, manifest = tmp_path / "status.json", tmp_path / "manifest.json"
    for path in (big, manifest):
        with open(path, "wb") as f:
            f.truncate(256 * 2**20)  # 256 MiB of zeros, sparse: no disk used
    tracemalloc.start()
    try:
        assert read_status(big) is None  # not a record
        assert _file_digest(big)["bytes"] == 256 * 2**20
        assert verify(tmp_path) == "no readable manifest.json (larger than 1,048,576 bytes)"
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, f"{peak / 2**20:.0f} MiB held"


@needs_mount
def test_a_killed_run_is_reported_failed_from_a_folder_the_reader_cannot_write(tmp_path):
    """A read-only mount of output_dir (or a colleague's run): the probe of the lock needs only
    read access, and a record it cannot write is reported all the same."""
    import fcntl
    import os
    import subprocess
    import sys

    from conftest import REPO

    out = tmp_path / "run"
    out.mkdir()
    write_status(out / "status.json", "running", 0, step=5)
    fd = os.open(out / "run.lock", os.O_RDWR | os.O_CREAT)
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a live run holds the folder

    def status() -> str:
        cmd = f"mount --bind {out} {out} && mount -o remount,bind,ro {out} && exec {sys.executable} -m train.status " \
              f"{out}"
        r = subprocess.run(["unshare", "-m", "sh", "-c", cmd], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()

    assert status() == "running 0"
    os.close(fd)  # the run is killed
    assert status() == "failed 1"
    assert read_status(out / "status.json")["outcome"] == "running"  # unwritten: the next run there records it


def test_a_planted_fifo_for_run_lock_does_not_hang_the_status_reader(tmp_path):
    import os
    import subprocess
    import sys

    from conftest import REPO

    write_status(tmp_path / "status.json", "running", 0, step=5)
    os.mkfifo(tmp_path / "run.lock")
    r = subprocess.run([sys.executable, "-m", "train.status", str(tmp_path)], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "running 0\n"  # no lock to probe: the record as it is
