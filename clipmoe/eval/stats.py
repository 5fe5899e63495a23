"""Statistics for comparing models on one test set and over seeds: clustering agreement (ARI, NMI), per-sample
outcomes of retrieval and zero-shot classification, bootstrap intervals (plain and paired), mean ± std.

Plain numpy (no scipy/sklearn in the environment). Definitions:
- ARI (Hubert & Arabie): (Σ_ij C(n_ij, 2) − E) / (½(Σ_i C(a_i, 2) + Σ_j C(b_j, 2)) − E), with
  E = Σ_i C(a_i, 2)·Σ_j C(b_j, 2) / C(n, 2); 1 for identical partitions (up to renaming), about 0 for independent
  ones; 1 when both partitions are a single cluster.
- NMI: I(A; B) / ((H(A) + H(B)) / 2) (the arithmetic normalisation, sklearn's default); 1 when both are constant,
  0 when exactly one is.
- Per-sample retrieval with label groups: samples with equal `groups` (e.g. identical captions) are right answers
  for each other; a query's rank is the number of WRONG candidates scoring >= its best right one (ties count against
  the model, as clipmoe.eval.metrics), a hit at k when rank < k.
- Bootstrap: resample the test samples with replacement (`num_resamples` times, seeded); the 95 % interval is the
  2.5/97.5 percentile of the resampled means. Paired: the same resampled indices for both models, on the per-sample
  difference, so the shared difficulty of the samples cancels.
"""
from collections.abc import Sequence

import numpy as np
import torch


def _labels(x, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array of labels, got shape {x.shape}")
    return np.unique(x, return_inverse=True)[1].reshape(-1)


def contingency(a, b) -> np.ndarray:
    """[clusters of a, clusters of b] counts of samples in each pair of clusters."""
    a, b = _labels(a, "a"), _labels(b, "b")
    if a.size != b.size:
        raise ValueError(f"a and b label different numbers of samples: {a.size} and {b.size}")
    table = np.zeros((a.max() + 1, b.max() + 1), dtype=np.int64)
    np.add.at(table, (a, b), 1)
    return table


def adjusted_rand_index(a, b) -> float:
    table = contingency(a, b)
    n = table.sum()

    def pairs(x):
        x = np.asarray(x, dtype=np.float64)
        return (x * (x - 1) / 2).sum()

    rows, cols, total = pairs(table.sum(1)), pairs(table.sum(0)), n * (n - 1) / 2
    expected = rows * cols / total if total else 0.0
    top = (rows + cols) / 2
    if top == expected:  # both partitions trivial in the same way (e.g. one cluster each)
        return 1.0
    return float((pairs(table) - expected) / (top - expected))


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def normalized_mutual_info(a, b) -> float:
    table = contingency(a, b).astype(np.float64)
    h_a, h_b = _entropy(table.sum(1)), _entropy(table.sum(0))
    if h_a == 0 and h_b == 0:
        return 1.0
    if h_a == 0 or h_b == 0:
        return 0.0
    p = table / table.sum()
    outer = p.sum(1, keepdims=True) * p.sum(0, keepdims=True)
    nz = p > 0
    mutual = float((p[nz] * np.log(p[nz] / outer[nz])).sum())
    return max(0.0, mutual / ((h_a + h_b) / 2))


# ----------------------------------------------------------------------------------------- per-sample outcomes
def _ranks(scores: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    best = scores.masked_fill(~right, -float("inf")).amax(dim=1)
    return (((scores >= best[:, None]) | scores.isnan()) & ~right).sum(dim=1)


def retrieval_hits(image_features: torch.Tensor, text_features: torch.Tensor, groups,
                   ks: Sequence[int] = (1, 5, 10)) -> dict[str, np.ndarray]:
    """Per-sample hits (bool [N]) of image->text and text->image retrieval, row i of both features being sample i;
    samples with equal `groups` count as right answers for each other (module docstring). Keys "i2t_R@k",
    "t2i_R@k"; the mean of a hit array x 100 is the Recall@k in %."""
    if image_features.shape != text_features.shape or image_features.dim() != 2:
        raise ValueError(f"image_features and text_features must be [N, D] of equal shape, got "
                         f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")
    groups = torch.as_tensor(_labels(groups, "groups"))
    if groups.numel() != image_features.shape[0]:
        raise ValueError(f"groups has {groups.numel()} entries for {image_features.shape[0]} samples")
    scores = image_features.float() @ text_features.float().T
    right = groups[:, None] == groups[None, :]
    out = {}
    for direction, s in (("i2t", scores), ("t2i", scores.T)):
        ranks = _ranks(s, right).numpy()
        out.update({f"{direction}_R@{k}": ranks < k for k in ks})
    return out


def zero_shot_hits(image_features: torch.Tensor, class_embeddings: torch.Tensor, labels) -> np.ndarray:
    """Per-sample top-1 correctness (bool [N]): the true class scores above every other (ties count against)."""
    labels = torch.as_tensor(np.asarray(labels)).long()
    scores = image_features.float() @ class_embeddings.float().T
    right = torch.nn.functional.one_hot(labels, class_embeddings.shape[0]).bool()
    return (_ranks(scores, right) < 1).numpy()


# --------------------------------------------------------------------------------------------------- intervals
def _resample_indices(n: int, num_resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(num_resamples, n))


def bootstrap_interval(values, *, num_resamples: int = 1000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean of per-sample `values` and its percentile bootstrap interval."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"values must be a non-empty 1-D array, got shape {values.shape}")
    means = values[_resample_indices(values.size, num_resamples, seed)].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(values.mean()), float(low), float(high)


def paired_bootstrap(a, b, *, num_resamples: int = 1000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float, float]:
    """(mean of a − b, low, high) over paired per-sample values of two models on the same samples."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values must have equal shapes, got {a.shape} and {b.shape}")
    return bootstrap_interval(a - b, num_resamples=num_resamples, seed=seed, level=level)


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value) of per-seed results."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("mean_std of no values")
    return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else 0.0
