"""k-means for MCL pseudo-labels: torch, chunked, deterministic, on one process or across torch.distributed ranks.

Glossary: N samples (all ranks together), n rows on this rank, D feature width, k clusters, K_joint = k² joint
clusters per stage (one image id and one text id per sample).

kmeans: Euclidean k-means on L2-normalised rows (normalised chunk by chunk; CLIP-MoE clusters normalised embeddings
with sklearn MiniBatchKMeans, k = 3 per modality). Greedy k-means++ init (2 + ⌊ln k⌋ candidates per centre, the best
by potential) on a seeded sample of at most `init_size` rows, then either full Lloyd iterations (batch_size None or
≥ N: exact means, the default) or mini-batch updates (centre ← running mean of the rows assigned to it so far, as
MiniBatchKMeans without its centre reassignment). Stops after `iters` updates, when Σ‖c_new − c_old‖² ≤ tol, or
(full Lloyd) when no row changes its centre; then the centres are a fixed point and the labels of the last pass are
returned as they are, otherwise one more pass assigns every row to the final centres.
A centre that receives no rows keeps its position.

Speed: one pass over the rows per Lloyd iteration. Each chunk gets its distances (rows·centresᵀ) and its centre
sums (one-hotᵀ·rows) from two products while it is still in cache; rows are normalised through their inverse norms
(computed once, [n]) instead of being copied normalised in every pass; one all_reduce per update.

Memory: rows are processed `chunk_size` at a time (distances are [chunk, k]; no N×k×D or N×N tensor), so the extra
memory is O(chunk_size·(D + k) + init_size·D) whatever N is; only the labels [n] int64 and the inverse norms [n]
are O(n).

Distributed (torch.distributed initialised, W > 1, or distributed=True): each rank passes its own shard (shards in
rank order form the global data set, sizes may differ). Sample indices for the init and the mini-batches are drawn
from one seeded CPU generator over the global index space, identically on every rank; the init sample is assembled
with one all_reduce (each row comes from exactly one rank), every rank runs the same k-means++ on it, and each update
all_reduces per-centre sums (fp64) and counts. The result equals one process on the concatenated shards up to the
order of floating-point summation. Each rank gets the labels of its own rows. With nccl the compute device must be
a GPU (the collectives run on it).

Labels: joint label of a stage = text_id·k + image_id; accumulated over stages as one mixed-radix int64,
label_s = label_{s−1}·K_joint + joint_s (digit of the first stage is the most significant). int64 holds
K_joint^stages ≤ 2^63, i.e. at most ⌊63 / log2 K_joint⌋ stages (19 for K_joint = 9); accumulate_labels raises
OverflowError beyond that.
"""
import math
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F

from clipmoe.runtime import rank_world

# Rows per chunk: 4096 fp32 rows of 768 features = 12 MiB, which stays in a CPU's last-level cache between the
# distance and the centre-sum products of a pass: a Lloyd pass over 100k x 768 rows (k = 3) took about a third of
# the time it took with 32768-row chunks on the 2-core development machine.
DEFAULT_CHUNK_SIZE = 4096
# Up to this many centres, distances and centre sums are k matrix-vector products instead of one matrix product
# with k columns: MKL's GEMM is slow for so few columns (for k = 3 the centre sums took 2.5x longer as one GEMM than
# as 3 GEMVs on the development machine), and a few more GEMV launches cost little.
GEMV_MAX_CENTRES = 16
# Rows for the k-means++ init sample: at k = 3, 50k rows give centres within sampling noise of the full data while the
# all_reduce buffer stays at 150 MiB (768-d fp32).
DEFAULT_INIT_SIZE = 50000

Device = str | torch.device | None


# ---------------------------------------------------------------------------------------------------------- helpers
def _compute_dtype(features: torch.Tensor) -> torch.dtype:
    """fp64 stays fp64 (exact tests), everything else (fp16, bf16, fp32) is computed in fp32."""
    return torch.float64 if features.dtype == torch.float64 else torch.float32


def _prep(rows: torch.Tensor, device, dtype, normalize: bool) -> torch.Tensor:
    rows = rows.to(device=device, dtype=dtype)
    return F.normalize(rows, dim=1) if normalize else rows


