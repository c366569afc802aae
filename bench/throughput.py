"""Training speed of this job against the reference notebook's recipe, side by side in one run.

    python bench/throughput.py --data ../shared/data                  # everything (CPU: ~55 min)
    python bench/throughput.py --data ../shared/data --reference-ttq estimate   # ~20 min
    python bench/throughput.py --data ../shared/data --sections speed,scaling
    python bench/throughput.py --data data --device cuda --out $OUT/bench.json

Sections (each row is a real run of train/main.py or bench/reference.py in its own process,
one after the other, so no two runs share the machine):
  speed    (a) training images/s: the reference recipe (PIL loader, batch 20, CPU noise) vs
           this job at batch 20 fp32 (plain, then with each speed setting) and at its best setting
  scaling  (c) images/s over batch sizes x mixed precisions; on the CPU, 1 vs 2 processes at
           the same global batch. The fastest one-process row is "our best setting"; on the
           CPU it is then run alternately with the reference 3 times (--confirm) for a
           median ratio that the machine's drift moves less than one pair
  quality  (b) time to reach the reference's 20-epoch test PSNR (15.58 dB): this job with the
           device's fast config, vs the reference recipe (run to that PSNR with
           --reference-ttq full, or estimated from its measured images/s with estimate)
  confirm  without scaling: the reference and this job at --batch (default settings),
           alternately, --confirm times each (default 3), and the median ratio
  tuning   at one batch size (--batch, else the sweep's fastest), the speed settings one by one
  full     a whole run of configs/default.yaml (the reference recipe: 20 epochs at batch 20,
           evaluation every epoch) with the device's speed settings: wall time, and the
           time after start-up (from the model being built to the process's exit)
  floor    the hardware floor: FLOPs and activation bytes per training image against the
           GPU's peak compute and memory bandwidth (GPU only)

images/s is global training images per second over logging windows after the first (warm-up
and compilation excluded), the median of the windows; host RSS and GPU max-allocated memory
are the peaks the training process itself logged. The table is printed as Markdown and
written, with the machine's description, to --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # for train.model in the floor section
MAIN = REPO / "train" / "main.py"
REFERENCE_PSNR_DB = 15.58  # the reference recipe's test PSNR after its 20 epochs (../shared/notes)
# The epoch at which the reference first reaches it: 13 in its run to the target on
# 2026-11-26 (bench/results/cpu-reference-to-quality.jsonl); an earlier run needed 19. The
# smaller one makes the estimate conservative.
REFERENCE_EPOCHS_TO_QUALITY = 13
QUIET = ["logging.wandb_mode=disabled", "checkpoint.keep_last=1"]

# Per device: steps at batch 20, images per run at larger batches, the sweep (batch sizes x
# mixed precisions; the best row of it is "our best setting"), the reference's steps, the
# time-to-quality config.
PLANS = {
    "cpu": dict(small_steps=400, large_images=12_000, batches=[20, 64, 128, 256], precisions=["no", "bf16"],
                reference_steps=400, fast_config="configs/fast_cpu.yaml"),
    "cuda": dict(small_steps=3000, large_images=4_000_000, batches=[256, 1024, 4096, 16384, 65536],
                 precisions=["bf16"], reference_steps=1500, fast_config="configs/fast_gpu.yaml"),
}
# The speed package's CPU rewrites (opt-in; configs/fast_cpu.yaml sets them): the CPU rows of
# the batch sweep use them, as the best CPU setting does.
CPU_REWRITES = ["perf.cpu_layers=true", "perf.reuse_host_memory=true"]
# Section tuning: settings tried at one batch size (--batch, or the sweep's fastest).
TUNING = {
    "cpu": [["train.mixed_precision=no", "perf.channels_last=false"], ["train.mixed_precision=no", "perf.channels_last=true"],
            ["train.mixed_precision=no", "perf.channels_last=true", "perf.reuse_host_memory=true"],
            ["train.mixed_precision=no", "perf.channels_last=true", "perf.cpu_layers=true"],
            ["train.mixed_precision=no", "perf.channels_last=true", *CPU_REWRITES],
            ["train.mixed_precision=no", "perf.channels_last=true", "perf.compile=true"]],
    "cuda": [["train.mixed_precision=bf16", "perf.channels_last=true"],
             ["train.mixed_precision=bf16", "perf.channels_last=true", "perf.cudnn_benchmark=true"],
             ["train.mixed_precision=bf16", "perf.channels_last=true", "perf.cudnn_benchmark=true", "perf.compile=true"],
             ["train.mixed_precision=bf16", "perf.channels_last=true", "perf.cudnn_benchmark=true", "perf.compile=true",
              "perf.pad_thin_convs=true"],
             ["train.mixed_precision=bf16", "perf.channels_last=false", "perf.cudnn_benchmark=true"],
             ["train.mixed_precision=no", "perf.channels_last=true", "perf.cudnn_benchmark=true"]],
}

# Published peaks (dense bf16 tensor-core FLOP/s, memory bytes/s) for the floor section.
GPU_PEAKS = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12), "A100": (312e12, 2.0e12)}


def _run(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    """Run `cmd`; returns (result, wall seconds)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), time.perf_counter() - t0


