"""Loading MNIST's IDX files, their errors, and how samples are dealt to ranks."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DistributedSampler

from conftest import make_tiny_mnist
from train.data import DataError, EpochOrder, eval_shard, load_mnist


def test_tiny_idx_dataset_loads_through_the_real_loader(tmp_path):
    root = make_tiny_mnist(tmp_path, n_train=50, n_test=20)
    train, test = load_mnist(str(root), download=False, device=torch.device("cpu"))
    assert train.images.shape == (50, 1, 28, 28) and train.images.dtype == torch.uint8
    assert test.images.shape == (20, 1, 28, 28) and test.labels.tolist() == [i % 10 for i in range(20)]
    batch = train.batch(torch.tensor([3, 1]))
    assert batch.dtype == torch.float32 and torch.equal(batch, train.images[[3, 1]].float() / 255)
    limited, _ = load_mnist(str(root), False, torch.device("cpu"), train_samples=10)
    assert len(limited) == 10


def test_real_mnist_has_the_published_sizes(mnist_root):
    train, test = load_mnist(str(mnist_root), download=False, device=torch.device("cpu"))
    assert (len(train), len(test)) == (60_000, 10_000)
    assert train.images.float().mean().item() == pytest.approx(33.318, abs=0.01)  # mean pixel, 0..255


def test_missing_data_without_download_says_where_and_how(tmp_path):
    with pytest.raises(DataError) as err:
        load_mnist(str(tmp_path / "nothing"), download=False, device=torch.device("cpu"))
    msg = str(err.value)
    assert str(tmp_path / "nothing" / "MNIST" / "raw") in msg and "data.root=" in msg and "\n" not in msg


def test_corrupt_file_is_reported(tmp_path):
    root = make_tiny_mnist(tmp_path)
    f = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:1000])  # truncated
    with pytest.raises(DataError, match="could not be read|expected"):
        load_mnist(str(root), download=False, device=torch.device("cpu"))


def _rank_orders(n, b, world, seed=0, epoch=0):
    return [EpochOrder(n, b, world, r, seed).epoch_indices(epoch, torch.device("cpu")) for r in range(world)]


@pytest.mark.parametrize("n,b,world", [(1000, 10, 2), (103, 10, 2), (1000, 7, 3), (60_000, 5, 4)])
def test_ranks_get_disjoint_shards_and_global_batches_match_one_process(n, b, world):
    ranks = _rank_orders(n, b, world)
    single = _rank_orders(n, b * world, 1)[0]
    steps = n // (b * world)
    assert all(r.shape == (steps, b) for r in ranks) and single.shape == (steps, b * world)
    used = torch.cat([r.flatten() for r in ranks])
    assert len(used.unique()) == len(used) == steps * b * world  # no sample twice, no padding used
    for k in range(steps):  # global micro-batch k is the same set of samples
        assert sorted(torch.cat([r[k] for r in ranks]).tolist()) == sorted(single[k].tolist())
    # What is left out is fewer than one global batch.
    assert n - len(used) < b * world


@pytest.mark.parametrize("n,b,world", [(1000, 10, 1), (103, 10, 2), (1000, 7, 3), (60_000, 16_384, 1),
                                       (60_000, 20, 8), (101, 4, 5)])
def test_the_order_is_what_distributed_sampler_deals_each_rank(n, b, world):
    """EpochOrder computes the sampler's order with tensor ops; the sampler is the spec (the
    same seed must give the same batches as before, or a resumed run would change course)."""
    steps = n // (b * world)
    for seed, epoch in ((0, 0), (0, 3), (7, 1)):
        for rank, got in enumerate(_rank_orders(n, b, world, seed, epoch)):
            sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                         drop_last=False)
            sampler.set_epoch(epoch)
            assert got.is_contiguous()
            assert got.flatten().tolist() == list(sampler)[: steps * b], (seed, epoch, rank)


def test_every_sample_used_once_when_batches_divide():
    ranks = _rank_orders(1000, 10, 2)
    assert sorted(torch.cat([r.flatten() for r in ranks]).tolist()) == list(range(1000))


def test_order_is_shuffled_per_epoch_and_seed():
    e0, e1 = _rank_orders(1000, 10, 1, epoch=0)[0], _rank_orders(1000, 10, 1, epoch=1)[0]
    s1 = _rank_orders(1000, 10, 1, seed=1)[0]
    assert not torch.equal(e0, e1) and not torch.equal(e0, s1)
    assert torch.equal(e0, _rank_orders(1000, 10, 1, epoch=0)[0])


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_eval_shards_cover_the_test_set_exactly_once(world):
    shards = [eval_shard(10_000, world, r) for r in range(world)]
    assert sorted(torch.cat(shards).tolist()) == list(range(10_000))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_too_small_dataset_for_one_global_batch():
    with pytest.raises(Exception, match="smaller than one global micro-batch"):
        EpochOrder(10, 8, 2, 0, 0)


def test_the_blocked_order_gives_each_forward_pass_the_same_images_on_any_world_size():
    import torch

    from train.data import EpochOrder

    cpu = torch.device("cpu")
    one = EpochOrder(100, 5, 1, 0, seed=3, blocked=True).epoch_indices(2, cpu)  # (20, 5): pass k
    for world in (2, 4):
        ranks = [EpochOrder(100, 5, world, r, seed=3, blocked=True).epoch_indices(2, cpu) for r in range(world)]
        # Micro-step m of rank r runs pass m * world + r.
        passes = torch.stack(ranks, 1).reshape(-1, 5)
        assert torch.equal(passes, one)