def _world(distributed: bool | None, group) -> tuple[int, int]:
    """(rank, world size) of the run; (0, 1) when it is a single-process run."""
    if distributed is False:
        return 0, 1
    if distributed and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("distributed=True but torch.distributed is not initialised")
    return rank_world(group)


def _all_reduce(tensor: torch.Tensor, world: int, group) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def _shard_offsets(n_local: int, rank: int, world: int, device, group) -> tuple[int, int]:
    """(global offset of this rank's first row, global N) with shards concatenated in rank order."""
    if world == 1:
        return 0, n_local
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([n_local], dtype=torch.int64, device=device), group=group)
    sizes = [int(s.item()) for s in sizes]
    return sum(sizes[:rank]), sum(sizes)


def _check_features(features: torch.Tensor, name: str = "features"):
    if not isinstance(features, torch.Tensor) or features.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor [n, D], got "
                         f"{tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__}")
    if not features.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {features.dtype}")


def _check_chunk(chunk_size: int):
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def _dots(rows: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """rows [c, D] · vectors [k, D]ᵀ -> [c, k] (see GEMV_MAX_CENTRES)."""
    if vectors.shape[0] > GEMV_MAX_CENTRES:
        return rows @ vectors.T
    return torch.stack([rows @ v for v in vectors], dim=1)


def _nearest(x: torch.Tensor, centroids: torch.Tensor, centroid_sq: torch.Tensor,
             scale: torch.Tensor | None = None) -> torch.Tensor:
    """Index of the nearest centroid per row of scale·x (scale [c] per row, None = 1): argmin_j ‖c_j‖² − 2·s·x·c_j
    (‖x‖² does not change the argmin); ties go to the lowest index."""
    dots = _dots(x, centroids)
    if scale is not None:
        dots.mul_(scale[:, None])
    return torch.argmin(centroid_sq - 2.0 * dots, dim=1)


def _inverse_norms(features: torch.Tensor, chunk_size: int, device, dtype) -> torch.Tensor:
    """1 / max(‖x_i‖, 1e-12) per row (F.normalize's eps): the passes of kmeans normalise through these [n] scales
    instead of writing a normalised copy of every chunk in every pass."""
    out = torch.empty(features.shape[0], dtype=dtype, device=device)
    for start, end in _chunks(features.shape[0], chunk_size):
        out[start:end] = features[start:end].to(device=device, dtype=dtype).norm(dim=1).clamp_min_(1e-12).reciprocal_()
    return out


def _chunks(n: int, chunk_size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, chunk_size):
        yield start, min(start + chunk_size, n)


# ---------------------------------------------------------------------------------------------------------- assign
def assign(features: torch.Tensor, centroids: torch.Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE, *,
           normalize: bool = True, device: Device = None) -> torch.Tensor:
    """Nearest centroid (Euclidean) of every row, computed chunk by chunk.

    Args:
        features: [n, D] any float dtype (fp64 is computed in fp64, others in fp32), on any device.
        centroids: [k, D].
        normalize: L2-normalise the rows first (as kmeans does).
        device: where to compute (default: features.device); chunks are moved there one at a time.
    Returns:
        labels [n] int64 on the compute device; ties go to the lowest centroid index.
    """
    _check_features(features)
    _check_features(centroids, "centroids")
    _check_chunk(chunk_size)
    if centroids.shape[1] != features.shape[1]:
        raise ValueError(f"centroids have D={centroids.shape[1]}, features D={features.shape[1]}")
    device = torch.device(device) if device is not None else features.device
    dtype = _compute_dtype(features)
    c = centroids.to(device=device, dtype=dtype)
    c_sq = (c * c).sum(dim=1)
    labels = torch.empty(features.shape[0], dtype=torch.int64, device=device)
    for start, end in _chunks(features.shape[0], chunk_size):
        labels[start:end] = _nearest(_prep(features[start:end], device, dtype, normalize), c, c_sq)
    return labels


# ---------------------------------------------------------------------------------------------------------- init
def _gather_rows(features: torch.Tensor, global_idx: torch.Tensor, offset: int, *, device, dtype, normalize,
                 world, group) -> torch.Tensor:
    """Rows `global_idx` (global numbering) of the data set, on every rank: each rank fills the rows it owns into a
    zero buffer and one all_reduce sums them (exact: every row has exactly one owner)."""
    if world == 1:
        return _prep(features[global_idx.to(features.device)], device, dtype, normalize)
    n_local = features.shape[0]
    out = torch.zeros(global_idx.numel(), features.shape[1], dtype=dtype, device=device)
    mine = (global_idx >= offset) & (global_idx < offset + n_local)
    pos = torch.nonzero(mine).flatten()
    if pos.numel():
        local = (global_idx[pos] - offset).to(features.device)
        out[pos.to(device)] = _prep(features[local], device, dtype, normalize)
    return _all_reduce(out, world, group)


def _kmeans_pp(sample: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ on [m, D] rows (m ≥ k): each new centre is the best of 2 + ⌊ln k⌋ D²-weighted candidates."""
    m = sample.shape[0]
    trials = 2 + int(math.log(k))
    sample_sq = (sample * sample).sum(dim=1)

    def sq_dist(points):  # [c, D] -> [c, m] squared distances to every sample row, clamped at 0
        d = sample_sq[None, :] - 2.0 * _dots(sample, points).T + (points * points).sum(dim=1)[:, None]
        return d.clamp_min_(0)

    first = int(torch.randint(m, (1,), generator=gen).item())
    centres = [sample[first]]
    closest = sq_dist(sample[first:first + 1])[0]
    for _ in range(1, k):
        cumulative = torch.cumsum(closest.double(), dim=0)
        total = cumulative[-1]
        u = torch.rand(trials, generator=gen, dtype=torch.float64).to(sample.device)
        if total > 0:
            candidates = torch.searchsorted(cumulative, u * total).clamp_(max=m - 1)
        else:  # every row sits on a centre already (fewer distinct rows than k): take any rows
            candidates = (u * m).long().clamp_(max=m - 1)
        cand_closest = torch.minimum(closest[None, :], sq_dist(sample[candidates]))
        best = int(torch.argmin(cand_closest.double().sum(dim=1)).item())
        centres.append(sample[candidates[best]])
        closest = cand_closest[best]
    return torch.stack(centres)


def _local_batch(gen: torch.Generator, batch_size: int, n_total: int, offset: int, n_local: int) -> torch.Tensor:
    """This rank's rows (local numbering) of one mini-batch drawn with replacement from the global index space;
    every rank draws the same global batch from the same generator."""
    batch = torch.randint(n_total, (batch_size,), generator=gen)
    return batch[(batch >= offset) & (batch < offset + n_local)] - offset


# ---------------------------------------------------------------------------------------------------------- kmeans
def kmeans(features: torch.Tensor, k: int, *, iters: int = 100, tol: float = 1e-5, seed: int = 0,
           chunk_size: int = DEFAULT_CHUNK_SIZE, batch_size: int | None = None,
           init_size: int = DEFAULT_INIT_SIZE, normalize: bool = True, device: Device = None,
           distributed: bool | None = None, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means of the (L2-normalised) rows; see the module docstring for the algorithm and the distributed mode.

    Args:
        features: [n, D] this rank's rows (all rows in a single process); any float dtype, any device.
        k: number of clusters (≤ N).
        iters: maximum number of updates (Lloyd iterations, or mini-batch steps when batch_size is set).
        tol: stop when the summed squared centroid shift of one update is ≤ tol.
        seed: seeds the init sample, the k-means++ draws and the mini-batches (same seed, same result).
        chunk_size: rows per chunk in every pass.
        batch_size: mini-batch size (global, over all ranks; rows drawn with replacement); None or ≥ N: full Lloyd.
        init_size: rows of the k-means++ sample (all rows when N ≤ init_size).
        normalize: L2-normalise rows (chunk by chunk) before clustering.
        device: where to compute (default: features.device).
        distributed: None = use torch.distributed when it is initialised; False = this process only.
        group: process group (default: the world).
    Returns:
        (centroids [k, D] in the compute dtype (fp64 for fp64 input, else fp32), identical on every rank;
         labels [n] int64 of this rank's rows), both on the compute device.
    """
    _check_features(features)
    _check_chunk(chunk_size)
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size}")
    if init_size < 1:
        raise ValueError(f"init_size must be positive, got {init_size}")
    device = torch.device(device) if device is not None else features.device
    dtype = _compute_dtype(features)
    rank, world = _world(distributed, group)
    n_local, dim = features.shape
    offset, n_total = _shard_offsets(n_local, rank, world, device, group)
    if n_total < k:
        raise ValueError(f"k={k} clusters need at least {k} samples, got {n_total}")

    gen = torch.Generator().manual_seed(int(seed))
    m = min(n_total, max(init_size, k))
    sample_idx = torch.arange(n_total) if m == n_total else torch.randperm(n_total, generator=gen)[:m].sort().values
    sample = _gather_rows(features, sample_idx, offset, device=device, dtype=dtype, normalize=normalize,
                          world=world, group=group)
    centroids = _kmeans_pp(sample, k, gen)
    del sample

    mini_batch = batch_size is not None and batch_size < n_total
    scales = _inverse_norms(features, chunk_size, device, dtype) if normalize else None
    labels = None if mini_batch else torch.full((n_local,), -1, dtype=torch.int64, device=device)
    seen = torch.zeros(k, dtype=torch.float64, device=device)  # mini-batch: rows assigned to each centre so far
    for _ in range(iters):
        c_sq = (centroids * centroids).sum(dim=1)
        # One buffer, one all_reduce per update: per-centre sums [k, D], counts [k], rows whose label changed [1].
        stats = torch.zeros(k * dim + k + 1, dtype=torch.float64, device=device)
        sums, counts, changed = stats[:k * dim].view(k, dim), stats[k * dim:-1], stats[-1:]
        batch = _local_batch(gen, batch_size, n_total, offset, n_local) if mini_batch else None
        for start, end in _chunks(n_local if batch is None else batch.numel(), chunk_size):
            idx = slice(start, end) if batch is None else batch[start:end]  # a CPU index works on any device
            x = features[idx].to(device=device, dtype=dtype)
            scale = None if scales is None else scales[idx]
            chunk_labels = _nearest(x, centroids, c_sq, scale)
            weights = F.one_hot(chunk_labels, k).to(dtype)
            if scale is not None:
                weights.mul_(scale[:, None])
            sums += _dots(x.T, weights.T).T.double()  # Σ_i w_ij·x_i per centre j
            counts += torch.bincount(chunk_labels, minlength=k).double()
            if not mini_batch:
                changed += (chunk_labels != labels[idx]).sum()
                labels[idx] = chunk_labels
        _all_reduce(stats, world, group)
        old = centroids
        if mini_batch:  # running mean: c ← (c·seen + Σ new rows) / (seen + count)
            seen += counts
            updated = old.double() + (sums - counts[:, None] * old.double()) / seen.clamp_min(1)[:, None]
        else:
            updated = sums / counts.clamp_min(1)[:, None]
        centroids = torch.where((counts > 0)[:, None], updated, old.double()).to(dtype)
        if not mini_batch and float(changed) == 0:
            # No row changed its centre, so the means did not move: these labels are those of the returned
            # centroids, and the last assignment pass is saved.
            return centroids, labels
        if float(((centroids.double() - old.double()) ** 2).sum()) <= tol:
            break
    return centroids, assign(features, centroids, chunk_size, normalize=normalize, device=device)


# ---------------------------------------------------------------------------------------------------------- labels
def _as_labels(labels, name: str) -> torch.Tensor:
    labels = torch.as_tensor(labels)
    if labels.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {labels.dtype}")
    return labels.long()


def _check_range(labels: torch.Tensor, k: int, name: str):
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= k):
        raise ValueError(f"{name} must lie in [0, {k}), got range [{int(labels.min())}, {int(labels.max())}]")


