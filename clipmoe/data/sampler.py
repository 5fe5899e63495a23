"""Cluster-restricted negatives (MCL): a batch sampler whose every GLOBAL batch comes from one accumulated cluster.

The contrastive loss all-gathers the global batch, so an anchor's negatives are exactly the other samples of its
global batch; drawing the global batch from one cluster restricts the negatives to the anchor's cluster (the
official code does this with the sampler, not with a loss mask).

Plan of an epoch (computed identically on every rank from seed + epoch, no communication):
1. Group the dataset indices by label (clusters in increasing label order) and shuffle each group
   (torch.randperm with a CPU generator seeded by seed + epoch).
2. Cut each group into global batches of G = batch_size·world_size indices. The tail of n mod G indices follows
   `small_cluster` (a cluster with n < G is all tail):
   - "drop" (official code): the tail is dropped for this epoch.
   - "remainder": the tail becomes one smaller global batch of ⌊tail / W⌋·W indices, ⌊tail / W⌋ per rank, so every
     rank still has the same local batch size (the all-gather and DDP need that); the last tail mod W indices
     (fewer than W) are dropped. A tail shorter than W is dropped entirely.
   Which indices are dropped changes each epoch (after the shuffle); how many does not (`num_dropped`).
3. Order the global batches over clusters: "round_robin" (official): batch t comes from the t-th cluster in turn,
   cycling over clusters and skipping those with no batches left, so a cluster's remainder batch (if any) is its
   last. "shuffle": the same batches in a seeded random order.
4. Rank r takes positions [r·batch_size, (r+1)·batch_size) of each global batch (r·b_t.. for a remainder batch of
   b_t per rank), so the all-gathered batch in rank order is the global batch in plan order.

With labels=None (all samples in one cluster) this is plain shuffled batching with drop_last (or a last smaller
batch with "remainder"): the direct fine-tune baseline.
"""
import warnings
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from clipmoe.runtime import rank_world

SMALL_CLUSTER_POLICIES = ("drop", "remainder")
ORDERS = ("round_robin", "shuffle")


