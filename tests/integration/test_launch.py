"""launch/single_node.sh on a machine without GPUs: CPU processes over gloo, arguments passed
through, and SLURM's USR1 forwarded to the training processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from conftest import REPO, interruptible, wait_for_metrics

LAUNCH = REPO / "launch" / "single_node.sh"


@pytest.mark.slow
def test_cpu_fallback_forms_a_group_and_forwards_usr1(synthetic_mnist, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "NGPU": "0", "NPROC_CPU": "2", "OMP_NUM_THREADS": "1",
           "MASTER_PORT": str(20000 + os.getpid() % 10000)}
    env.pop("PET_SIGNALS_TO_HANDLE", None)  # the script must add USR1 itself
    args = interruptible(synthetic_mnist, out, 2)
    proc = subprocess.Popen(["bash", str(LAUNCH)] + args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_metrics(out, proc, lines=1)
    proc.send_signal(signal.SIGUSR1)  # the launcher is the script's process (exec)
    stdout, _ = proc.communicate(timeout=120)
    assert "machine_rank=0 of 1: 2 process(es) here, world 2, CPU" in stdout
    assert json.loads((out / "setup.json").read_text())["world_size"] == 2
    status = json.loads((out / "status.json").read_text())
    assert status["outcome"] == "preempted" and "SIGUSR1" in status["message"]