def joint_labels(text_ids, image_ids, k: int) -> torch.Tensor:
    """Joint cluster of a stage: text_id·k + image_id, in [0, k²)."""
    text_ids, image_ids = _as_labels(text_ids, "text_ids"), _as_labels(image_ids, "image_ids")
    if text_ids.shape != image_ids.shape:
        raise ValueError(f"text_ids and image_ids differ in length: {text_ids.numel()} vs {image_ids.numel()}")
    _check_range(text_ids, k, "text_ids")
    _check_range(image_ids, k, "image_ids")
    return text_ids * k + image_ids.to(text_ids.device)


def max_stages(num_stage_clusters: int) -> int:
    """Most stages whose accumulated label fits int64 (largest s with num_stage_clusters^s ≤ 2^63)."""
    if num_stage_clusters < 2:
        raise ValueError("num_stage_clusters must be >= 2 for a finite bound")
    s = 0
    while num_stage_clusters ** (s + 1) <= 2 ** 63:
        s += 1
    return s


def accumulate_labels(previous: torch.Tensor | None, stage_labels, num_stage_clusters: int) -> torch.Tensor:
    """Mixed-radix accumulation: previous·num_stage_clusters + stage_labels (previous None: stage_labels).

    previous: [n] int64 accumulated labels of the earlier stages (≥ 0) or None for the first stage.
    stage_labels: [n] this stage's labels in [0, num_stage_clusters) (K_joint = k² for joint labels).
    Raises OverflowError when the result would not fit int64 (more than `max_stages(num_stage_clusters)` stages).
    """
    if num_stage_clusters < 1:
        raise ValueError(f"num_stage_clusters must be >= 1, got {num_stage_clusters}")
    stage_labels = _as_labels(stage_labels, "stage_labels")
    _check_range(stage_labels, num_stage_clusters, "stage_labels")
    if previous is None:
        return stage_labels.clone()
    previous = _as_labels(previous, "previous")
    if previous.shape != stage_labels.shape:
        raise ValueError(f"previous and stage_labels differ in length: {previous.numel()} vs {stage_labels.numel()}")
    if previous.numel():
        if int(previous.min()) < 0:
            raise ValueError("previous accumulated labels must be >= 0")
        limit = (2 ** 63 - 1 - (num_stage_clusters - 1)) // num_stage_clusters
        if int(previous.max()) > limit:
            raise OverflowError(f"accumulated labels overflow int64: at most {max_stages(num_stage_clusters)} stages "
                                f"of {num_stage_clusters} clusters fit")
    return previous * num_stage_clusters + stage_labels.to(previous.device)


