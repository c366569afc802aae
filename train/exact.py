"""train.exact_reduction: gradients summed as integers, so the weights do not depend on the
number of processes.

Floating-point addition is not associative: the sum of a global batch's gradients depends on
how it was split over devices and micro-steps, and with it every weight after the first few
dozen steps. Here each forward pass always holds the same images (EpochOrder's blocked
layout), its gradient is rounded to a fixed-point integer at one scale on every rank and
world size, and the integers are summed: over micro-steps on each rank, then across ranks in
one int64 all-reduce. Integer addition is exact and associative, so every rank of every world
size turns back the same float gradient before clipping and the optimizer step.

Resolution 2**-SCALE_BITS (2.3e-10) per element and forward pass; range: a sum of at most
2**(62 - SCALE_BITS) (about 1e9) per element over the optimizer step. A gradient past the
range is refused (ExactRangeError), never wrapped around. A non-finite gradient anywhere makes
every rank's gradient NaN, so all take the same decision (fp16's loss scaler skips the step).
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch import nn

from train.errors import UserError

SCALE_BITS = 32  # fixed point: 2**-32 per unit
_LIMIT = 2.0 ** 62  # |integer sum| stays below this: int64 with a bit to spare


class ExactRangeError(UserError):
    """A gradient too large for the fixed-point sum."""


class ExactReduction:
    """Accumulates each micro-step's gradients as integers; `reduce` sums them over the ranks
    and writes the float gradient back to the parameters."""

    def __init__(self, model: nn.Module, forward_passes: int, device: torch.device) -> None:
        """`forward_passes`: of every rank together in one optimizer step (global / per-device batch)."""
        self.params = [p for p in model.parameters() if p.requires_grad]
        numel = sum(p.numel() for p in self.params)
        # The gradients, then two counts of forward passes: non-finite ones, and too large ones;
        # summed with them, so every rank learns of a problem on any rank in the same all-reduce.
        self.sum = torch.zeros(numel + 2, dtype=torch.int64, device=device)
        self.max_abs = _LIMIT / 2.0 ** SCALE_BITS / forward_passes  # per element and forward pass

    def add(self, grad_scale: float = 1.0) -> None:
        """Round this micro-step's gradients (divided by `grad_scale`, fp16's loss scale, a power
        of two, so exactly) to integers, add them to the sum, and clear them."""
        flat = torch.cat([p.grad.reshape(-1) for p in self.params]).double() / grad_scale
        finite = torch.isfinite(flat).all()
        flat = torch.where(finite, flat, torch.zeros_like(flat))
        self.sum[-2] += (~finite).to(torch.int64)
        self.sum[-1] += (flat.abs().max() > self.max_abs).to(torch.int64)
        self.sum[:-2] += torch.round(flat.clamp(-self.max_abs, self.max_abs) * 2.0 ** SCALE_BITS).to(torch.int64)
        for p in self.params:
            p.grad = None

    def reduce(self, accelerator: Accelerator, grad_scale: float = 1.0) -> None:
        """Sum the integers over the ranks and give each parameter the float gradient (times
        `grad_scale`, so fp16's scaler unscales it as it would its own); start a new sum."""
        if accelerator.num_processes > 1:
            torch.distributed.all_reduce(self.sum)
        if self.sum[-1].item():  # one host sync per optimizer step; the same answer on every rank
            raise ExactRangeError(
                f"a gradient element exceeded train.exact_reduction's range (|g| <= {self.max_abs:.3g} per forward "
                f"pass): lower train.lr, or train without train.exact_reduction")
        total = self.sum[:-2].double() / 2.0 ** SCALE_BITS * grad_scale
        total = torch.where(self.sum[-2] > 0, torch.full_like(total, float("nan")), total)
        start = 0
        for p in self.params:  # in the parameter's own layout (channels_last too)
            p.grad = torch.empty_like(p).copy_(total[start:start + p.numel()].view(p.shape))
            start += p.numel()
        self.sum.zero_()


def pin_kernels(device: torch.device) -> list[str]:
    """Make a forward pass's arithmetic independent of the launch: on a CPU, one intra-op
    thread (a kernel may split its sums by thread count, and launchers give each of N processes
    1 thread but a lone process all cores). On a GPU, perf.check_perf has ruled out cuDNN's
    timing-based kernel choice; the heuristic choice depends on the batch's shape alone."""
    if device.type != "cpu":
        return []
    torch.set_num_threads(1)
    return ["train.exact_reduction: 1 intra-op thread per process, so that each forward pass computes alike "
            "on any number of processes"]
