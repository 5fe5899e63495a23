"""ClusterBatchSampler: one cluster per global batch, each kept sample once per epoch, dropped counts, lockstep ranks
(simulated by building the sampler with rank=r, world_size=W), round-robin order, plain batching without labels."""
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader

from clipmoe.data.sampler import ClusterBatchSampler

# cluster sizes: 0 → empty cluster id (absent), several full batches + tail, exactly one global batch, below one
# batch (dropped under "drop"), a tail that does not divide by the world size
SIZES = {3: 50, 7: 24, 10: 5, 12: 31, 600: 13}  # label -> size; 600 is a large mixed-radix style id


def plan(sampler):
    """The sampler's epoch plan as lists of ints (global_batches gives tensors)."""
    return [b.tolist() for b in sampler.global_batches()]


def _labels(sizes=SIZES, seed=0):
    labels = torch.tensor([lab for lab, n in sizes.items() for _ in range(n)])
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]


def _ranks(labels, batch_size, world, **kw):
    return [ClusterBatchSampler(labels, batch_size, world_size=world, rank=r, **kw) for r in range(world)]


def _global_steps(samplers):
    """Batch t of every rank, concatenated in rank order; checks that all ranks have the same number of batches and
    equal local batch sizes at every step."""
    per_rank = [list(s) for s in samplers]
    assert len({len(p) for p in per_rank}) == 1
    assert all(len(p) == len(s) for p, s in zip(per_rank, samplers, strict=True))
    steps = []
    for t in range(len(per_rank[0])):
        assert len({len(p[t]) for p in per_rank}) == 1, f"step {t}: local batch sizes differ across ranks"
        steps.append([i for p in per_rank for i in p[t]])
    return steps


def _expected_dropped(sizes, global_batch, world, policy):
    dropped = 0
    for n in sizes.values():
        tail = n % global_batch
        dropped += tail if policy == "drop" else tail % world if tail >= world else tail
    return dropped


@pytest.mark.parametrize("world, batch_size", [(1, 4), (2, 3), (3, 4), (4, 1)])
@pytest.mark.parametrize("policy", ["drop", "remainder"])
@pytest.mark.parametrize("order", ["round_robin", "shuffle"])
def test_one_cluster_per_global_batch_each_sample_once(world, batch_size, policy, order):
    labels = _labels()
    samplers = _ranks(labels, batch_size, world, small_cluster=policy, order=order, seed=5)
    steps = _global_steps(samplers)
    assert steps == plan(samplers[0])  # the union over ranks of step t is the plan's global batch t
    global_batch = batch_size * world
    for batch in steps:
        assert len({int(labels[i]) for i in batch}) == 1, "a global batch mixes clusters"
        if policy == "drop":
            assert len(batch) == global_batch
        else:
            assert 0 < len(batch) <= global_batch and len(batch) % world == 0
    seen = Counter(i for batch in steps for i in batch)
    assert max(seen.values()) == 1, "a sample appears twice in one epoch"
    dropped = _expected_dropped(SIZES, global_batch, world, policy)
    assert samplers[0].num_dropped == dropped == len(labels) - len(seen)
    summary = samplers[0].summary()
    assert summary["num_dropped"] == dropped and summary["num_kept"] == len(seen)
    assert summary["num_batches"] == len(steps) and summary["num_clusters"] == len(SIZES)
    for cluster, n in SIZES.items():  # per cluster: all but the counted tail is kept
        kept = sum(1 for i in seen if int(labels[i]) == cluster)
        assert n - kept == _expected_dropped({cluster: n}, global_batch, world, policy)


def test_round_robin_order_and_remainder_last():
    labels = _labels()
    sampler = ClusterBatchSampler(labels, 4, world_size=2, rank=0, small_cluster="remainder")  # global batch 8
    clusters = [int(labels[b[0]]) for b in sampler.global_batches()]
    # batches per cluster: 3→6+tail 2 (remainder of 2), 7→3, 10→tail 5→4 (one dropped), 12→3+tail 7→6, 600→1+tail 5→4
    assert clusters == [3, 7, 10, 12, 600,   3, 7, 12, 600,   3, 7, 12,   3, 12,   3,   3,   3]
    sizes = [len(b) for b in sampler.global_batches()]
    assert sizes == [8, 8, 4, 8, 8,   8, 8, 8, 4,   8, 8, 8,   8, 6,   8,   8,   2]
    assert sampler.num_dropped == 1 + 1 + 1  # odd tails of clusters 10, 12 and 600


