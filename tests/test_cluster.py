"""k-means vs a brute-force reference, chunking invariance, mixed-radix labels, and 2-process gloo k-means that must
match one process on the concatenated shards."""
import pytest
import torch
import torch.nn.functional as F

from clipmoe.train.cluster import (
    accumulate_labels,
    assign,
    cluster_stage,
    decode_labels,
    joint_labels,
    kmeans,
    max_stages,
)
from tests.dist_utils import run_gloo


def _blobs(n, k, d, *, spread=0.05, seed=0, dtype=torch.float64):
    """n unit rows around k random unit centres (well separated for d ≥ 8), with their true blob ids."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(k, d, generator=g, dtype=dtype), dim=1)
    truth = torch.randint(k, (n,), generator=g)
    truth[:k] = torch.arange(k)  # no empty blob
    x = F.normalize(centres[truth] + spread * torch.randn(n, d, generator=g, dtype=dtype), dim=1)
    return x, truth


def _brute_labels(x, c):
    """argmin over the full [n, k, D] difference tensor: the reference assignment."""
    return ((x[:, None, :] - c[None, :, :]) ** 2).sum(dim=-1).argmin(dim=1)


def _brute_lloyd(x, c, iters):
    """Textbook Lloyd from centres c: brute-force assignment, mean of each cluster, empty clusters stay."""
    for _ in range(iters):
        lab = _brute_labels(x, c)
        new = torch.stack([x[lab == j].mean(dim=0) if (lab == j).any() else c[j] for j in range(c.shape[0])])
        if torch.equal(new, c):
            break
        c = new
    return c, _brute_labels(x, c)


def _same_partition(a, b):
    """True when label vectors a and b split the rows the same way (labels may be renamed)."""
    pairs = torch.unique(torch.stack([a, b], dim=1), dim=0)
    return len(pairs) == len(torch.unique(a)) == len(torch.unique(b))


# --------------------------------------------------------------------------------------------- assign, kmeans
@pytest.mark.parametrize("chunk_size", [1, 7, 100, 4096])  # row by row; odd chunks with a tail; one chunk
def test_assign_equals_brute_force_argmin(chunk_size):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(500, 12, generator=g, dtype=torch.float64)
    c = torch.randn(7, 12, generator=g, dtype=torch.float64)
    assert torch.equal(assign(x, c, chunk_size, normalize=False), _brute_labels(x, c))
    assert torch.equal(assign(x, c, chunk_size), _brute_labels(F.normalize(x, dim=1), c))


@pytest.mark.parametrize("k, d", [(2, 8), (5, 16), (9, 32), (20, 24)])  # k = 20: one GEMM instead of k GEMVs
def test_kmeans_matches_brute_force_lloyd_on_blobs(k, d):
    x, truth = _blobs(600, k, d, seed=k)
    init, _ = kmeans(x, k, iters=0, seed=3)
    centroids, labels = kmeans(x, k, iters=50, tol=0.0, seed=3)
    ref_c, ref_labels = _brute_lloyd(x, init, 50)
    torch.testing.assert_close(centroids, ref_c, atol=1e-12, rtol=1e-12)
    assert torch.equal(labels, ref_labels)
    assert labels.dtype == torch.int64
    assert _same_partition(labels, truth)  # separable blobs: k-means++ then Lloyd finds them


def test_chunking_invariance():
    x, _ = _blobs(777, 4, 10, spread=0.3, seed=5)  # overlapping blobs: many updates, real work for the chunks
    runs = [kmeans(x, 4, iters=30, tol=0.0, seed=0, chunk_size=cs) for cs in (13, 100, 10_000)]
    for c, lab in runs[1:]:
        torch.testing.assert_close(c, runs[0][0], atol=1e-12, rtol=1e-12)
        assert torch.equal(lab, runs[0][1])


def test_minibatch_finds_blobs_and_is_chunk_invariant():
    x, truth = _blobs(2000, 3, 16, seed=2)
    c1, lab1 = kmeans(x, 3, iters=40, seed=0, batch_size=256, chunk_size=50)
    c2, lab2 = kmeans(x, 3, iters=40, seed=0, batch_size=256, chunk_size=999)
    torch.testing.assert_close(c1, c2, atol=1e-12, rtol=1e-12)
    assert torch.equal(lab1, lab2)
    assert _same_partition(lab1, truth)


def test_seeded_and_init_sample():
    x, truth = _blobs(3000, 3, 8, seed=4)
    a = kmeans(x, 3, seed=11, init_size=200)  # k-means++ on a 200-row sample, then Lloyd on all rows
    b = kmeans(x, 3, seed=11, init_size=200)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert _same_partition(a[1], truth)


def test_low_precision_input_and_unnormalised_rows():
    x, truth = _blobs(400, 3, 8, seed=6, dtype=torch.float32)
    c, lab = kmeans((x * 7.5).half(), 3, seed=0)  # scaled rows: normalisation makes the scale irrelevant
    assert c.dtype == torch.float32 and lab.dtype == torch.int64
    assert _same_partition(lab, truth)


def test_duplicate_rows_fewer_distinct_than_k():
    x = torch.tensor([[1.0, 0.0]] * 5 + [[0.0, 1.0]] * 5)
    c, lab = kmeans(x, 3, seed=0)
    assert torch.isfinite(c).all()
    assert _same_partition(lab, torch.tensor([0] * 5 + [1] * 5))


@pytest.mark.parametrize("call, err, match", [
    (lambda: kmeans(torch.randn(2, 3), 3), ValueError, "at least 3 samples"),
    (lambda: kmeans(torch.randn(5), 2), ValueError, "2-D"),
    (lambda: kmeans(torch.randint(3, (5, 2)), 2), ValueError, "floating"),
    (lambda: kmeans(torch.randn(5, 2), 0), ValueError, "k must"),
    (lambda: kmeans(torch.randn(5, 2), 2, chunk_size=0), ValueError, "chunk_size"),
    (lambda: kmeans(torch.randn(5, 2), 2, batch_size=0), ValueError, "batch_size"),
    (lambda: assign(torch.randn(5, 2), torch.randn(2, 3)), ValueError, "D="),
    (lambda: kmeans(torch.randn(5, 2), 2, distributed=True), RuntimeError, "not initialised"),
    (lambda: cluster_stage(torch.randn(5, 2), torch.randn(4, 2)), ValueError, "same samples"),
])
def test_bad_input(call, err, match):
    with pytest.raises(err, match=match):
        call()


# --------------------------------------------------------------------------------------------- vs scikit-learn
def _agreement(a, b):
    """Share of rows on which label vectors a and b agree under the best renaming of b's labels (greedy by size)."""
    pairs, counts = torch.unique(torch.stack([a, b], dim=1), dim=0, return_counts=True)
    used_a, used_b, agree = set(), set(), 0
    for i in counts.argsort(descending=True).tolist():
        la, lb = pairs[i].tolist()
        if la not in used_a and lb not in used_b:
            used_a.add(la), used_b.add(lb)
            agree += int(counts[i])
    return agree / a.numel()