class ClusterBatchSampler(Sampler[list[int]]):
    """Yields this rank's lists of dataset indices; use as DataLoader(dataset, batch_sampler=sampler).

    Args:
        labels: [N] integer accumulated cluster label per dataset index (any integers; only equality matters),
            or None for one cluster (then num_samples is required).
        batch_size: samples per rank per step (the global batch is batch_size·world_size).
        num_samples: dataset length; checked against len(labels) when both are given.
        world_size, rank: default to torch.distributed's when it is initialised, else 1 and 0.
        seed: base seed; the epoch's plan uses seed + epoch (call set_epoch every epoch, as DistributedSampler).
        small_cluster: "drop" or "remainder" (module docstring, step 2).
        order: "round_robin" or "shuffle" (module docstring, step 3).
    """

    def __init__(self, labels=None, batch_size: int = 1, *, num_samples: int | None = None,
                 world_size: int | None = None, rank: int | None = None, seed: int = 0,
                 small_cluster: str = "drop", order: str = "round_robin"):
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
            raise ValueError(f"batch_size (per rank) must be a positive int, got {batch_size!r}")
        if small_cluster not in SMALL_CLUSTER_POLICIES:
            raise ValueError(f"small_cluster must be one of {SMALL_CLUSTER_POLICIES}, got {small_cluster!r}")
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        default_rank, default_world = rank_world()
        world_size = default_world if world_size is None else world_size
        rank = default_rank if rank is None else rank
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank!r}")

        if labels is None:
            if num_samples is None:
                raise ValueError("labels=None needs num_samples (the dataset length)")
            if num_samples < 0:
                raise ValueError(f"num_samples must be >= 0, got {num_samples}")
            labels = torch.zeros(num_samples, dtype=torch.int64)
        else:
            labels = torch.as_tensor(labels)
            if labels.dim() != 1:
                raise ValueError(f"labels must be 1-D (one label per dataset index), got shape {tuple(labels.shape)}")
            if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
                raise ValueError(f"labels must be integers, got {labels.dtype}")
            labels = labels.to("cpu", torch.int64)
            if num_samples is not None and num_samples != labels.numel():
                raise ValueError(f"labels has {labels.numel()} entries but the dataset has {num_samples} samples")

        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = int(seed)
        self.epoch = 0
        self.small_cluster = small_cluster
        self.order = order
        self.num_samples = labels.numel()
        self.global_batch_size = batch_size * world_size

        # Group indices by label once: a stable sort keeps each group in index order before the epoch's shuffle.
        order_idx = torch.argsort(labels, stable=True)
        self.cluster_labels, counts = torch.unique_consecutive(labels[order_idx], return_counts=True)
        self._sorted_indices = order_idx
        self._cluster_sizes = counts.tolist()
        self._starts = [0] + torch.cumsum(counts, 0).tolist()[:-1] if counts.numel() else []

        # Batch sizes per cluster (per rank) are the same every epoch.
        self._cluster_batches = []  # per cluster: list of local batch sizes
        self.num_dropped = 0
        for n in self._cluster_sizes:
            full, tail = divmod(n, self.global_batch_size)
            sizes = [batch_size] * full
            if small_cluster == "remainder" and tail // world_size > 0:
                sizes.append(tail // world_size)
                tail -= (tail // world_size) * world_size
            self._cluster_batches.append(sizes)
            self.num_dropped += tail
        self.num_batches = sum(len(s) for s in self._cluster_batches)
        if self.num_samples and self.num_batches == 0:
            warnings.warn(f"ClusterBatchSampler: every cluster is smaller than the global batch "
                          f"({self.global_batch_size}); the epoch is empty", stacklevel=2)

    def set_epoch(self, epoch: int):
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches

    def summary(self) -> dict[str, object]:
        """Counts for logs: samples kept/dropped, clusters kept/dropped (no batch at all), batches per epoch."""
        kept_clusters = sum(1 for s in self._cluster_batches if s)
        return {
            "num_samples": self.num_samples,
            "num_kept": self.num_samples - self.num_dropped,
            "num_dropped": self.num_dropped,
            "num_clusters": len(self._cluster_sizes),
            "num_kept_clusters": kept_clusters,
            "num_dropped_clusters": len(self._cluster_sizes) - kept_clusters,
            "num_batches": self.num_batches,
            "global_batch_size": self.global_batch_size,
            "world_size": self.world_size,
            "small_cluster": self.small_cluster,
            "order": self.order,
        }

    def global_batches(self) -> list[torch.Tensor]:
        """The epoch's plan: every global batch (all ranks, rank order) as an int64 tensor of dataset indices (views
        of one shuffled index tensor per cluster: 8 bytes per sample, no Python object per sample)."""
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        per_cluster = []
        for start, n, sizes in zip(self._starts, self._cluster_sizes, self._cluster_batches, strict=True):
            group = self._sorted_indices[start:start + n][torch.randperm(n, generator=gen)]
            batches, pos = [], 0
            for local in sizes:
                size = local * self.world_size
                batches.append(group[pos:pos + size])
                pos += size
            per_cluster.append(batches)
        if self.order == "shuffle":
            flat = [b for batches in per_cluster for b in batches]
            return [flat[i] for i in torch.randperm(len(flat), generator=gen).tolist()]
        plan, round_ = [], 0
        while len(plan) < self.num_batches:
            plan.extend(batches[round_] for batches in per_cluster if round_ < len(batches))
            round_ += 1
        return plan

    def __iter__(self) -> Iterator[list[int]]:
        """This rank's batches, each a list of dataset indices made when it is reached."""
        for batch in self.global_batches():
            local = len(batch) // self.world_size
            yield batch[self.rank * local:(self.rank + 1) * local].tolist()
