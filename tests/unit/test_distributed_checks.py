"""The launch's checks, in process: one mixed-precision setting from the config and the
launcher, and processes that did not join one group refused."""

from __future__ import annotations

import pytest

from train.distributed import LaunchError, check_world_size, resolve_mixed_precision


@pytest.mark.parametrize("configured,launcher,cuda,expected", [
    ("no", None, False, "no"), ("bf16", None, False, "bf16"), ("no", "bf16", False, "bf16"),
    ("bf16", "no", False, "bf16"), ("bf16", "bf16", False, "bf16"), ("fp16", "no", True, "fp16"),
    ("no", "fp16", True, "fp16"),
])
def test_mixed_precision_resolves_to_one_setting(configured, launcher, cuda, expected):
    assert resolve_mixed_precision(configured, launcher, cuda) == expected


@pytest.mark.parametrize("configured,launcher,cuda,words", [
    ("bf16", "fp16", True, "conflicts"), ("fp16", "bf16", True, "conflicts"),
    ("fp16", "no", False, "needs a CUDA GPU"), ("no", "fp16", False, "needs a CUDA GPU"),
    ("no", "fp8", True, "not supported"),
])
def test_mixed_precision_conflicts_are_errors(configured, launcher, cuda, words):
    with pytest.raises(LaunchError, match=words):
        resolve_mixed_precision(configured, launcher, cuda)


def test_processes_that_did_not_join_one_group_are_refused():
    check_world_size(2, 2)
    with pytest.raises(LaunchError, match="2 processes were launched but each sees a world of 1"):
        check_world_size(2, 1)
