"""A preemption drill for your own cluster: does a job signalled at random points come back and
finish exactly as a job never signalled, and does it checkpoint well within the warning time?

    python slurm/drill.py data.root=/shared/mnist                       # 2 signals, 1 node
    SBATCH_FLAGS="--partition=gpu --gpus-per-node=1" python slurm/drill.py --signals 3 data.root=...

It submits two tiny jobs of slurm/denoise.sh side by side (a debug-sized run): one left alone,
one sent USR1 or TERM (chosen at random, at random moments once it trains) `--signals` times,
each time waiting for it to be requeued and to train again. It reports the cluster's grace
settings (`scontrol show config`), the job's warning (`#SBATCH --signal` in slurm/denoise.sh),
and the time from each signal to its checkpoint, and exits 0 only if the signalled job
requeued itself each time and ended with weights identical, bit for bit, to the other's.
Arguments after the options are overrides for both jobs (data.root=... at least, off the test
data). Run from the repository root; --nodes and NPROC_CPU/NGPU as for slurm/denoise.sh.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "slurm" / "denoise.sh"
# 600 optimizer steps (a minute or less on one CPU core), checkpoints only when signalled or at
# each epoch's end: a resume is exact only if the signal's checkpoint is.
RUN = ["--config", "configs/debug.yaml", "data.test_samples=500", "logging.every_n_steps=10",
       "logging.wandb_mode=disabled", "train.global_batch_size=20"]


def grace_settings() -> dict[str, str]:
    """What the cluster gives a signalled job: KillWait (s between SIGTERM and SIGKILL), and more."""
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, check=True).stdout
    keys = ("KillWait", "OverTimeLimit", "PreemptMode", "PreemptType", "PreemptExemptTime", "SchedulerTimeSlice")
    found = {k: m.group(1).strip() for k in keys if (m := re.search(rf"^{k}\s*=\s*(.*)$", config, re.M))}
    return found


def warning_lead_s() -> int | None:
    """The seconds of warning slurm/denoise.sh asks for (#SBATCH --signal=[B:]SIG@SECONDS)."""
    m = re.search(r"^#SBATCH --signal=\S*@(\d+)", SCRIPT.read_text(), re.M)
    return int(m.group(1)) if m else None


def submit(out: Path, nodes: int, extra: list[str]) -> subprocess.Popen:
    flags = os.environ.get("SBATCH_FLAGS", "").split()
    cmd = ["sbatch", "--parsable", "--wait", f"--nodes={nodes}", f"--output={out}.slurm-%j.out", *flags, str(SCRIPT)]
    return subprocess.Popen(cmd + RUN + extra + [f"output_dir={out}"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def checkpoints(out: Path) -> set[str]:
    return {p.name for p in (out / "checkpoints").glob("step_*")} if (out / "checkpoints").is_dir() else set()


def trained_steps(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def wait_until(condition, timeout: float, what: str, job: subprocess.Popen) -> None:
    deadline = time.time() + timeout
    while not condition():
        if job.poll() is not None:
            raise SystemExit(f"drill: the job ended while waiting for {what}")
        if time.time() > deadline:
            raise SystemExit(f"drill: no {what} after {timeout:.0f} s")
        time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--signals", type=int, default=2, help="signals to send (default 2)")
    parser.add_argument("--nodes", type=int, default=1, help="nodes per job (default 1)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the random moments (default: random)")
    parser.add_argument("--work-dir", default=f"outputs/drill-{time.strftime('%Y%m%d-%H%M%S')}",
                        help="where the two jobs write (default outputs/drill-DATE)")
    parser.add_argument("overrides", nargs="*", help="section.key=value for both jobs (data.root=...)")
    args = parser.parse_args(argv)
    if not shutil.which("sbatch") or subprocess.run(["sinfo", "-h"], capture_output=True).returncode != 0:
        print("error: no SLURM cluster answers here (sbatch, sinfo): run the drill on a login node of the cluster",
              file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else random.randrange(10**6)
    rng = random.Random(seed)
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    lead, grace = warning_lead_s(), grace_settings()
    print(f"drill: seed {seed}; warning before the time limit (#SBATCH --signal): {lead} s; cluster: "
          + ", ".join(f"{k}={v}" for k, v in grace.items()), flush=True)

    reference, drilled = work / "reference", work / "drilled"
    jobs = {"reference": submit(reference, args.nodes, args.overrides),
            "drilled": submit(drilled, args.nodes, args.overrides)}
    delays = []
    for k in range(args.signals):
        wait_until(lambda: trained_steps(drilled) >= 1, 300, "training", jobs["drilled"])
        time.sleep(rng.uniform(0.1, 1.5))  # a random moment of the training
        sig = rng.choice(["USR1", "TERM"])
        before = checkpoints(drilled)
        job = _drilled_job(drilled)
        sent = time.time()
        if jobs["drilled"].poll() is not None:
            print(f"drill: the run finished before signal {k + 1} could be sent: make it longer (train.epochs=...)",
                  file=sys.stderr)
            return 2
        subprocess.run(["scancel", f"--signal={sig}", job], check=True)
        wait_until(lambda: checkpoints(drilled) - before, 600, f"checkpoint after SIG{sig}", jobs["drilled"])
        delays.append(time.time() - sent)
        print(f"drill: signal {k + 1}: SIG{sig} to job {job}; checkpoint {max(checkpoints(drilled) - before)} "
              f"{delays[-1]:.1f} s later", flush=True)
        # The job records "preempted" and requeues itself; wait for it to train again.
        lines = trained_steps(drilled)
        wait_until(lambda: trained_steps(drilled) > lines or jobs["drilled"].poll() is not None, 600,
                   "training after the requeue", jobs["drilled"])

    results = {name: job.wait(timeout=1800) for name, job in jobs.items()}
    failures = [f"{name} job ended with status {rc}" for name, rc in results.items() if rc != 0]
    outcome = {name: json.loads((out / "status.json").read_text())["outcome"] if (out / "status.json").exists()
               else "none" for name, out in (("reference", reference), ("drilled", drilled))}
    failures += [f"{name} run's status is {o}, not completed" for name, o in outcome.items() if o != "completed"]
    identical = all((o / "model.safetensors").exists() for o in (reference, drilled)) and \
        (reference / "model.safetensors").read_bytes() == (drilled / "model.safetensors").read_bytes()
    if not identical:
        failures.append("the signalled job's weights differ from the reference's")
    requeues = len(re.findall(r"requeueing job", "".join(p.read_text() for p in work.glob("drilled.slurm-*.out"))))
    if requeues != args.signals:
        failures.append(f"{args.signals} signals but {requeues} requeues")
    worst = max(delays, default=0.0)
    print(f"drill: signal to checkpoint: {', '.join(f'{d:.1f}' for d in delays)} s (worst {worst:.1f} s) against a "
          f"warning of {lead} s and KillWait {grace.get('KillWait', '?')}", flush=True)
    if lead is not None and worst > lead:
        failures.append(f"a checkpoint took {worst:.1f} s, longer than the {lead} s warning")
    if failures:
        print("drill: FAILED: " + "; ".join(failures), flush=True)
        return 1
    print(f"drill: PASSED: {args.signals} signals, {requeues} requeues, weights identical to the uninterrupted job "
          f"(in {work})", flush=True)
    return 0


def _drilled_job(out: Path) -> str:
    """The SLURM job id of the run writing to `out` (from its log file's name)."""
    logs = sorted(out.parent.glob(f"{out.name}.slurm-*.out"))
    if not logs:
        raise SystemExit(f"drill: no log of the job writing to {out}")
    return logs[0].name.rsplit("-", 1)[1].split(".")[0]


if __name__ == "__main__":
    sys.exit(main())
