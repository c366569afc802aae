"""One optimizer step captured as a CUDA graph and replayed, for small batches on one GPU.

At the reference batch of 20 a step is ~100 kernels of a few microseconds each: launching
them from Python costs more than running them. A captured graph launches all of them at
once. The graph holds the model's forward and backward passes and the optimizer step; what
changes between steps, the batch (clean and noisy images), is copied into static tensors the
graph reads. Everything else the step touches (weights, gradients, optimizer state) keeps
its address.

Capture needs a few eager warm-up steps first (optimizer state, cuDNN workspaces, autograd's
buffers). They would train the model, so the weights, buffers and optimizer state are
snapshotted before and written back, in place, after: the first replayed step starts from
exactly the state the run had.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

StepFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (clean, noisy) -> detached loss
EpochFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # (indices, key) -> every batch

WARMUP_STEPS = 3  # eager steps before capture; torch's examples use 3 (DDP needs 11, not used here)


class CapturedStep:
    """`step_fn(clean, noisy)` (forward, backward, optimizer step) as a replayable CUDA graph,
    for batches shaped like `batch` (whose values only serve the warm-up steps). It has the
    training loop's step interface (train.loop.EagerStep's): `batches` and a call per step.

    On a CPU there is nothing to capture: the same warm-up and restore run, and `replay`
    calls `step_fn` eagerly on the static tensors. The tests use that to check the
    bookkeeping; only a GPU shows the capture itself.
    """

    def __init__(self, step_fn: StepFn, batch: torch.Tensor, model: nn.Module,
                 optimizer: torch.optim.Optimizer, make_epoch: EpochFn | None = None) -> None:
        self.step_fn, self.make_epoch = step_fn, make_epoch
        self.clean, self.noisy = batch.clone(), batch.clone()
        device = batch.device
        saved = _snapshot(model, optimizer)
        self.graph: torch.cuda.CUDAGraph | None = None
        if device.type == "cuda":
            side = torch.cuda.Stream(device)  # warm-up off the default stream, as capture requires
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(WARMUP_STEPS):
                    step_fn(self.clean, self.noisy)
            torch.cuda.current_stream(device).wait_stream(side)
            optimizer.zero_grad(set_to_none=True)  # the captured backward allocates its own gradients
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.loss = step_fn(self.clean, self.noisy)
        else:
            for _ in range(WARMUP_STEPS):
                step_fn(self.clean, self.noisy)
        _restore(model, optimizer, saved)

    def batches(self, epoch_indices: torch.Tensor, key: torch.Tensor) -> Callable[[int], tuple]:
        """The epoch's micro-batches, all made in one pass before the first step: the graph
        holds only the model's and the optimizer's kernels, so the batches' ~45 small kernels
        a step would otherwise launch one by one."""
        clean_all, noisy_all = self.make_epoch(epoch_indices, key)
        return lambda m: (clean_all[m], noisy_all[m])

    def __call__(self, clean: torch.Tensor, noisy: torch.Tensor, micro_step: int) -> torch.Tensor:
        """A whole optimizer step (no accumulation under a graph); returns its loss on the device."""
        return self.replay(clean, noisy)

    def replay(self, clean: torch.Tensor, noisy: torch.Tensor) -> torch.Tensor:
        """Run one step on this batch (tensors on the device); returns the step's loss, on the device."""
        self.clean.copy_(clean, non_blocking=True)
        self.noisy.copy_(noisy, non_blocking=True)
        if self.graph is None:
            return self.step_fn(self.clean, self.noisy)
        self.graph.replay()
        return self.loss


def _model_tensors(model: nn.Module) -> list[torch.Tensor]:
    return list(model.parameters()) + list(model.buffers())


def _snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Copies of everything a training step changes. Optimizer state that does not exist
    yet (a fresh run) is recorded as None: it is created by the warm-up and zeroed after,
    which is what Adam's fresh state is (moments 0, step 0)."""
    return {
        "model": [t.detach().clone() for t in _model_tensors(model)],
        "optimizer": {p: {k: v.clone() for k, v in optimizer.state[p].items() if torch.is_tensor(v)}
                      if p in optimizer.state else None
                      for group in optimizer.param_groups for p in group["params"]},
    }


@torch.no_grad()
def _restore(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Write the snapshot back in place: the graph holds these tensors' addresses."""
    for t, value in zip(_model_tensors(model), saved["model"]):
        t.copy_(value)
    for p, state in saved["optimizer"].items():
        for k, v in optimizer.state[p].items():
            if not torch.is_tensor(v):
                continue
            if state is None:
                v.zero_()
            else:
                v.copy_(state[k])
