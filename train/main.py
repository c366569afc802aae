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
Exit status: 0 done; 75 stopped by SIGTERM/SIGINT/SIGUSR1/SIGHUP after saving a checkpoint (run
the same command to resume); 2 a mistake to fix (one line on stderr says which); 1 anything else.
OUTPUT_DIR/status.json records the same outcome for scripts (accelerate launch turns every
non-zero status into 1); `python -m train.status OUTPUT_DIR` reads it.
"""

from __future__ import annotations

import argparse
import gc
import os
import secrets
import signal
import sys
from pathlib import Path

# Run as a script, this folder would be sys.path[0] and shadow stdlib/third-party modules
# with ours; put the repository root there instead so `train.*` imports work uninstalled.
if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from train import lifecycle  # noqa: E402
from train.errors import UserError, counted  # noqa: E402


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        raise UserError(f"{message}: usage is main.py [--config FILE] [--debug] [section.key=value ...]")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=os.path.expanduser,  # the shell leaves ~ alone in --config=~/x
                        help="YAML config (defaults: configs/default.yaml's values)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors too")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    return parser.parse_intermixed_args(argv)  # overrides may come before and after --config


def run(args: argparse.Namespace, status: lifecycle.RunStatus, stop: lifecycle.StopFlag) -> int:
    from train.config import load_config

    cfg = load_config(args.config, args.overrides)  # every config error before torch is imported
    output_dir = Path(cfg.output_dir)

    import torch

    from train import checkpoint
    from train.data import build_splits
    from train.distributed import build_accelerator, check_same_settings, check_shared_folder, decided_on_main, describe
    from train.loop import Trainer, build_optimizer
    from train.model import build_model
    from train.plan import plan_of, schedule_of
    from train.rundir import RunDir
    from train.perf import apply_perf, check_perf, maybe_keep_freed_host_memory
    from train.tracking import build_tracker, log_start

    notes = maybe_keep_freed_host_memory(cfg.perf)  # before the data and the model allocate anything
    stop.install()  # from here on a stop signal ends start-up at once, or training at the next step
    lifecycle.watch_launcher(stop)
    accelerator = build_accelerator(cfg.train.mixed_precision, cfg.train.collective_timeout_s)
    status.is_main = accelerator.is_main_process  # the one source of "main process" from here on
    status.is_local_main = accelerator.is_local_main_process
    check_perf(cfg.perf, cfg.train, accelerator)
    if cfg.train.exact_reduction:
        from train.exact import pin_kernels

        notes += pin_kernels(accelerator.device)
    rundir = status.rundir = RunDir(output_dir)  # the folder is the run's from here; undone if it is refused
    # The main process alone claims the folder and picks the checkpoint (another node may see other
    # files); every rank gets its answer, or its refusal.
    notes += decided_on_main(accelerator, rundir.claim)
    check_shared_folder(accelerator, rundir)
    resume_from, skipped = decided_on_main(
        accelerator, lambda: checkpoint.choose_resume(output_dir, cfg.checkpoint.resume))
    notes += skipped

    train_split, test_split = build_splits(cfg.data, accelerator, notes)
    if cfg.data.dataset == "images":  # config.yaml says what the model takes (denoise reads it)
        cfg.data.channels = train_split.sample_shape[0]

    plan = plan_of(cfg.train, accelerator.num_processes)
    if not cfg.train.global_batch_size and plan.processes > 1:  # a new user's 2-process run trains at 2x the batch
        notes.append(f"global batch {plan.global_batch} = {plan.per_device_batch_size} per process x "
                     f"{plan.processes} processes{f' x {plan.accumulation} accumulation steps' if plan.accumulation > 1 else ''}: "
                     f"another number of processes changes it (and the run's result); "
                     f"train.global_batch_size={plan.global_batch} keeps it")
    compat = checkpoint.compat_of(cfg, plan, accelerator.mixed_precision, train_split)
    check_same_settings(accelerator, {**cfg.flat(), **compat, "data.test_fingerprint": test_split.fingerprint})
    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank (DDP also broadcasts)
    model = build_model(cfg.model.name, **cfg.model.settings(), **cfg.data.model_settings())
    notes += apply_perf(model, cfg.perf, accelerator.device.type, accelerator.mixed_precision)
    optimizer = build_optimizer(model, plan.peak_lr, capturable=cfg.perf.cuda_graphs)
    model, optimizer = accelerator.prepare(model, optimizer)
    state = checkpoint.TrainerState(compat=compat)
    own = resume_from is not None and checkpoint.is_own(output_dir, resume_from)
    if resume_from is not None:
        fix = checkpoint.remedy(own)
        state = checkpoint.load(accelerator, resume_from, state.compat, optimizer,
                                defaults={"model.settings": cfg.model.default_settings()}, notes=notes, fix=fix)
        checkpoint.check_same_state(accelerator, state, resume_from)
        schedule = schedule_of(cfg, plan, len(train_split))
        if cfg.train.exact_reduction:  # micro-steps of another world size: the position is its optimizer steps
            state.micro_step = (state.step - state.epoch * schedule.steps_per_epoch) * schedule.accumulation
        schedule.check_resume(state, resume_from, fix)
    status.accepted = True  # only now: a refused resume leaves the folder as it was
    status.step = state.step
    status.record("running", 0)
    if not own or not state.run_id:  # a run started from another run's checkpoint is a run of its own, in wandb too
        state.run_id = secrets.token_hex(4)  # the wandb run id; only the main process uses it

    setup = {**describe(accelerator), "global_batch": plan.global_batch,
             "per_device_batch": plan.per_device_batch_size, "lr": plan.peak_lr}
    tracker = build_tracker(accelerator, rundir, cfg.to_dict(), setup, cfg.logging.wandb_mode,
                            cfg.logging.wandb_project, state.run_id,
                            resume=(state.step, state.metrics_lines) if own else None)  # else a new history
    log_start(tracker, cfg, setup, sum(p.numel() for p in model.parameters()), notes)
    if resume_from is not None:
        tracker.info(f"resuming from {resume_from} (step {state.step}, epoch {state.epoch}; "
                     f"written by {counted(state.world_size, 'process') if state.world_size else '? processes'}, "
                     f"now {plan.processes})")
    state.world_size = plan.processes

    def on_progress(step: int) -> None:  # keep status.json's step current, for a run killed without a word
        status.step = step
        status.record("running", 0)

    trainer = Trainer(cfg, plan, accelerator, model, optimizer, train_split, test_split, state, tracker, stop,
                      on_progress)
    try:
        trainer.fit()
    finally:
        status.step = state.step
    accelerator.wait_for_everyone()
    weights = checkpoint.save_weights(accelerator, model, output_dir)
    tracker.info(f"done: {counted(state.step, 'step')}; weights in {weights}")
    accelerator.end_training()
    status.record("completed", 0)
    return 0


def main(argv: list[str] | None = None) -> int:
    debug = "--debug" in (sys.argv[1:] if argv is None else argv) or os.environ.get("DENOISE_DEBUG") == "1"
    status = lifecycle.RunStatus()
    stop = lifecycle.StopFlag(status)
    try:
        return run(parse_args(argv), status, stop)
    except BaseException as e:
        code = lifecycle.ended(e, status, debug)
        if code == 2 and not status.is_main and not stop.installed:  # a start-up error that only the main one prints
            lifecycle.wait_for_the_main_process()
        return code
    finally:  # the outcome is recorded: a stop signal now (a launcher ending the other ranks) is moot
        if stop.installed:
            lifecycle.ignore_stop_signals()
        status.remove_unaccepted()


if __name__ == "__main__":
    # Hold stop signals until StopFlag.install takes them (train/lifecycle.py). A launcher ends the other ranks with
    # SIGTERM as soon as one exits; a config error is the same on every rank but only the main
    # process prints it, so it must not die of a faster rank's error before printing.
    signal.pthread_sigmask(signal.SIG_BLOCK, lifecycle.STOP_SIGNALS)
    code = main()
    # Exempt what is left from the collections of the interpreter's exit (atexit handlers and
    # reference counting still run): they walk every object torch made, most of the exit's
    # time (bench/process_overhead.py).
    gc.freeze()
    sys.exit(code)