def _inertia(x, centroids, labels):
    return float(((x - centroids.to(x.dtype)[labels]) ** 2).sum())


def test_lloyd_matches_sklearn_from_the_same_init():
    from sklearn.cluster import KMeans
    x, _ = _blobs(3000, 5, 16, spread=0.3, seed=11)  # overlapping blobs: a dozen updates
    init, _ = kmeans(x, 5, iters=0, seed=4)
    centroids, labels = kmeans(x, 5, tol=0.0, seed=4)
    ref = KMeans(5, init=init.numpy(), n_init=1, tol=0.0, algorithm="lloyd").fit(x.numpy())
    assert ref.n_iter_ > 3  # the data make Lloyd work
    assert torch.equal(labels, torch.from_numpy(ref.labels_).long())
    torch.testing.assert_close(centroids, torch.from_numpy(ref.cluster_centers_), atol=1e-10, rtol=1e-10)
    assert _inertia(x, centroids, labels) == pytest.approx(ref.inertia_, rel=1e-9)


@pytest.mark.parametrize("spread, min_agreement", [(0.1, 1.0), (0.3, 0.99)])  # separable blobs; overlapping ones
def test_same_clusters_as_sklearn_kmeans(spread, min_agreement):
    """Each with its own k-means++ init: the same clusters (overlapping blobs: local optima may differ at a few
    boundary rows) and the same inertia within 1 %."""
    from sklearn.cluster import KMeans
    x, _ = _blobs(4000, 5, 32, spread=spread, seed=12, dtype=torch.float32)
    centroids, labels = kmeans(x, 5, seed=0)
    ref = KMeans(5, n_init=1, random_state=0).fit(x.numpy())
    assert _agreement(labels, torch.from_numpy(ref.labels_).long()) >= min_agreement
    assert _inertia(x.double(), centroids, labels) == pytest.approx(ref.inertia_, rel=0.01)


