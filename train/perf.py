"""The speed settings (`perf.*`): refused where the launch cannot honour them, then applied
to the model in the one order that works. None of them changes the model's parameters or
their names, so a checkpoint resumes under any of them (docs/performance.md says what each
one is worth on which hardware).
"""

from __future__ import annotations

import importlib.util

import torch
from accelerate import Accelerator
from torch import nn

from train import cpu_layers
from train.config import PerfConfig, TrainConfig
from train.distributed import LaunchError
from train.first_block import fuse_first_block
from train.thin_conv import pad_thin_convs


def check_perf(perf: PerfConfig, train: TrainConfig, accelerator: Accelerator) -> None:
    """Refuse speed settings this launch cannot honour, before any work is done."""
    if perf.fuse_first_block and accelerator.device.type == "cuda" and importlib.util.find_spec("triton") is None:
        raise LaunchError("perf.fuse_first_block=true needs Triton on a GPU and it is not installed: "
                          "pip install triton, or set perf.fuse_first_block=false")
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
    if perf.fuse_first_block:
        fuse_first_block(model, perf.channels_last)  # the config checked that the model has the block
        if device_type != "cuda":
            notes.append(f"perf.fuse_first_block on {device_type}: the first block runs as plain tensor ops "
                         "(the form its GPU kernels are checked against), slower than the library's conv")
    if perf.pad_thin_convs:  # after the fusing, which matches plain nn.Conv2d layers only
        pad_thin_convs(model, perf.channels_last)
    if perf.cpu_layers:
        unsupported = cpu_layers.cpu_layers_unsupported(device_type, mixed_precision, perf.compile)
        if unsupported:
            notes.append(f"perf.cpu_layers not applied: {unsupported}")
        else:
            cpu_layers.use_cpu_layers(model)  # faster CPU forms of two layers; the same parameters and names
    if perf.compile:
        model.compile(mode=perf.compile_mode)  # in place: parameter names and checkpoints stay the eager model's
    return notes
