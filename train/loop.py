"""The training loop: micro-batches gathered on the device, noise made there, gradients
accumulated without all-reduce until the optimizer step, evaluation and checkpoints at epoch
ends. Runs identically on every rank; what is shown or written goes through the tracker.
"""

from __future__ import annotations

import contextlib
import functools
import math
import resource
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from train import checkpoint, metrics, noise
from train.checkpoint import TrainerState
from train.config import Config
from train.data import EpochOrder, Split
from train.errors import UserError, counted
from train.exact import ExactReduction
from train.plan import BatchPlan, lr_at, schedule_of
from train.faults import fault_point
from train.lifecycle import StopFlag, Stopped
from train.tracking import SAMPLES_KEY, NullTracker, picture_samples_png, sample_indices, samples_png


class NonFiniteLossError(UserError):
    """Training diverged: the loss became NaN or infinite."""


class CollapsedError(UserError):
    """Training collapsed: the model's output no longer depends on its input."""


BatchMaker = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def batch_maker(split: Split, spec: noise.NoiseSpec) -> BatchMaker:
    """`make(indices, key)`: the (clean, noisy) training batch of `split`'s samples `indices`
    in the epoch's stream `key` (an int32 device tensor: see noise.keyed_gaussian). `split`:
    MNIST's, or the patches of pictures (train/images.py), whose noise is hashed `wide`."""
    wide = not isinstance(split, Split)

    def make(indices: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        clean = split.batch(indices, key)
        return clean, noise.keyed_add_noise(clean, indices, spec, key, wide)

    return make


def epoch_batches(make: BatchMaker, epoch_indices: torch.Tensor,
                  key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (clean, noisy) micro-batch of an epoch at once, shaped (steps, batch, C, H, W):
    the same values `make` gives step by step, in one pass of ~45 kernels instead of one per
    step."""
    return tuple(t.view(*epoch_indices.shape, *t.shape[1:]) for t in make(epoch_indices.flatten(), key))


class EagerStep:
    """The training loop's step: `batches(epoch_indices, key)` gives each micro-step's batch,
    and a call runs one micro-step (forward, backward; at a window's end the optimizer step).
    perf.cuda_graphs swaps in train.speed.cuda_graph.CapturedStep, which has the same two."""

    def __init__(self, trainer: "Trainer") -> None:
        self.trainer = trainer

    def batches(self, epoch_indices: torch.Tensor, key: torch.Tensor) -> Callable[[int], tuple]:
        make = self.trainer.make_batch
        return lambda m: make(epoch_indices[m], key)

    def __call__(self, clean: torch.Tensor, noisy: torch.Tensor, micro_step: int) -> torch.Tensor:
        t = self.trainer
        loss = t._micro_step(clean, noisy, micro_step)
        if t.schedule.is_boundary(micro_step):
            t._maybe_set_lr()
            t._optimizer_step()
        return loss


def build_optimizer(model: nn.Module, lr: float, capturable: bool = False) -> torch.optim.Optimizer:
    """Adam with the fused kernel: one kernel for all parameters on the CPU or a GPU, instead
    of a Python loop or a dozen multi-tensor kernels per step. `capturable` keeps its step
    counter on the device, which CUDA graph capture needs."""
    return torch.optim.Adam(model.parameters(), lr=lr, fused=True, capturable=capturable)


class Trainer:
    """Owns the run's moving parts; `fit()` trains from `state` to the end of the schedule."""

    def __init__(self, cfg: Config, plan: BatchPlan, accelerator: Accelerator, model: nn.Module,
                 optimizer: torch.optim.Optimizer, train_split: Split, test_split: Split, state: TrainerState,
                 tracker: NullTracker, stop: StopFlag | None = None,
                 on_progress: Callable[[int], None] = lambda step: None) -> None:
        self.cfg, self.plan, self.accelerator, self.model, self.optimizer = cfg, plan, accelerator, model, optimizer
        self.train_split, self.test_split, self.state, self.tracker = train_split, test_split, state, tracker
        self.stop = stop or StopFlag()
        self.on_progress = on_progress  # called with the step at each logging step (status.json's step)
        self.output_dir = Path(cfg.output_dir)
        tc = cfg.train
        self.order = EpochOrder(len(train_split), plan.per_device_batch_size, plan.processes,
                                accelerator.process_index, tc.seed, blocked=tc.exact_reduction)
        # train.exact_reduction: gradients summed as integers over every forward pass of a step.
        self.forward_passes = plan.global_batch // plan.per_device_batch_size  # per optimizer step, all ranks
        self.exact = ExactReduction(model, self.forward_passes, accelerator.device) if tc.exact_reduction else None
        self.schedule = schedule_of(cfg, plan, len(train_split))
        self.scheduled_lr = tc.lr_schedule != "constant" or tc.warmup_steps > 0
        self.pictures = not isinstance(test_split, Split)  # data.dataset=images: scored picture by picture
        self.sample_indices = None if self.pictures else sample_indices(test_split, cfg.eval.num_sample_images)
        make_batch = batch_maker(train_split, cfg.noise.train_spec())
        # perf.compile also fuses the gather, the conversion and the noise hash (~45 small
        # integer and float kernels eager) into one.
        self.make_batch = torch.compile(make_batch) if cfg.perf.compile else make_batch
        self._settle_gradient_buckets()
        self.seconds = {"evaluation": 0.0, "checkpoints": 0.0}  # wall time of this process, by activity
        self.counts = {"evaluation": 0, "checkpoints": 0}
        self.train_step = EagerStep(self) if not cfg.perf.cuda_graphs else self._capture_step()
        if cfg.eval.min_output_std > 0 and len(test_split) < 2 and not self.pictures:
            tracker.info("eval.min_output_std is not applied: it compares test images, and there is only one")

    def _settle_gradient_buckets(self) -> None:
        """One throw-away backward pass, so every real step all-reduces in the same layout.

        DDP reorders its gradient buckets after its first backward pass (to the order the
        gradients became ready). With 3+ ranks the order of a bucket's elements changes how
        the all-reduce rounds, so a resumed run, whose first step would use the initial
        layout, would drift from an uninterrupted one. Zero input, gradients discarded: the
        weights and optimizer state are untouched.
        """
        if self.accelerator.num_processes < 2 or self.exact is not None:  # exact: DDP never reduces
            return
        dummy = torch.zeros(1, *self.train_split.sample_shape, device=self.accelerator.device)
        self.accelerator.backward(self.model(dummy).float().sum())
        self.optimizer.zero_grad(set_to_none=True)

    # -- one micro-step ------------------------------------------------------------------
    def _micro_step(self, clean: torch.Tensor, noisy: torch.Tensor, micro_step: int) -> torch.Tensor:
        """Forward and backward of one micro-batch of clean targets and noisy inputs."""
        boundary = self.schedule.is_boundary(micro_step) and self.exact is None
        # We pick the sync step ourselves instead of `accelerator.accumulate`: that one keys the
        # end of an epoch off a prepared DataLoader, which this job does not use (it would
        # shard the sampler twice). `no_sync` skips DDP's all-reduce on non-boundary steps.
        sync = contextlib.nullcontext() if boundary else self.accelerator.no_sync(self.model)
        with sync:
            out = self.model(noisy)
            loss = F.mse_loss(out.float(), clean)  # fp32 loss, whatever the autocast dtype
            # Mean over the window's samples: a short last window weighs its micro-batches
            # up, so every optimizer step sees the mean gradient of the images it used.
            # (accelerator.backward divides by its own accumulation steps, 1 here.) Exact:
            # each pass weighs 1/passes of the global step, the same on any world size.
            passes = self.forward_passes if self.exact is not None else self.schedule.window_len(micro_step)
            self.accelerator.backward(loss / passes)
        if self.exact is not None:
            self.exact.add(self._grad_scale())
        return loss.detach()

    def _grad_scale(self) -> float:
        """fp16's current loss scale (a power of two; a host sync), else 1."""
        return self.accelerator.scaler.get_scale() if self.accelerator.scaler is not None else 1.0

    def _maybe_set_lr(self) -> None:
        """The scheduled learning rate of the coming optimizer step (a function of the step)."""
        if not self.scheduled_lr:
            return
        lr = lr_at(self.cfg.train, self.state.step, self.schedule.total_steps, self.plan.peak_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _optimizer_step(self) -> None:
        if self.exact is not None:
            self.exact.reduce(self.accelerator, self._grad_scale())
        if self.cfg.train.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.train.max_grad_norm)
        self.optimizer.step()  # under fp16, the scaler skips steps with inf/NaN gradients
        self.optimizer.zero_grad(set_to_none=True)

    def _capture_step(self):
        """The CUDA-graph step (perf.check_perf allowed it: one process, no accumulation)."""
        from train.speed.cuda_graph import CapturedStep

        t0 = time.perf_counter()
        shape = (self.plan.per_device_batch_size, *self.train_split.sample_shape)
        captured = CapturedStep(self._graph_step, torch.rand(shape, device=self.accelerator.device), self.model,
                                self.optimizer, make_epoch=functools.partial(epoch_batches, self.make_batch))
        self.tracker.info(f"captured one optimizer step as a CUDA graph in {time.perf_counter() - t0:.1f} s")
        return captured

    def _graph_step(self, clean: torch.Tensor, noisy: torch.Tensor) -> torch.Tensor:
        """A whole optimizer step (accumulation is 1 here): what CapturedStep records."""
        loss = self._micro_step(clean, noisy, 0)
        self._optimizer_step()
        return loss

    # -- the loop ------------------------------------------------------------------------
    def fit(self) -> None:
        """Train from `state` to the end of the schedule. After each optimizer step: log when
        due; on a stop request every rank agreed on, save and raise Stopped; save when due.
        After each epoch: evaluate when due, save. A run that ends mid-epoch (max_steps) is
        evaluated there. Every save first logs the steps not yet logged, so a diverged model
        is never checkpointed."""
        s, sched, cfg = self.state, self.schedule, self.cfg
        total = sched.total_steps
        if s.step >= total:
            self.tracker.info(f"nothing to do: the checkpoint is at step {s.step} of {total}")
            return
        self.stop.deferred = True  # from here a stop request waits for the next optimizer step and its checkpoint
        self.tracker.progress(total=total, initial=s.step)
        window = _ThroughputWindow(self.accelerator, self.plan.global_micro_batch)
        started = time.perf_counter()
        while s.step < total and s.epoch < sched.epochs:
            batch = self._epoch_batches(s.epoch)
            while s.micro_step < sched.micro_steps_per_epoch and s.step < total:
                m = s.micro_step
                window.add_loss(self.train_step(*batch(m), m))
                s.micro_step += 1
                if not sched.is_boundary(m):
                    continue
                s.step += 1
                fault_point("after_step", s.step, self.accelerator.process_index)
                window.add_step(sched.window_len(m))
                self.tracker.advance()
                if s.step % cfg.logging.every_n_steps == 0:
                    self._log_train(window)
                if s.step < total and self.stop.any_rank_stopping(self.accelerator):
                    # At an epoch's last step the epoch-end evaluation is left to the resumed run;
                    # at the run's last step we just finish.
                    self._log_train(window)
                    self._save(window)
                    self.tracker.finish()
                    raise Stopped(self.stop.name, s.step, cfg.checkpoint.resume)
                if cfg.checkpoint.every_n_steps and s.step % cfg.checkpoint.every_n_steps == 0:
                    self._log_train(window)
                    self._save(window)
            if s.micro_step == sched.micro_steps_per_epoch:  # a whole epoch
                s.epoch, s.micro_step = s.epoch + 1, 0
                self._log_train(window)
                if s.epoch % cfg.eval.every_n_epochs == 0 or s.epoch == sched.epochs or s.step >= total:
                    self._evaluate(s.epoch)
                self._save(window)
        if s.micro_step != 0:  # stopped mid-epoch by max_steps: the end is always evaluated
            self._log_train(window)
            self._evaluate(s.epoch + s.micro_step / sched.micro_steps_per_epoch)
            self._save(window)
        self.tracker.finish()
        training = time.perf_counter() - started - sum(self.seconds.values())
        self.tracker.info(
            f"time: training {training:.1f} s, evaluation {self.seconds['evaluation']:.1f} s "
            f"({counted(self.counts['evaluation'], 'run')}), checkpoints {self.seconds['checkpoints']:.1f} s "
            f"({self.counts['checkpoints']} saved)"
        )

    def _epoch_batches(self, epoch: int) -> Callable[[int], tuple]:
        """`batch(m)`: the (clean, noisy) micro-batch of micro-step m of `epoch` on this rank."""
        epoch_indices = self.order.epoch_indices(epoch, self.accelerator.device)
        # The epoch's noise stream as a device tensor: a compiled make_batch serves every epoch.
        key = torch.tensor(noise.stream_key(self.cfg.train.seed, epoch), dtype=torch.int32,
                           device=self.accelerator.device)
        return self.train_step.batches(epoch_indices, key)

    def _log_train(self, window: "_ThroughputWindow") -> None:
        """Log the steps since the last log (none: nothing), or stop a diverged run."""
        if not window.pending_steps:
            return
        loss, images_per_s = window.read()  # syncs the device: only on logging steps and saves
        if not math.isfinite(loss):
            raise NonFiniteLossError(
                f"training loss became {loss} by step {self.state.step}: lower train.lr, set train.max_grad_norm "
                f"(e.g. 1.0), or use bf16 instead of fp16; the last good checkpoint is kept"
            )
        s = self.state  # epoch: epochs done, with the fraction of the one in progress, as in evaluation lines
        epochs_done = s.epoch + s.micro_step / self.schedule.micro_steps_per_epoch
        record = {"step": s.step, "epoch": round(epochs_done, 4), "train/loss": loss,
                  "train/lr": float(self.optimizer.param_groups[0]["lr"])}
        if images_per_s is not None:
            record["train/images_per_s"] = images_per_s
        record["memory/max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        if self.accelerator.device.type == "cuda":
            record["memory/max_allocated_gib"] = torch.cuda.max_memory_allocated(self.accelerator.device) / 2**30
        if self.accelerator.scaler is not None:  # fp16: the scale halves on each skipped (inf/NaN) step
            record["train/loss_scale"] = self.accelerator.scaler.get_scale()
        self.tracker.log(record)
        self.tracker.advance(0, loss=f"{loss:.4f}")
        self.on_progress(self.state.step)

    def _evaluate(self, epoch: float) -> None:
        # Evaluation's forward passes keep cuDNN's heuristic kernels even under
        # perf.cudnn_benchmark: timing every algorithm for its own batch shapes costs more than
        # all of a run's evaluations take (docs/performance.md).
        benchmark, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, False
        try:
            with self._timed("evaluation"):
                self._score(epoch)
        finally:
            torch.backends.cudnn.benchmark = benchmark

    def _score(self, epoch: float) -> None:
        model = self.accelerator.unwrap_model(self.model)  # no DDP hooks needed without gradients
        ev, ec = self.cfg.eval, self.cfg.noise
        if self.pictures:
            result = metrics.evaluate_pictures(model, self.test_split, self.accelerator, ec.eval_spec(), ec.eval_seed)
        else:
            result = metrics.evaluate(model, self.test_split, self.accelerator, ec.eval_spec(), ec.eval_seed,
                                      ev.per_device_batch_size)
        record = {"step": self.state.step, "epoch": round(epoch, 4), **result}
        self.tracker.log(record)
        self.tracker.info(
            f"step {self.state.step} epoch {epoch:g}: test PSNR {result['eval/psnr_db']:.2f} dB "
            f"(noisy {result['eval/noisy_psnr_db']:.2f} dB), SSIM {result['eval/ssim']:.4f}, "
            f"MSE {result['eval/mse']:.5f}"
        )
        shown = ev.num_sample_images if self.pictures else self.sample_indices
        render = picture_samples_png if self.pictures else samples_png
        self.tracker.save_image(SAMPLES_KEY, self.state.step, lambda: render(
            model, self.test_split, shown, ec.eval_spec(), ec.eval_seed))
        self._maybe_stop_collapsed(result)

    def _maybe_stop_collapsed(self, result: dict[str, float]) -> None:
        """Stop, before this state is checkpointed, if the outputs no longer depend on the inputs.

        Every rank holds the same gathered result, so all stop together. A collapsed model
        (e.g. all-black outputs: a dead ReLU layer or a saturated sigmoid) does not recover
        by training on; the checkpoints saved before it are kept.
        """
        threshold = self.cfg.eval.min_output_std
        if "eval/output_std" not in result or result["eval/output_std"] >= threshold or self.state.step < self.cfg.eval.collapse_check_from_step:
            return
        if len(self.test_split) < 2:  # a std across one image is 0 however well the model denoises
            return
        self.tracker.finish()
        raise CollapsedError(
            f"training collapsed by step {self.state.step}: the denoised test images no longer depend on the input "
            f"(output std {result['eval/output_std']:.2e} across images < eval.min_output_std {threshold:g}; "
            f"test MSE {result['eval/mse']:.4f}): lower train.lr or add train.warmup_steps and start again in a new "
            f"output_dir; the checkpoints before the collapse are kept"
        )

    def _save(self, window: "_ThroughputWindow") -> None:
        """Checkpoint this state; the time it takes is not training time."""
        self.state.metrics_lines = self.tracker.lines  # what a resume from this checkpoint keeps
        self.tracker.check_folder()  # never save into a folder another run may now hold
        with self._timed("checkpoints"):
            checkpoint.save(self.accelerator, self.output_dir, self.state, self.cfg.checkpoint.keep_last)
        window.restart()

    @contextlib.contextmanager
    def _timed(self, activity: str):
        """Add the block's wall time to `activity` (the block ends in a device sync: .item(), a save)."""
        t0 = time.perf_counter()
        yield
        self.seconds[activity] += time.perf_counter() - t0
        self.counts[activity] += 1


class _ThroughputWindow:
    """Loss and global images/s over the optimizer steps since the last read.

    The first optimizer step of the process is warm-up (allocator, kernel selection): it is
    left out of throughput, as is time spent evaluating and saving.
    """

    def __init__(self, accelerator: Accelerator, global_micro_batch: int) -> None:
        self.accelerator, self.global_micro_batch = accelerator, global_micro_batch
        self.warm = False
        self.restart()

    def restart(self) -> None:
        self.loss_sum = torch.zeros((), device=self.accelerator.device)
        self.micro_batches = 0
        self.pending_steps = 0
        self.images = 0
        self.t0 = time.perf_counter()

    def add_loss(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss  # stays on the device: no sync per step
        self.micro_batches += 1

    def add_step(self, micro_batches: int) -> None:
        self.pending_steps += 1
        if not self.warm:  # the clock starts after the warm-up step
            self.warm, self.t0 = True, time.perf_counter()
            return
        self.images += micro_batches * self.global_micro_batch

    def read(self) -> tuple[float, float | None]:
        """(mean train loss over all ranks, global images/s; None if only warm-up was timed)."""
        mean = self.accelerator.reduce(self.loss_sum / max(self.micro_batches, 1), reduction="mean")
        loss = mean.item()  # a device sync, so the clock below is read after the work is done
        elapsed = time.perf_counter() - self.t0
        images_per_s = self.images / elapsed if self.images and elapsed > 0 else None
        self.restart()
        return loss, images_per_s
