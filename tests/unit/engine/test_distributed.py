"""The data-parallel plumbing without a process group: samplers, shards, one-process identity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import WeightedRandomSampler

from marrowscope.config import ConfigError
from marrowscope.engine import distributed
from marrowscope.engine.distributed import (
    DistContext,
    DistributedError,
    DistributedWeightedSampler,
    resolve_nproc,
)
from marrowscope.engine.loops import EpochStats
from marrowscope.metrics.classification import (
    classification_metrics,
    classification_metrics_from_confusion,
    confusion_counts,
)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [0, 1, 5, 12, 13])
def test_evaluation_shards_are_disjoint_complete_and_unpadded(world: int, n: int) -> None:
    shards = [DistContext(rank=r, world_size=world).shard(n) for r in range(world)]
    flat = [i for s in shards for i in s]
    assert flat == list(range(n))  # disjoint, complete, no repeated (padding) item
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1


def test_weighted_sampler_shares_one_draw_among_ranks_and_redraws_each_epoch() -> None:
    weights = np.linspace(0.1, 1.0, 11)
    ranks = [
        DistributedWeightedSampler(weights, num_replicas=3, rank=r, seed=7000) for r in range(3)
    ]
    for epoch in (1, 2):
        for s in ranks:
            s.set_epoch(epoch)
        shares = [list(s) for s in ranks]
        assert [len(s) for s in shares] == [4, 4, 4] == [len(s) for s in ranks]
        # together the ranks drew exactly the one draw of a generator seeded by seed + epoch
        g = torch.Generator().manual_seed(7000 + epoch)
        one = torch.multinomial(torch.as_tensor(weights), 12, replacement=True, generator=g)
        assert [shares[p % 3][p // 3] for p in range(12)] == one.tolist()
    ranks[0].set_epoch(1)
    first = list(ranks[0])
    ranks[0].set_epoch(2)
    assert list(ranks[0]) != first


def test_weighted_sampler_on_one_rank_draws_what_the_single_process_sampler_draws() -> None:
    weights = np.array([1.0, 1.0, 4.0, 0.5, 2.0])
    ours = DistributedWeightedSampler(weights, num_replicas=1, rank=0, seed=42000)
    ours.set_epoch(3)
    g = torch.Generator().manual_seed(42003)
    theirs = WeightedRandomSampler(torch.as_tensor(weights), 5, replacement=True, generator=g)
    assert list(ours) == list(theirs)


def test_weighted_sampler_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="rank 2"):
        DistributedWeightedSampler([1.0, 2.0], num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="non-empty"):
        DistributedWeightedSampler([], num_replicas=1, rank=0)


def test_one_process_context_is_the_identity() -> None:
    ctx = DistContext()
    assert not ctx.distributed and ctx.is_main
    assert ctx.broadcast({"a": 1}) == {"a": 1}
    assert ctx.main_only(lambda: 5) == 5
    np.testing.assert_array_equal(ctx.all_sum([1.0, 2.5]), [1.0, 2.5])
    stats = EpochStats(loss=0.5, accuracy=0.25, images=8, seconds=2.0)
    assert ctx.reduce_stats(stats) is stats
    assert ctx.per_rank_batch(7) == 7
    assert ctx.samples_per_rank(13) == 13
    assert ctx.shard(4) == range(4)
    model = torch.nn.Linear(2, 2)
    assert ctx.wrap(model, torch.device("cpu")) is model
    assert ctx.prepare_model(model, sync_batchnorm=True) is model
    with pytest.raises(ZeroDivisionError):
        ctx.main_only(lambda: 1 / 0)


def test_setup_outside_torchrun_is_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.setup() == DistContext()
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun --nproc-per-node 1
    assert distributed.setup() == DistContext()


def test_global_batch_must_divide_among_processes() -> None:
    ctx = DistContext(rank=1, world_size=4)
    assert ctx.per_rank_batch(32) == 8
    with pytest.raises(ConfigError, match=r"train.batch_size=30 is the global batch.*28 or 32"):
        ctx.per_rank_batch(30)
    assert ctx.samples_per_rank(13) == 4  # DistributedSampler pads 13 to 16


def test_sync_batchnorm_is_cuda_only() -> None:
    ctx = DistContext(rank=0, world_size=2)
    with pytest.raises(ConfigError, match="sync_batchnorm=false"):
        ctx.check_sync_batchnorm(True, torch.device("cpu"))
    ctx.check_sync_batchnorm(False, torch.device("cpu"))
    DistContext().check_sync_batchnorm(True, torch.device("cpu"))  # one process: ignored


def test_nproc_auto_and_bad_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_nproc("auto") == 1  # no GPU: one process already uses every core
    assert resolve_nproc("3") == 3
    for bad in ("0", "-1", "two"):
        with pytest.raises(DistributedError, match="positive number or auto"):
            resolve_nproc(bad)


def test_launch_refuses_to_nest_inside_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DistributedError, match="under torchrun leave it out"):
        distributed.launch(2, ["train"])


def test_bad_timeout_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "soon")
    with pytest.raises(DistributedError, match="number of seconds"):
        distributed.timeout_seconds()
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "90")
    assert distributed.timeout_seconds() == 90.0


def test_metrics_from_summed_confusion_counts_equal_the_metrics_of_all_samples() -> None:
    rng = np.random.default_rng(0)
    classes = ["a", "b", "c", "d"]
    y = rng.integers(0, 3, 101)  # class d has no sample
    p = np.where(rng.random(101) < 0.7, y, rng.integers(0, 4, 101))
    shards = [range(0, 30), range(30, 31), range(31, 31), range(31, 101)]
    counts = sum(confusion_counts(y[list(s)], p[list(s)], 4) for s in shards)
    assert classification_metrics_from_confusion(counts, classes) == classification_metrics(
        y, p, classes
    )
    assert confusion_counts([], [], 4).sum() == 0
    with pytest.raises(ValueError, match="4x4"):
        classification_metrics_from_confusion(np.zeros((3, 3)), classes)
    with pytest.raises(ValueError, match="no sample"):
        classification_metrics_from_confusion(np.zeros((4, 4)), classes)
