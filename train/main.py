"""Train the MNIST denoising autoencoder.

    # one process (CPU, or one GPU):
    accelerate launch train/main.py --config configs/default.yaml data.root=/data/mnist
    # all GPUs of one node:
    accelerate launch --multi_gpu --num_processes 8 train/main.py --config configs/default.yaml
    # several processes on a machine without GPUs (gloo):
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 train/main.py
    # two nodes, 8 GPUs each (run on each node with its --machine_rank; see slurm/):
    accelerate launch --multi_gpu --num_machines 2 --num_processes 16 --machine_rank $NODE_RANK \\
        --main_process_ip $MASTER_ADDR --main_process_port 29500 train/main.py

Overrides follow the script as section.key=value (YAML scalars), e.g. train.epochs=3.
Exit status: 0 done; 75 stopped by SIGTERM/SIGINT/SIGUSR1 after saving a checkpoint (run the
same command to resume); 2 a mistake to fix (one line on stderr says which); 1 anything else.
OUTPUT_DIR/status.json records the same outcome for scripts (accelerate launch turns every
non-zero status into 1).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from pathlib import Path

# Run as a script, this folder would be sys.path[0] and shadow stdlib/third-party modules
# with ours; put the repository root there instead so `train.*` imports work uninstalled.
if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from train.errors import UserError  # noqa: E402


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        raise UserError(f"{message}: usage is main.py [--config FILE] [--debug] [section.key=value ...]")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (defaults: configs/default.yaml's values)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors too")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    return parser.parse_intermixed_args(argv)  # overrides may come before and after --config


class _Outcome:
    """Records how the run ended: in OUTPUT_DIR/status.json once the main process made that
    folder, or from the start in $DENOISE_STATUS_FILE when a script set it (so even a config
    error is recorded where slurm/denoise.sh looks). Only the global main process records,
    except failures, which any rank may record: the launcher may kill rank 0 before it can."""

    def __init__(self) -> None:
        from_env = os.environ.get("DENOISE_STATUS_FILE")
        self.path = Path(from_env) if from_env else None
        self.is_main = os.environ.get("RANK", "0") == "0"
        self.step: int | None = None

    def set_output_dir(self, output_dir: Path) -> None:
        if self.path is None:
            from train.tracking import STATUS_FILE

            self.path = output_dir / STATUS_FILE

    def record(self, outcome: str, exit_code: int, message: str = "") -> None:
        if self.path is not None and (self.is_main or outcome == "failed"):
            from train.tracking import write_status

            write_status(self.path, outcome, exit_code, self.step, message)


def run(args: argparse.Namespace, outcome: _Outcome) -> int:
    from train.config import load_config

    cfg = load_config(args.config, args.overrides)  # all config errors before any heavy import

    import torch

    from train import checkpoint
    from train.config import save_config
    from train.data import load_mnist
    from train.distributed import build_accelerator, describe
    from train.host_memory import keep_freed_host_memory
    from train.loop import Trainer, build_optimizer
    from train.model import build_model
    from train.perf import apply_perf, check_perf
    from train.preemption import PREEMPTED_EXIT, Preempted, StopFlag
    from train.tracking import build_tracker

    # Before the data and the model allocate anything: from here freed host memory is reused.
    kept_host_memory = cfg.perf.reuse_host_memory and keep_freed_host_memory()
    stop = StopFlag()
    stop.install()  # from here on a stop signal is honoured at the next optimizer step
    accelerator = build_accelerator(cfg.train.mixed_precision, cfg.train.collective_timeout_s)
    check_perf(cfg.perf, cfg.train, accelerator)
    output_dir = Path(cfg.output_dir)
    resume_from = _prepare_output_dir(accelerator, cfg, checkpoint)
    if accelerator.is_main_process:
        outcome.set_output_dir(output_dir)

    # Download once: the global main process first, then (for nodes without a shared
    # filesystem) each node's local main process, then everyone else reads the files.
    with accelerator.main_process_first(), accelerator.local_main_process_first():
        train_split, test_split = load_mnist(cfg.data.root, cfg.data.download, accelerator.device,
                                             cfg.data.train_samples, cfg.data.test_samples)

    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank (DDP also broadcasts)
    model = build_model(cfg.model.name, **cfg.model.settings())
    notes = apply_perf(model, cfg.perf, accelerator.device.type, accelerator.mixed_precision)
    if cfg.perf.reuse_host_memory and not kept_host_memory:
        notes.append("perf.reuse_host_memory had no effect: the C library is not glibc (or refused the thresholds), "
                     "so malloc keeps its own settings")
    global_batch = cfg.train.per_device_batch_size * accelerator.num_processes * cfg.train.gradient_accumulation_steps
    lr = cfg.train.effective_lr(global_batch)
    setup = {**describe(accelerator), "global_batch": global_batch, "lr": lr}
    optimizer = build_optimizer(model, lr, capturable=cfg.perf.cuda_graphs)
    model, optimizer = accelerator.prepare(model, optimizer)

    state = checkpoint.TrainerState(compat=_checkpoint_compat(cfg, accelerator))
    if resume_from is not None:
        state = checkpoint.load(accelerator, resume_from, state.compat,
                                defaults={"model.settings": cfg.model.default_settings()})
    if accelerator.is_main_process:  # only now: a refused resume leaves the folder as it was
        save_config(cfg, output_dir / "config.yaml")
        (output_dir / "setup.json").write_text(json.dumps(setup, indent=1) + "\n")
        outcome.record("running", 0)
    if not state.run_id:
        state.run_id = secrets.token_hex(4)  # the wandb run id; only the main process uses it

    tracker = build_tracker(accelerator, output_dir, {**cfg.to_dict(), "setup": setup}, cfg.logging.wandb_mode,
                            cfg.logging.wandb_project, state.run_id,
                            resume_step=state.step if resume_from is not None else None)
    _log_start(tracker, cfg, setup, model, notes)
    if resume_from is not None:
        tracker.info(f"resuming from {resume_from} (step {state.step}, epoch {state.epoch})")

    trainer = Trainer(cfg, accelerator, model, optimizer, train_split, test_split, state, tracker, stop)
    try:
        trainer.fit()
    except Preempted as p:
        outcome.step = p.step
        tracker.info(str(p))
        outcome.record("preempted", PREEMPTED_EXIT, str(p))
        return PREEMPTED_EXIT
    outcome.step = state.step
    accelerator.wait_for_everyone()
    accelerator.save_model(model, str(output_dir))  # model.safetensors, on the main process
    tracker.info(f"done: {state.step} steps; weights in {output_dir / 'model.safetensors'}")
    accelerator.end_training()
    outcome.record("completed", 0)
    return 0


def _checkpoint_compat(cfg, accelerator) -> dict[str, object]:
    """What a checkpoint must share with this run to resume it: the weights' shapes, the
    global micro-batch (which fixes the data order) and the accumulation (which groups it
    into optimizer steps), the seed, the data, the precision, and where the learning rate
    depends on the step, its schedule."""
    tc = cfg.train
    compat = {
        "model.name": cfg.model.name,
        **({"model.settings": cfg.model.settings()} if cfg.model.settings() else {}),  # they set the weights' shapes
        "global_micro_batch": tc.per_device_batch_size * accelerator.num_processes,
        "train.gradient_accumulation_steps": tc.gradient_accumulation_steps,
        "train.seed": tc.seed,
        "data.train_samples": cfg.data.train_samples,
        "mixed_precision": accelerator.mixed_precision,
    }
    if tc.lr_schedule != "constant" or tc.warmup_steps:  # the learning rate of each step depends on these
        compat.update({"train.lr_schedule": tc.lr_schedule, "train.warmup_steps": tc.warmup_steps,
                       "train.epochs": tc.epochs, "train.max_steps": tc.max_steps})
    return compat


def _log_start(tracker, cfg, setup: dict[str, object], model, notes: list[str]) -> None:
    """The run's settings as they are in effect, first in the log."""
    tracker.info("setup: " + ", ".join(f"{k}={v}" for k, v in setup.items()))
    n_params = sum(p.numel() for p in model.parameters())
    tracker.info(f"model {cfg.model.name}: {n_params:,} parameters; output in {cfg.output_dir}")
    tracker.info(f"noise: train {cfg.noise.train_spec().describe()}, test {cfg.noise.eval_spec().describe()}")
    tc = cfg.train
    tracker.info(f"global batch {setup['global_batch']} images per optimizer step, lr {setup['lr']:g} "
                 f"(train.lr_scaling={tc.lr_scaling}, train.lr_schedule={tc.lr_schedule}, {tc.warmup_steps} warm-up "
                 f"steps); perf: " + ", ".join(f"{k}={v}" for k, v in vars(cfg.perf).items()))
    for note in notes:
        tracker.info(note)


