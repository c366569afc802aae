"""The run's plan, from its config and world size: batch sizes, the learning rate of every
optimizer step, and how many micro- and optimizer steps each epoch and the run have. Pure
functions of the config, computed once and passed to whatever needs them, so each name means
one thing everywhere and a resumed run needs no scheduler state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from train.config import ConfigError, TrainConfig
from train.checkpoint import CheckpointError
from train.data import EpochOrder
from train.errors import UserError


@dataclass(frozen=True)
class BatchPlan:
    """Batch sizes and the peak learning rate on `processes` processes."""

    per_device_batch_size: int
    processes: int
    accumulation: int
    """micro-steps per optimizer step"""
    peak_lr: float
    """the learning rate train.lr_scaling gives for global_batch (the schedule's peak)"""

    @property
    def global_micro_batch(self) -> int:
        """images per micro-step over all processes: it fixes the data order"""
        return self.per_device_batch_size * self.processes

    @property
    def global_batch(self) -> int:
        """images per optimizer step: the learning rate follows it"""
        return self.global_micro_batch * self.accumulation


def plan_of(tc: TrainConfig, processes: int) -> BatchPlan:
    """The run's batch sizes and peak learning rate on `processes` processes."""
    accumulation, per_device, wanted = tc.gradient_accumulation_steps, tc.per_device_batch_size, tc.global_batch_size
    if tc.exact_reduction:  # the forward batch is fixed; the micro-steps follow
        accumulation, left = divmod(wanted, per_device * processes)
        if accumulation < 1 or left:
            raise ConfigError(
                f"config key 'train.global_batch_size' ({wanted}) is not a whole number of forward passes of "
                f"{per_device} images on each of {processes} processes (train.exact_reduction=true): launch a number "
                f"of processes that divides {wanted // per_device}, or change train.per_device_batch_size")
    elif wanted:
        per_device, left = divmod(wanted, processes * accumulation)
        if per_device < 1 or left:
            raise ConfigError(
                f"config key 'train.global_batch_size' ({wanted}) does not split evenly over {processes} processes "
                f"x {accumulation} accumulation steps: make it a multiple of {processes * accumulation}, or launch "
                f"a number of processes that divides it")
    return BatchPlan(per_device, processes, accumulation, effective_lr(tc, per_device * processes * accumulation))


def effective_lr(tc: TrainConfig, global_batch: int) -> float:
    """The learning rate for `global_batch` images per optimizer step, by train.lr_scaling."""
    ratio = global_batch / tc.lr_reference_batch
    return tc.lr * {"none": 1.0, "sqrt": math.sqrt(ratio), "linear": ratio}[tc.lr_scaling]


def lr_at(tc: TrainConfig, step: int, total_steps: int, peak_lr: float) -> float:
    """The learning rate of optimizer step `step` (0-based) of `total_steps`: warm-up, then
    train.lr_schedule."""
    if step < tc.warmup_steps:
        return peak_lr * (step + 1) / (tc.warmup_steps + 1)
    if tc.lr_schedule == "constant":
        return peak_lr
    decay_steps = max(total_steps - tc.warmup_steps, 1)
    progress = min((step - tc.warmup_steps) / decay_steps, 1.0)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Schedule:
    """How many micro- and optimizer steps the run has. An epoch's last accumulation
    window may be shorter than `gradient_accumulation_steps`; it still steps."""

    micro_steps_per_epoch: int
    accumulation: int
    epochs: int
    max_steps: int

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.micro_steps_per_epoch / self.accumulation)

    @property
    def total_steps(self) -> int:
        full = self.epochs * self.steps_per_epoch
        return min(full, self.max_steps) if self.max_steps else full

    def window_len(self, micro_step: int) -> int:
        """Micro-batches in the accumulation window that holds `micro_step` (0-based, in the epoch)."""
        start = micro_step - micro_step % self.accumulation
        return min(self.accumulation, self.micro_steps_per_epoch - start)

    def is_boundary(self, micro_step: int) -> bool:
        """True on the micro-step that ends its window: gradients sync and the optimizer steps."""
        start = micro_step - micro_step % self.accumulation
        return micro_step + 1 == start + self.window_len(micro_step)

    def check_resume(self, state, path: Path, fix: str) -> None:
        """Refuse a checkpoint (`state`: its TrainerState) whose position this run could not have
        saved: the optimizer steps it counts must be those of its epoch and micro-step, at a
        window's end (an edited or buggy trainer_state.json would otherwise loop forever, finish
        at once or lose metrics). `fix`: what the refusal advises (checkpoint.remedy)."""
        m, n = state.micro_step, self.micro_steps_per_epoch
        at_boundary = 0 <= m <= n and (m % self.accumulation == 0 or m == n)
        steps = state.epoch * self.steps_per_epoch + math.ceil(m / self.accumulation)
        if state.epoch < 0 or not at_boundary or state.step != steps:
            raise CheckpointError(
                f"checkpoint {path} holds an impossible position (step {state.step}, epoch {state.epoch}, micro-step "
                f"{m}; this run has {n} micro-steps per epoch, {self.accumulation} per optimizer step): it was "
                f"edited or written by a bug: {fix}")


def schedule_of(cfg, plan: BatchPlan, num_samples: int) -> Schedule:
    """The run's schedule over `num_samples` training images (`cfg`: the run's Config)."""
    micro_steps = EpochOrder(num_samples, plan.per_device_batch_size, plan.processes, 0, cfg.train.seed).steps_per_epoch
    if cfg.train.exact_reduction:  # whole global batches only: the same optimizer steps on any world size
        micro_steps = num_samples // plan.global_batch * plan.accumulation
        if micro_steps == 0:
            raise UserError(f"the training set ({num_samples} images) is smaller than train.global_batch_size "
                            f"({plan.global_batch}): lower it or use more data")
    return Schedule(micro_steps, plan.accumulation, cfg.train.epochs, cfg.train.max_steps)
