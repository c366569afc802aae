"""train.exact_reduction: the same weights, bit for bit, on 1, 2 and 4 CPU processes and across
a resume on another world size; without it, 1 and 2 processes differ in bits."""

from __future__ import annotations

import pytest
import torch

from conftest import EXACT, accelerate_cpu, error_lines, interruptible, load_weights, read_metrics, run_main

pytestmark = pytest.mark.slow


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _run(data, out, nproc: int, *overrides: str):
    r = run_main(interruptible(data, out, nproc) + list(overrides), launcher=accelerate_cpu(nproc) if nproc > 1 else None)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_one_two_and_four_processes_end_bit_identical_and_without_it_they_do_not(uninterrupted):
    # INTERRUPTIBLE: 100 optimizer steps of 20 images.
    one = uninterrupted(1, *EXACT)
    assert _equal(uninterrupted(2, *EXACT), one) and _equal(uninterrupted(4, *EXACT), one)
    # The negative control: the default reduction sums in another order on 2 processes.
    assert not _equal(uninterrupted(1), uninterrupted(2))


def test_a_run_resumed_on_four_then_two_then_one_process_ends_as_one_uninterrupted(synthetic_mnist, tmp_path,
                                                                                   uninterrupted):
    out = tmp_path / "run"
    _run(synthetic_mnist, out, 4, *EXACT, "train.max_steps=30", "checkpoint.every_n_steps=15")
    r = _run(synthetic_mnist, out, 2, *EXACT, "train.max_steps=65")
    assert "step_00000030" in r.stdout and "written by 4 processes, now 2" in r.stdout
    r = _run(synthetic_mnist, out, 1, *EXACT)
    assert "step_00000065" in r.stdout and "written by 2 processes, now 1" in r.stdout
    assert _equal(load_weights(out), uninterrupted(1, *EXACT))
    steps = [m["step"] for m in read_metrics(out) if "train/loss" in m]
    assert steps == sorted(set(steps)) and steps[-1] == 100  # gap-free, no repeats


def test_a_world_size_that_does_not_divide_the_forward_passes_is_one_line(synthetic_mnist, tmp_path):
    r = run_main(interruptible(synthetic_mnist, tmp_path / "run", 3) + EXACT, launcher=accelerate_cpu(3))
    assert r.returncode != 0  # the launcher's own summary follows; the run's is one line
    [line] = error_lines(r.stderr)
    assert "is not a whole number of forward passes of 5 images on each of 3 processes" in line, line
    assert not (tmp_path / "run").exists()


def test_bf16_autocast_is_bit_identical_on_one_and_two_processes(uninterrupted):
    bf16 = [*EXACT, "train.mixed_precision=bf16", "train.max_steps=30"]
    assert _equal(uninterrupted(1, *bf16), uninterrupted(2, *bf16))