def _prepare_output_dir(accelerator, cfg, checkpoint) -> Path | None:
    """Create output_dir (checking it is writable) and pick the checkpoint to resume from."""
    output_dir = Path(cfg.output_dir)
    warn = print if accelerator.is_main_process else (lambda message: None)
    resume_from = checkpoint.find_resume(output_dir, cfg.checkpoint.resume, warn=warn)
    if resume_from is None and cfg.checkpoint.resume == "none" and checkpoint.has_checkpoints(output_dir):
        raise UserError(
            f"output_dir {output_dir} already holds checkpoints of another run and checkpoint.resume=none "
            f"would overwrite them: choose a new output_dir, or set checkpoint.resume=auto to continue it"
        )
    if accelerator.is_main_process:
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot write to output_dir {output_dir} ({e.strerror}): choose a writable folder") from e
        if not os.access(output_dir, os.W_OK):
            raise UserError(f"cannot write to output_dir {output_dir} (permission denied): choose a writable folder")
    accelerator.wait_for_everyone()
    return resume_from


def main(argv: list[str] | None = None) -> int:
    debug = "--debug" in (sys.argv[1:] if argv is None else argv) or os.environ.get("DENOISE_DEBUG") == "1"
    outcome = _Outcome()
    try:
        return run(parse_args(argv), outcome)
    except UserError as e:
        outcome.record("failed", 2, str(e))
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except BaseException as e:  # a bug or a crash: keep the traceback, but record the outcome
        outcome.record("failed", 1, f"{type(e).__name__}: {e}")
        raise


if __name__ == "__main__":
    sys.exit(main())
