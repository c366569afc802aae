"""The speed settings (`perf.*`): refused where the launch cannot honour them, then applied
to the model in the one order that works. torch's own switches (cuDNN's kernel choice,
channels_last, compile) are set here; the rewrites live in train/speed/, imported only when
a setting asks for one. None of them changes the model's parameters or their names, so a
checkpoint resumes under any of them (docs/performance.md says what each is worth where).
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch import nn

from train.config import PerfConfig, TrainConfig
from train.distributed import LaunchError


def check_perf(perf: PerfConfig, train: TrainConfig, accelerator: Accelerator) -> None:
    """Refuse speed settings this launch cannot honour, before any work is done."""
    if train.exact_reduction and (perf.cudnn_benchmark or perf.cuda_graphs):
        raise LaunchError("train.exact_reduction=true needs the same kernels on every world size: set "
                          "perf.cudnn_benchmark=false and perf.cuda_graphs=false (or train.exact_reduction=false)")
    if not perf.cuda_graphs:
        return
    problems = []
    if accelerator.device.type != "cuda":
        problems.append("a CUDA GPU (there is none)")
    if accelerator.num_processes > 1:
        problems.append(f"one process (this launch has {accelerator.num_processes}; DDP's hooks are not captured)")
    if train.gradient_accumulation_steps > 1:
        problems.append("train.gradient_accumulation_steps=1")
    if accelerator.mixed_precision == "fp16":
        problems.append("no fp16 (its loss scaler decides on the host; use bf16)")
    if train.lr_schedule != "constant" or train.warmup_steps > 0:
        problems.append("train.lr_schedule=constant and train.warmup_steps=0 (the captured step keeps its learning rate)")
    if problems:
        raise LaunchError(f"perf.cuda_graphs=true needs {'; '.join(problems)}: set perf.cuda_graphs=false or fix that")


def maybe_keep_freed_host_memory(perf: PerfConfig) -> list[str]:
    """perf.reuse_host_memory, set before the data and the model allocate anything; returns
    a note for the log where it cannot apply."""
    if not perf.reuse_host_memory:
        return []
    from train.speed.host_memory import keep_freed_host_memory

    if keep_freed_host_memory():
        return []
    return ["perf.reuse_host_memory had no effect: the C library is not glibc (or refused the thresholds), "
            "so malloc keeps its own settings"]


def apply_perf(model: nn.Module, perf: PerfConfig, device_type: str, mixed_precision: str) -> list[str]:
    """Apply `perf`'s model settings to `model` (in place; the same parameters and names) and
    set cuDNN's kernel choice. Returns what the log should say of settings that do not apply
    here or cost speed here."""
    # Deterministic cuDNN kernels unless autotuning is asked for: with them a GPU run repeats
    # bit for bit, and a resumed run ends where an uninterrupted one would.
    torch.backends.cudnn.benchmark = perf.cudnn_benchmark
    torch.backends.cudnn.deterministic = not perf.cudnn_benchmark
    notes = []
    if perf.channels_last:
        model.to(memory_format=torch.channels_last)  # weights NHWC: convs then pick NHWC kernels
    if perf.pad_thin_convs:
        from train.speed.thin_conv import pad_thin_convs

        pad_thin_convs(model, perf.channels_last)
    if perf.cpu_layers:
        from train.speed import cpu_layers

        unsupported = cpu_layers.cpu_layers_unsupported(device_type, mixed_precision, perf.compile)
        if unsupported:
            notes.append(f"perf.cpu_layers not applied: {unsupported}")
        else:
            cpu_layers.use_cpu_layers(model)  # faster CPU forms of two layers; the same parameters and names
    if perf.compile:
        model.compile(mode=perf.compile_mode)  # in place: parameter names and checkpoints stay the eager model's
    return notes
