"""train/exact.py in one process: integer sums do not depend on the order of the passes."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from train.exact import SCALE_BITS, ExactRangeError, ExactReduction


def _reduced(grads: list[torch.Tensor], passes: int) -> torch.Tensor:
    model = torch.nn.Linear(4, 1, bias=False)
    exact = ExactReduction(model, passes, torch.device("cpu"))
    for g in grads:
        model.weight.grad = g.clone().view(1, 4)
        exact.add()
    exact.reduce(Accelerator(cpu=True))
    return model.weight.grad.view(-1)


def test_the_sum_is_the_same_in_any_order_and_float_sums_are_not():
    torch.manual_seed(0)
    grads = [torch.randn(4) * 10.0 ** torch.randint(-6, 1, (4,)) for _ in range(16)]
    forward, backward = _reduced(grads, 16), _reduced(grads[::-1], 16)
    assert torch.equal(forward, backward)
    # The true sum, to float32's rounding (plus 2**-32 per pass of fixed-point rounding).
    torch.testing.assert_close(forward, torch.stack(grads).double().sum(0).float(), rtol=2 ** -23, atol=16 * 2.0 ** -SCALE_BITS)
    floats = [torch.stack(grads).sum(0), torch.stack(grads[::-1]).sum(0)]
    pairs = torch.stack([sum(grads[i:i + 2]) for i in range(0, 16, 2)]).sum(0)
    assert not (torch.equal(floats[0], floats[1]) and torch.equal(floats[0], pairs))  # what exact mode is for


def test_a_gradient_past_the_range_is_refused_and_a_non_finite_one_spoils_the_step():
    limit = 2.0 ** 62 / 2.0 ** SCALE_BITS / 8
    with pytest.raises(ExactRangeError, match="exceeded train.exact_reduction's range"):
        _reduced([torch.tensor([limit * 1.01, 0.0, 0.0, 0.0])], 8)
    out = _reduced([torch.tensor([1.0, float("inf"), 0.0, 0.0]), torch.ones(4)], 8)
    assert torch.isnan(out).all()  # every element, on every rank: the same decision everywhere
