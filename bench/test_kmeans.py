"""k-means of one MCL clustering: clipmoe's `kmeans` against scikit-learn on the same rows, side by side in one run
(run: pytest bench/test_kmeans.py --benchmark).

Data: 100k L2-normalised 768-d rows (the width of ViT-L/14 embeddings) shaped like CLIP embeddings: a shared
direction, 12 latent groups and per-row noise; K = 3 clusters (CLIP-MoE's clusters per modality); 2 threads for
every provider (torch.set_num_threads, threadpoolctl for scikit-learn's OpenMP and BLAS).
Providers: clipmoe (`kmeans`, full Lloyd, its defaults), sklearn_kmeans (`KMeans`, Lloyd, n_init=1, its defaults)
and sklearn_minibatch_official (`MiniBatchKMeans` with the official CLIP-MoE settings: batch 1,000,000,
max_iter 500, tol 1e-5, n_init "auto"). Each is checked before timing: its inertia within 1 % of KMeans's.
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F

from bench.utils import time_provider
from clipmoe.train.cluster import kmeans

ROWS, DIM, K, THREADS = 100_000, 768, 3, 2
PROVIDERS = ("clipmoe", "sklearn_kmeans", "sklearn_minibatch_official")
INERTIA_RTOL = 0.01


@pytest.fixture(scope="module")
def rows():
    g = torch.Generator().manual_seed(0)
    shared = F.normalize(torch.randn(DIM, generator=g), dim=0)
    groups = F.normalize(torch.randn(12, DIM, generator=g), dim=1)
    group_of = torch.randint(12, (ROWS,), generator=g)
    return F.normalize(2.0 * shared + groups[group_of] + 0.05 * torch.randn(ROWS, DIM, generator=g), dim=1)


@contextlib.contextmanager
def threads(n: int):
    from threadpoolctl import threadpool_limits
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with threadpool_limits(limits=n):
            yield
    finally:
        torch.set_num_threads(before)


def fit(provider, rows):
    """(labels [N] int64, centroids [K, D]) of one provider's fit."""
    if provider == "clipmoe":
        centroids, labels = kmeans(rows, K, seed=0)
        return labels, centroids
    from sklearn.cluster import KMeans, MiniBatchKMeans
    if provider == "sklearn_kmeans":
        model = KMeans(K, n_init=1, random_state=0)
    else:
        model = MiniBatchKMeans(K, batch_size=1_000_000, max_iter=500, tol=1e-5, n_init="auto", random_state=0)
    model.fit(rows.numpy())
    return torch.from_numpy(model.labels_).long(), torch.from_numpy(model.cluster_centers_)


def inertia(rows, labels, centroids) -> float:
    return float(((rows.double() - centroids.double()[labels]) ** 2).sum())


@pytest.mark.parametrize("provider", PROVIDERS)
def test_kmeans(benchmark, provider, rows):
    benchmark.group = f"kmeans {ROWS}x{DIM} K={K} {THREADS} threads"
    with threads(THREADS):
        got = inertia(rows, *fit(provider, rows))
        want = got if provider == "sklearn_kmeans" else inertia(rows, *fit("sklearn_kmeans", rows))
        assert got == pytest.approx(want, rel=INERTIA_RTOL), f"{provider}: inertia {got} vs KMeans {want}"
        benchmark.extra_info.update(inertia=got, sklearn_kmeans_inertia=want)
        time_provider(benchmark, lambda: fit(provider, rows), "cpu", heavy=True)