# --------------------------------------------------------------------------------------------- labels
def test_joint_labels():
    text, image = torch.tensor([0, 2, 1, 2]), torch.tensor([1, 0, 2, 2])
    assert joint_labels(text, image, 3).tolist() == [1, 6, 5, 8]
    with pytest.raises(ValueError, match=r"image_ids must lie in \[0, 3\)"):
        joint_labels(text, torch.tensor([0, 3, 0, 0]), 3)
    with pytest.raises(ValueError, match="differ in length"):
        joint_labels(text, image[:2], 3)


def test_accumulated_labels_decode_mixed_radix():
    k_joint, stages, n = 9, 4, 5000
    digits = torch.randint(k_joint, (n, stages), generator=torch.Generator().manual_seed(0))
    acc = None
    for s in range(stages):
        acc = accumulate_labels(acc, digits[:, s], k_joint)
    assert acc.dtype == torch.int64
    assert torch.equal(acc, (digits * torch.tensor([k_joint ** (stages - 1 - s) for s in range(stages)])).sum(1))
    assert torch.equal(decode_labels(acc, k_joint, stages), digits)
    # equal accumulated label <=> equal per-stage tuple
    assert len(torch.unique(acc)) == len(torch.unique(digits, dim=0))
    with pytest.raises(ValueError, match="more than 3 stages"):
        decode_labels(acc, k_joint, stages - 1)


def test_accumulate_overflow_bound():
    assert max_stages(9) == 19 and max_stages(2) == 63
    acc = None
    for _ in range(19):  # all-maximal digits: the largest label 9**19 − 1 still fits
        acc = accumulate_labels(acc, torch.tensor([8]), 9)
    assert int(acc) == 9 ** 19 - 1
    with pytest.raises(OverflowError, match="at most 19 stages"):
        accumulate_labels(acc, torch.tensor([0]), 9)
    with pytest.raises(ValueError, match=r"stage_labels must lie in \[0, 9\)"):
        accumulate_labels(None, torch.tensor([9]), 9)


def test_cluster_stage_joint_partition():
    n = 900
    image, image_truth = _blobs(n, 3, 12, seed=7)
    g = torch.Generator().manual_seed(8)  # text blobs independent of the image blobs
    text_centres = F.normalize(torch.randn(3, 12, generator=g, dtype=torch.float64), dim=1)
    text_truth = torch.randperm(n, generator=g) % 3
    text = F.normalize(text_centres[text_truth] + 0.05 * torch.randn(n, 12, generator=g, dtype=torch.float64), dim=1)
    joint = cluster_stage(image, text, k=3, seed=0)
    assert joint.dtype == torch.int64 and int(joint.min()) >= 0 and int(joint.max()) < 9
    assert _same_partition(joint, text_truth * 3 + image_truth)
    assert len(torch.unique(joint)) == 9


# --------------------------------------------------------------------------------------------- 2 processes (gloo)
WORLD = 2
SHARD_SIZES = (301, 212)  # unequal shards


def _global_data():
    x, _ = _blobs(sum(SHARD_SIZES), 4, 10, spread=0.3, seed=9, dtype=torch.float32)  # overlapping: many updates
    text, _ = _blobs(sum(SHARD_SIZES), 3, 10, spread=0.1, seed=10, dtype=torch.float32)
    return x, text


_RUNS = {  # name -> kmeans options (init_size < N exercises the gathered init sample)
    "lloyd": dict(iters=30, tol=0.0, seed=1, chunk_size=64, init_size=200),
    "minibatch": dict(iters=20, tol=0.0, seed=2, chunk_size=64, batch_size=128),
}


def _worker(rank):
    x, text = _global_data()
    start = sum(SHARD_SIZES[:rank])
    rows = slice(start, start + SHARD_SIZES[rank])
    result = {name: kmeans(x[rows], 4, **kw) for name, kw in _RUNS.items()}
    result["stage"] = cluster_stage(x[rows], text[rows], k=3, seed=5)
    return result


def test_two_process_gloo_matches_single_process(tmp_path):
    results = run_gloo(_worker, WORLD, tmp_path)
    x, text = _global_data()
    for name, kw in _RUNS.items():
        ref_c, ref_labels = kmeans(x, 4, **kw)
        for r, res in enumerate(results):
            torch.testing.assert_close(res[name][0], ref_c, atol=1e-5, rtol=1e-5, msg=f"{name} centroids, rank {r}")
        assert torch.equal(torch.cat([res[name][1] for res in results]), ref_labels), name
    assert torch.equal(torch.cat([res["stage"] for res in results]), cluster_stage(x, text, k=3, seed=5))