def test_drop_counts_small_clusters():
    sampler = ClusterBatchSampler(_labels(), 4, world_size=2, rank=1)  # global batch 8: cluster 10 (5) dropped
    s = sampler.summary()
    assert s["num_dropped_clusters"] == 1 and s["num_kept_clusters"] == 4
    assert s["num_dropped"] == 50 % 8 + 24 % 8 + 5 + 31 % 8 + 13 % 8 == 19
    assert len(sampler) == 6 + 3 + 0 + 3 + 1


def test_set_epoch_reshuffles_identically_on_every_rank():
    labels = _labels()
    a, b = _ranks(labels, 3, 2, seed=1)
    first = plan(a)
    a.set_epoch(1)
    assert plan(a) != first
    b.set_epoch(1)
    assert plan(a) == plan(b)
    a.set_epoch(0)
    assert plan(a) == first
    assert plan(ClusterBatchSampler(labels, 3, world_size=2, rank=0, seed=2)) != first


def test_the_plan_is_tensors_not_python_ints():
    """Memory per rank stays proportional to an int64 index per sample: the plan holds one tensor per batch."""
    batches = ClusterBatchSampler(_labels(), 4, world_size=2, rank=0).global_batches()
    assert batches and all(isinstance(b, torch.Tensor) and b.dtype == torch.int64 for b in batches)


def test_no_labels_is_plain_random_batching():
    n, batch_size = 103, 10
    sampler = ClusterBatchSampler(None, batch_size, num_samples=n, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == n // batch_size and sampler.num_dropped == n % batch_size
    flat = [i for b in batches for i in b]
    assert len(set(flat)) == len(flat) == n - n % batch_size
    assert flat != sorted(flat)  # shuffled
    sampler.set_epoch(1)
    assert [i for b in sampler for i in b] != flat
    remainder = ClusterBatchSampler(None, batch_size, num_samples=n, small_cluster="remainder")
    assert [len(b) for b in remainder] == [10] * 10 + [3] and remainder.num_dropped == 0


def test_dataloader_batch_sampler():
    labels = _labels()
    dataset = torch.arange(len(labels))
    sampler = ClusterBatchSampler(labels, 5)
    batches = list(DataLoader(dataset, batch_sampler=sampler))
    assert len(batches) == len(sampler)
    assert all(b.shape == (5,) and len(torch.unique(labels[b])) == 1 for b in batches)


def test_everything_dropped_warns():
    with pytest.warns(UserWarning, match="epoch is empty"):
        sampler = ClusterBatchSampler(torch.tensor([0, 0, 1]), 4)
    assert len(sampler) == 0 and list(sampler) == [] and sampler.num_dropped == 3


@pytest.mark.parametrize("kwargs, match", [
    (dict(labels=[0, 1], batch_size=0), "batch_size"),
    (dict(labels=[0, 1], batch_size=-2), "batch_size"),
    (dict(labels=[0, 1], batch_size=2.0), "batch_size"),
    (dict(labels=[0, 1], batch_size=2, num_samples=3), "labels has 2 entries but the dataset has 3"),
    (dict(labels=None, batch_size=2), "num_samples"),
    (dict(labels=[[0, 1]], batch_size=2), "1-D"),
    (dict(labels=[0.0, 1.0], batch_size=2), "integers"),
    (dict(labels=[0, 1], batch_size=2, world_size=2, rank=2), "rank"),
    (dict(labels=[0, 1], batch_size=2, world_size=0, rank=0), "world_size"),
    (dict(labels=[0, 1], batch_size=2, rank=-1), "rank"),
    (dict(labels=[0, 1], batch_size=2, small_cluster="pad"), "small_cluster"),
    (dict(labels=[0, 1], batch_size=2, order="random"), "order"),
])
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ClusterBatchSampler(**kwargs)