def decode_labels(labels, num_stage_clusters: int, num_stages: int) -> torch.Tensor:
    """Inverse of accumulate_labels: [n] -> [n, num_stages] per-stage labels, column 0 = the first stage."""
    labels = _as_labels(labels, "labels")
    digits = []
    rest = labels.clone()
    for _ in range(num_stages):
        digits.append(rest % num_stage_clusters)
        rest = rest // num_stage_clusters
    if rest.numel() and bool((rest != 0).any()):
        raise ValueError(f"labels have more than {num_stages} stages of {num_stage_clusters} clusters")
    return torch.stack(digits[::-1], dim=1) if digits else labels.new_zeros(labels.shape[0], 0)


# ---------------------------------------------------------------------------------------------------------- stage
def cluster_stage(image_features: torch.Tensor, text_features: torch.Tensor, k: int = 3, *, iters: int = 100,
                  tol: float = 1e-5, seed: int = 0, chunk_size: int = DEFAULT_CHUNK_SIZE,
                  batch_size: int | None = None, init_size: int = DEFAULT_INIT_SIZE, normalize: bool = True,
                  device: Device = None, distributed: bool | None = None, group=None) -> torch.Tensor:
    """One MCL clustering: k-means on the image rows (seed) and, separately, on the text rows (seed + 1), then the
    joint label text_id·k + image_id ∈ [0, k²) per row (CLIP-MoE: k = 3, 9 joint clusters).

    image_features, text_features: [n, D] this rank's rows, row i of both = the same sample. Other arguments as
    `kmeans`. Returns [n] int64 joint labels on the compute device.
    """
    _check_features(image_features, "image_features")
    _check_features(text_features, "text_features")
    if image_features.shape[0] != text_features.shape[0]:
        raise ValueError(f"image_features has {image_features.shape[0]} rows, text_features "
                         f"{text_features.shape[0]}; they must describe the same samples")
    opts = dict(iters=iters, tol=tol, chunk_size=chunk_size, batch_size=batch_size, init_size=init_size,
                normalize=normalize, device=device, distributed=distributed, group=group)
    _, image_ids = kmeans(image_features, k, seed=seed, **opts)
    _, text_ids = kmeans(text_features, k, seed=seed + 1, **opts)
    return joint_labels(text_ids, image_ids, k)

