"""clipmoe.eval.stats on hand-made labels and values whose answers are worked out by hand in the comments, and the
per-sample outcomes against clipmoe.eval.metrics."""
import math

import numpy as np
import pytest
import torch

from clipmoe.eval.metrics import retrieval_metrics, zero_shot_metrics
from clipmoe.eval.stats import (
    adjusted_rand_index,
    bootstrap_interval,
    contingency,
    mean_std,
    normalized_mutual_info,
    paired_bootstrap,
    retrieval_hits,
    zero_shot_hits,
)


def test_ari_hand_computed():
    # [0,0,1,1] vs [0,0,1,2]: pairs together in both = 1; row pairs 2, column pairs 1, all pairs 6;
    # expected 2*1/6 = 1/3; ARI = (1 - 1/3) / (1.5 - 1/3) = 4/7
    assert adjusted_rand_index([0, 0, 1, 1], [0, 0, 1, 2]) == pytest.approx(4 / 7)
    # [0,0,0,1,1,1] vs [0,0,1,1,2,2]: together 2; rows 6, columns 3, all 15; expected 1.2; (2 - 1.2) / (4.5 - 1.2)
    assert adjusted_rand_index([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2]) == pytest.approx(0.8 / 3.3)
    # crossed halves: together 0, rows 2, columns 2, all 6; expected 2/3; (0 - 2/3) / (2 - 2/3) = -1/2
    assert adjusted_rand_index([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(-0.5)
    # renaming clusters changes nothing; identical partitions give 1; one cluster each gives 1
    assert adjusted_rand_index([5, 5, 9, 9, 7], [1, 1, 0, 0, 2]) == pytest.approx(1.0)
    assert adjusted_rand_index([3, 3, 3], [0, 0, 0]) == 1.0
    assert contingency(["a", "b", "b"], [1, 1, 2]).tolist() == [[1, 0], [1, 1]]
    with pytest.raises(ValueError, match="different numbers"):
        adjusted_rand_index([0, 1], [0, 1, 2])


def test_nmi_hand_computed():
    # [0,0,1,1] vs [0,0,1,2]: H(a) = ln 2, H(b) = 1.5 ln 2, I = ln 2 (a is a function of b): 2 / 2.5 = 0.8
    assert normalized_mutual_info([0, 0, 1, 1], [0, 0, 1, 2]) == pytest.approx(0.8)
    assert normalized_mutual_info([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(0.0, abs=1e-12)  # independent
    assert normalized_mutual_info([2, 2, 0, 0], [0, 0, 1, 1]) == pytest.approx(1.0)
    assert normalized_mutual_info([0, 0, 0], [0, 1, 2]) == 0.0 and normalized_mutual_info([1, 1], [4, 4]) == 1.0
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 3, 3000), rng.integers(0, 3, 3000)
    assert normalized_mutual_info(a, b) < 0.01 and abs(adjusted_rand_index(a, b)) < 0.01


def test_bootstrap_intervals():
    assert bootstrap_interval(np.full(50, 7.0)) == (7.0, 7.0, 7.0)
    rng = np.random.default_rng(1)
    values = 100.0 * (rng.random(400) < 0.5)
    mean, low, high = bootstrap_interval(values, num_resamples=2000, seed=3)
    normal = 1.96 * values.std() / math.sqrt(values.size)  # about 4.9 points
    assert low < mean < high and (high - low) / 2 == pytest.approx(normal, rel=0.15)
    assert bootstrap_interval(values, seed=3) == bootstrap_interval(values, seed=3)  # seeded
    # paired: a shared per-sample difficulty cancels; the difference of +2 on every sample is exact
    difficulty = 100.0 * rng.random(300)
    assert paired_bootstrap(difficulty + 2, difficulty) == pytest.approx((2.0, 2.0, 2.0))
    noisy = difficulty + rng.normal(1.0, 1.0, 300)
    d, lo, hi = paired_bootstrap(noisy, difficulty)
    _, ulo, uhi = bootstrap_interval(noisy)
    assert lo < d < hi and hi - lo < (uhi - ulo) / 5
    with pytest.raises(ValueError, match="equal shapes"):
        paired_bootstrap([1.0, 2.0], [1.0])
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0) and mean_std([4.0]) == (4.0, 0.0)


def test_per_sample_hits_match_the_metrics():
    torch.manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(60, 8), dim=-1)
    texts = torch.nn.functional.normalize(images + 0.8 * torch.randn(60, 8), dim=-1)
    hits = retrieval_hits(images, texts, np.arange(60))  # every caption distinct: the usual protocol
    metrics = retrieval_metrics(images, texts, torch.arange(60))
    for key, value in metrics.items():
        assert 100 * hits[key].mean() == pytest.approx(value)
    classes = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    labels = torch.randint(0, 5, (60,))
    assert 100 * zero_shot_hits(images, classes, labels).mean() == pytest.approx(
        zero_shot_metrics(images, classes, labels)["top1"])


def test_equal_groups_are_right_answers():
    # samples 0 and 1 have the same caption (identical text features): either image is right for it
    images = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    texts = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    hits = retrieval_hits(images, texts, ["red", "red", "blue"], ks=(1,))
    assert hits["i2t_R@1"].tolist() == [True, True, True] and hits["t2i_R@1"].tolist() == [True, True, True]
    distinct = retrieval_hits(images, texts, [0, 1, 2], ks=(1,))  # as distinct captions the tie counts against
    assert distinct["i2t_R@1"].tolist() == [False, False, True]