def _env(device: str, threads: int | None = None) -> dict[str, str]:
    env = {**os.environ, "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _main_cmd(args, prefix: str, *extra: str) -> tuple[list[str], Path]:
    """`python train/main.py` on a fresh output folder under args.work, quiet, with `extra`."""
    out = Path(tempfile.mkdtemp(prefix=prefix, dir=args.work))
    return [sys.executable, str(MAIN), f"data.root={args.data}", f"output_dir={out}", *QUIET, *extra], out


def _launch(cmd: list[str], device: str, processes: int) -> tuple[list[str], dict[str, str]]:
    """`cmd` (python train/main.py ...) as is for one process, else under accelerate launch
    with a gloo group of CPU processes, one thread each share of the cores."""
    env = _env(device)
    if processes > 1:
        env.update(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS=str(max(os.cpu_count() // processes, 1)))
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *cmd[1:]]
    return cmd, env


def ours(name: str, args, overrides: list[str], steps: int, processes: int = 1, timeout: float = 900) -> dict:
    """One run of train/main.py for `steps` optimizer steps; images/s from its own log."""
    every = max(steps // 8, 1)  # 8 windows: the first is dropped (warm-up, compile)
    cmd, out = _main_cmd(args, "bench-", f"train.max_steps={steps}", f"logging.every_n_steps={every}",
                         "eval.every_n_epochs=1000", *overrides)
    cmd, env = _launch(cmd, args.device, processes)
    result, wall = _run(cmd, env, timeout)
    row = {"row": name, "settings": " ".join(overrides) or "defaults", "processes": processes}
    if result.returncode != 0:
        return {**row, "error": (result.stderr.strip().splitlines() or ["?"])[-1][:200]}
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in records if "train/images_per_s" in m]
    rates = [m["train/images_per_s"] for m in train[1:]] or [m["train/images_per_s"] for m in train]
    row.update(images_per_s=round(statistics.median(rates)), wall_s=round(wall, 1),
               max_rss_gib=round(max(m["memory/max_rss_gib"] for m in train), 2))
    gpu = [m["memory/max_allocated_gib"] for m in train if "memory/max_allocated_gib" in m]
    if gpu:
        row["gpu_max_allocated_gib"] = round(max(gpu), 3)
    return row


def reference(args, steps: int, target_psnr: float = 0.0, reuse_host_memory: bool = False) -> tuple[dict, list[dict]]:
    """bench/reference.py: the notebook's recipe (with reuse_host_memory, plus the job's
    malloc setting). Returns (row, per-epoch evaluations)."""
    cmd = [sys.executable, str(REPO / "bench" / "reference.py"), "--data", args.data, "--device", args.device]
    cmd += ["--target-psnr", str(target_psnr)] if target_psnr else ["--max-steps", str(steps)]
    cmd += ["--reuse-host-memory"] if reuse_host_memory else []
    result, wall = _run(cmd, _env(args.device), timeout=3 * 3600)
    row = {"row": "reference recipe" + (" + reused host memory" if reuse_host_memory else ""),
           "settings": "PIL + DataLoader, batch 20, CPU noise, fp32", "processes": 1}
    if result.returncode != 0:
        return {**row, "error": (result.stderr.strip().splitlines() or ["?"])[-1][:200]}, []
    lines = [json.loads(x) for x in result.stdout.splitlines() if x.startswith("{")]
    summary = lines[-1]
    row.update(images_per_s=round(summary["images_per_s"]), wall_s=round(wall, 1),
               max_rss_gib=round(summary["max_rss_gib"], 2))
    if "gpu_max_allocated_gib" in summary:
        row["gpu_max_allocated_gib"] = round(summary["gpu_max_allocated_gib"], 3)
    return row, lines[:-1]


def alternate(args, overrides: list[str], times: int, reference_steps: int, steps: int) -> dict:
    """The reference recipe and our run with `overrides`, one after the other, `times` times:
    each pair measured minutes apart at most, so a drift of the machine's speed (30% within
    minutes on a shared VM) moves both sides of a ratio alike. Returns the pairs and the
    median ratio (ours / reference)."""
    pairs = []
    for i in range(times):
        ref, _ = reference(args, reference_steps)
        row = ours("ours, best setting", args, overrides, steps)
        pair = {"run": i + 1, "reference_images_per_s": ref.get("images_per_s"),
                "ours_images_per_s": row.get("images_per_s")}
        if pair["reference_images_per_s"] and pair["ours_images_per_s"]:
            pair["ratio"] = round(pair["ours_images_per_s"] / pair["reference_images_per_s"], 2)
        else:
            pair["error"] = ref.get("error") or row.get("error")
        pairs.append(pair)
    ratios = [p["ratio"] for p in pairs if "ratio" in p]
    return {"settings": " ".join(overrides) or "defaults", "pairs": pairs,
            "median_ratio": round(statistics.median(ratios), 2) if ratios else None}


def time_to_quality(args, config: str, target: float, timeout: float, processes: int = 1) -> dict:
    """Launch train/main.py with `config` (on `processes` processes, the global batch kept);
    the wall time (from launch, start-up and evaluation included) at which an evaluation
    first reports test PSNR >= target."""
    from train.config import load_config

    per_device = load_config(REPO / config).train.per_device_batch_size // processes
    cmd, out = _main_cmd(args, "bench-ttq-", "--config", config, f"train.per_device_batch_size={per_device}")
    cmd, env = _launch(cmd, args.device, processes)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics_path, seen = out / "metrics.jsonl", 0
    row = {"row": "ours" + (f", {processes} processes" if processes > 1 else ""), "settings": config}
    while True:
        done = proc.poll() is not None
        lines = metrics_path.read_text().splitlines() if metrics_path.exists() else []
        for line in lines[seen:]:
            m = json.loads(line)
            if m.get("eval/psnr_db", 0) >= target and "seconds" not in row:
                row.update(seconds=round(time.perf_counter() - t0, 1), epoch=m["epoch"], psnr_db=round(m["eval/psnr_db"], 2))
        seen = len(lines)
        if "seconds" in row or done or time.perf_counter() - t0 > timeout:
            break
        time.sleep(0.2)
    if proc.poll() is None:
        proc.terminate()
        proc.wait()
    if "seconds" not in row:
        last = [json.loads(x) for x in lines if "eval/psnr_db" in x]
        row["error"] = f"did not reach {target} dB" + (f" (best {max(m['eval/psnr_db'] for m in last):.2f})" if last else "")
        if proc.returncode not in (0, None, -15):
            row["error"] += ": " + (proc.stderr.read().strip().splitlines() or ["?"])[-1][:200]
    return row


def full_run(args, overrides: list[str]) -> dict:
    """configs/default.yaml from launch to exit, with `overrides`; start-up ends when the
    job logs its settings (data loaded, model built), just before training starts."""
    cmd, out = _main_cmd(args, "bench-full-", "--config", "configs/default.yaml", *overrides)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(args.device), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    started, capture_s, split = None, None, {}
    for line in proc.stdout:
        if started is None and "perf:" in line:
            started = time.perf_counter()
        if "as a CUDA graph in" in line:  # warm-up steps (and compilation, if on) plus the capture
            capture_s = float(line.rsplit(" in ", 1)[1].split()[0])
        if "time: training" in line:  # the job's own split of its loop's wall time
            split = {f"{name}_s": float(seconds) for name, seconds in
                     re.findall(r"(training|evaluation|checkpoints) ([\d.]+) s", line)}
    proc.wait()
    end = time.perf_counter()
    row = {"row": "default config, 20 epochs", "settings": " ".join(overrides) or "defaults"}
    if proc.returncode != 0 or started is None:
        return {**row, "error": f"exit {proc.returncode}"}
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "eval/psnr_db" in x]
    rates = [json.loads(x)["train/images_per_s"] for x in (out / "metrics.jsonl").read_text().splitlines()
             if "train/images_per_s" in x]
    return {**row, "wall_s": round(end - t0, 1), "after_startup_s": round(end - started, 1),
            "steps": evals[-1]["step"], "evaluations": len(evals), "psnr_db": round(evals[-1]["eval/psnr_db"], 2),
            "train_images_per_s": round(statistics.median(rates)), "capture_s": capture_s, **split}


def floor(device_name: str, best_row: dict) -> dict:
    """How far the best setting is from the GPU's limits, for one training image."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from train.model import ConvDenoiser

    model = ConvDenoiser()
    x = torch.rand(64, 1, 28, 28)
    saved_bytes = 0

    def pack(t):
        nonlocal saved_bytes
        saved_bytes += t.numel() * 2  # as bf16
        return t

    with FlopCounterMode(display=False) as counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.mse_loss(model(x), x).backward()
    params = sum(p.numel() for p in model.parameters())
    flops = counter.get_total_flops() / 64
    # A layer-by-layer implementation writes each saved activation in the forward pass and
    # reads it in the backward one, and writes and reads a gradient of the same size.
    act_bytes = 4 * (saved_bytes - 64 * params * 2) / 64
    peak_flops, peak_bw = next((v for k, v in GPU_PEAKS.items() if k in device_name), (None, None))
    row = {"flops_per_image": round(flops), "activation_bytes_per_image": round(act_bytes)}
    if peak_flops:
        row["compute_floor_images_per_s"] = round(peak_flops / flops)
        row["memory_floor_images_per_s"] = round(peak_bw / act_bytes)
        if "images_per_s" in best_row:
            row["best_fraction_of_memory_floor"] = round(best_row["images_per_s"] / row["memory_floor_images_per_s"], 3)
    return row


def _batch_of(overrides: list[str], default: int) -> int:
    """The per-device batch that `overrides` set (the last one wins, as in the config), else `default`."""
    return next((int(o.split("=")[1]) for o in reversed(overrides) if o.startswith("train.per_device_batch_size=")),
                default)


def _versus(row: dict, base: float | None) -> dict:
    """`row` with its images/s as a multiple of the reference recipe's."""
    if base and "images_per_s" in row:
        row["vs_reference"] = round(row["images_per_s"] / base, 2)
    return row


def table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def render(report: dict) -> str:
    """The report as Markdown tables."""
    cols = ["row", "settings", "processes", "images_per_s", "vs_reference", "max_rss_gib", "gpu_max_allocated_gib",
            "wall_s", "error"]
    text = [f"machine: {json.dumps(report['machine'])}", f"command: {report['command']}", ""]
    if "speed" in report:
        text += ["## (a) training images/s", "", table(report["speed"], cols), ""]
    if "scaling" in report:
        text += ["## (c) scaling", "", table(report["scaling"], ["batch"] + cols[:4] + cols[5:]), ""]
    if "confirm" in report:
        c = report["confirm"]
        text += [f"## best setting against the reference, alternated: median ratio {c.get('median_ratio')}", "",
                 f"settings: {c['settings']}", "", table(c["pairs"], ["run", "reference_images_per_s",
                                                                      "ours_images_per_s", "ratio", "error"]), ""]
    if "tuning" in report:
        text += ["## speed settings at one batch size", "", table(report["tuning"], cols), ""]
    if "quality" in report:
        text += [f"## (b) time to {REFERENCE_PSNR_DB} dB test PSNR", "",
                 table(report["quality"], ["row", "settings", "seconds", "epoch", "psnr_db", "vs_reference", "error"]), ""]
    if "full" in report:
        text += ["## the default config, whole", "",
                 table(report["full"], ["row", "settings", "wall_s", "after_startup_s", "capture_s", "training_s",
                                        "evaluation_s", "checkpoints_s", "train_images_per_s", "steps", "evaluations",
                                        "psnr_db", "error"]), ""]
    if "floor" in report:
        text += ["## floor", "", "```", json.dumps(report["floor"], indent=1), "```"]
    return "\n".join(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder holding MNIST/raw/")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--sections", default="speed,scaling,quality,floor",
                        help="any of speed,scaling,quality,tuning,confirm,full,floor (full is not in the default: 20 epochs)")
    parser.add_argument("--reference-ttq", choices=["full", "estimate"], default="full",
                        help="run the reference recipe to 15.58 dB (CPU: ~20 min) or estimate it from its images/s")
    parser.add_argument("--full", action="append", help="overrides of one full run (repeatable); "
                        "default: perf.cuda_graphs=true perf.channels_last=false on a GPU, none on a CPU")
    parser.add_argument("--ttq-processes", type=int, default=1,
                        help="processes for our time-to-quality run (CPU: 2 on a 2-core machine is fastest)")
    parser.add_argument("--batch", type=int, default=0, help="batch size of the tuning section")
    parser.add_argument("--tuning", action="append", help="overrides of one tuning row (repeatable; later "
                        "overrides win, so a row may set its own batch); default: the device's list of settings")
    parser.add_argument("--confirm", type=int, default=None,
                        help="times each that the reference and our best one-process setting (with scaling; --batch "
                        "with the confirm section alone) run alternately, for a median ratio (default: 3 on a CPU, "
                        "whose speed drifts by 30%% within minutes; 0 on a GPU with scaling)")
    parser.add_argument("--quick", action="store_true", help="a tenth of the steps (a smoke test of the script)")
    parser.add_argument("--out", default="bench/out/throughput.json")
    parser.add_argument("--work", default=None, help="scratch folder for the runs' outputs (default: a temp dir)")
    args = parser.parse_args()
    args.data = str(Path(args.data).resolve())
    args.work = args.work or tempfile.mkdtemp(prefix="denoise-bench-")
    sections = set(args.sections.split(","))
    plan = dict(PLANS[args.device])
    scale = 0.1 if args.quick else 1.0
    small = max(int(plan["small_steps"] * scale), 16)
    reference_steps = max(int(plan["reference_steps"] * scale), 40)

    import torch

    from bench.results import machine as described

    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else described("cpu")
    machine = {"device": device_name, "cpu_count": os.cpu_count(), "torch": torch.__version__,
               "python": platform.python_version(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    report: dict = {"machine": machine, "command": " ".join(sys.argv)}
    print(f"machine: {json.dumps(machine)}", flush=True)

    def large_steps(batch: int) -> int:
        return max(int(plan["large_images"] * scale / batch), 16)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> str:  # after every row, so a run stopped early keeps what it measured
        out.write_text(json.dumps(report, indent=1) + "\n")
        text = render(report)
        out.with_suffix(".md").write_text(text + "\n")
        return text

    def confirm(overrides: list[str], batch: int, times: int) -> None:
        report["confirm"] = alternate(args, overrides, times, reference_steps, large_steps(batch))
        print(report["confirm"], flush=True)
        save()

    speed_rows: list[dict] = []
    if "speed" in sections:
        report["speed"] = speed_rows
    if "speed" in sections or "quality" in sections:
        ref_row, _ = reference(args, reference_steps)
        if "images_per_s" in ref_row:
            ref_row["vs_reference"] = 1.0
        speed_rows.append(ref_row)
        print(ref_row, flush=True)
    base_rate = speed_rows[0].get("images_per_s") if speed_rows else None
    if "speed" in sections:
        variants: list[tuple[str, list[str]]] = [
            ("ours, batch 20 fp32, NCHW", ["perf.channels_last=false"]),
            ("ours, batch 20 fp32 (defaults: channels_last)", []),
        ]
        if args.device == "cpu":  # the speed package's CPU rewrites, alone and together; the allocator in the reference
            variants.append(("ours, batch 20 fp32, + perf.reuse_host_memory", ["perf.reuse_host_memory=true"]))
            variants.append(("ours, batch 20 fp32, + perf.cpu_layers", ["perf.cpu_layers=true"]))
            variants.append(("ours, batch 20 fp32, + both (fast_cpu.yaml's perf settings)", CPU_REWRITES))
            ref_reused, _ = reference(args, reference_steps, reuse_host_memory=True)
            speed_rows.append(_versus(ref_reused, base_rate))
            print(speed_rows[-1], flush=True)
        if args.device == "cuda":
            variants.append(("ours, batch 20 fp32 + CUDA graphs, NCHW", ["perf.cuda_graphs=true", "perf.channels_last=false"]))
            variants.append(("ours, batch 20 fp32 + CUDA graphs + channels_last", ["perf.cuda_graphs=true"]))
        else:  # not on a GPU: its batch-20 steps are launch-bound, which compiling does not change
            variants.append(("ours, batch 20 fp32 + channels_last + compile", ["perf.compile=true"]))
        for name, overrides in variants:
            speed_rows.append(_versus(ours(name, args, overrides, small), base_rate))
            print(speed_rows[-1], flush=True)
            save()

    if "scaling" in sections:
        rows = report["scaling"] = []
        for precision in plan["precisions"]:
            for batch in plan["batches"]:
                overrides = [f"train.per_device_batch_size={batch}", f"train.mixed_precision={precision}",
                             "perf.channels_last=true", *(CPU_REWRITES if args.device == "cpu" else [])]
                rows.append({"batch": batch, **ours(f"batch {batch}, {precision}", args, overrides, large_steps(batch))})
                print(rows[-1], flush=True)
                save()
        # Our best setting on this machine: the fastest one-process row measured so far.
        measured = [r for r in speed_rows + rows if "images_per_s" in r and not r["row"].startswith("reference")
                    and r["processes"] == 1 and "compile" not in r["settings"]]
        if measured:
            best = dict(max(measured, key=lambda r: r["images_per_s"]))
            best_overrides = [] if best["settings"] == "defaults" else best["settings"].split()
            best["batch"] = _batch_of(best_overrides, 20)
            best_row = {k: v for k, v in best.items() if k != "batch"}
            speed_rows.append(_versus({**best_row, "row": "ours, best setting (the fastest above)"}, base_rate))
            speed_rows.append(_versus(ours("ours, best setting + compile", args, best_overrides + ["perf.compile=true"],
                                           large_steps(best["batch"])), base_rate))
            print(speed_rows[-1], flush=True)
            report["speed"] = speed_rows
            save()
            times = args.confirm if args.confirm is not None else (3 if args.device == "cpu" else 0)
            if times:
                confirm(best_overrides, best["batch"], times)
        if args.device == "cpu":
            # One process against two of one thread each, at the same global batch of 128,
            # then two processes at smaller batches (small batches are no slower per image here).
            for processes, per_device in ((1, 128), (2, 64), (2, 32), (2, 20)):
                overrides = [f"train.per_device_batch_size={per_device}", "perf.channels_last=true", *CPU_REWRITES]
                global_batch = processes * per_device
                rows.append({"batch": global_batch, **ours(f"{processes} process(es) x {per_device}, no", args,
                                                           overrides, large_steps(global_batch), processes=processes)})
                print(rows[-1], flush=True)
                save()

    if "confirm" in sections and "scaling" not in sections:  # alone: at --batch, the best CPU settings
        batch = args.batch or 20
        rewrites = CPU_REWRITES if args.device == "cpu" else []
        confirm([f"train.per_device_batch_size={batch}", *rewrites], batch, args.confirm if args.confirm is not None else 3)

    if "tuning" in sections:
        batch = args.batch or (best["batch"] if "scaling" in sections and measured else None)
        rows = report["tuning"] = []
        settings = [o.split() for o in args.tuning] if args.tuning else TUNING[args.device]
        for overrides in settings if batch else []:
            row_batch = _batch_of(overrides, batch)
            rows.append(_versus(ours(f"batch {row_batch}", args, [f"train.per_device_batch_size={row_batch}", *overrides],
                                     large_steps(row_batch)), base_rate))
            print(rows[-1], flush=True)
            save()

    if "quality" in sections:
        ttq = report["quality"] = [time_to_quality(args, plan["fast_config"], REFERENCE_PSNR_DB, timeout=3600,
                                                   processes=args.ttq_processes)]
        print(ttq[-1], flush=True)
        save()
        if args.reference_ttq == "full":
            row, evals = reference(args, 0, target_psnr=REFERENCE_PSNR_DB)
            hit = next((e for e in evals if e["eval/psnr_db"] >= REFERENCE_PSNR_DB), None)
            ref = {"row": "reference recipe", "settings": "run to the target"}
            if hit:
                ref.update(seconds=round(hit["wall_s"], 1), epoch=hit["epoch"], psnr_db=round(hit["eval/psnr_db"], 2))
            else:
                ref["error"] = row.get("error", "did not reach the target in 20 epochs")
        else:
            ips = speed_rows[0].get("images_per_s")
            ref = {"row": "reference recipe (estimated)", "epoch": REFERENCE_EPOCHS_TO_QUALITY,
                   "settings": f"{REFERENCE_EPOCHS_TO_QUALITY} epochs x 60,000 images at its measured images/s"}
            if ips:
                ref["seconds"] = round(REFERENCE_EPOCHS_TO_QUALITY * 60_000 / ips, 1)
        ttq.append(ref)
        if "seconds" in ttq[0] and "seconds" in ref:
            ttq[0]["vs_reference"] = round(ref["seconds"] / ttq[0]["seconds"], 2)
        print(ttq[-1], flush=True)

    if "full" in sections:
        report["full"] = []
        for overrides in args.full or (["perf.cuda_graphs=true perf.channels_last=false"] if args.device == "cuda" else [""]):
            report["full"].append(full_run(args, overrides.split()))
            print(report["full"][-1], flush=True)
            save()

    if "floor" in sections and args.device == "cuda":
        ours_rows = [r for r in report.get("speed", []) + report.get("tuning", [])
                     if "images_per_s" in r and not r["row"].startswith("reference")]
        report["floor"] = floor(device_name, max(ours_rows, key=lambda r: r["images_per_s"], default={}))

    print(save())
    return 0


if __name__ == "__main__":
    sys.exit(main())
