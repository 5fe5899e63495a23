"""Retrieval and zero-shot classification metrics from precomputed features (the protocol: docs/method.md).

- Retrieval, `retrieval_metrics`: a gallery of N_img images and N_txt captions, each caption belonging to one image
  (`text_to_image`), an image having one or more captions (5 in COCO and Flickr30k). Scores are dot products of the
  features (cosine similarities for L2-normalised features). Image→text Recall@k: the share of images for which ANY
  of their captions is among the k best-scoring captions. Text→image Recall@k: the share of captions whose image is
  among the k best-scoring images.
- Zero-shot classification, `zero_shot_metrics` / `class_embeddings`: each class's prompts (class name × templates)
  are encoded and L2-normalised, averaged, and the mean re-normalised; an image is classified by its best-scoring
  class embedding; top-k accuracy (a top-k larger than the number of classes counts every image as a hit).

Two rules for ties (`ties=`): "count" (the default, clipmoe's own) and "sort" (clip_benchmark's, and the Long-CLIP /
CLIP-MoE eval scripts'). On scores without exact ties they give the same numbers.

"count": ties count against the model. The rank of a query's answer is the number of WRONG candidates whose score is
greater than OR EQUAL to the best score of a right one, and a query is a hit at k when that rank is < k. So a model that
cannot tell candidates apart is not rewarded: with constant features every candidate ties, and Recall@k is 0 for any
k smaller than the number of wrong candidates (an index-order tie-break, as argsort gives, would instead credit the
caption that happens to come first). The other right candidates of an image (its other captions) never count
against it. A NaN score counts as a tie (against the model); a NaN best right score makes the query a miss. Exact
ties are what the rule decides: identical captions of different images (frequent in a small synthetic vocabulary)
have identical features, so image→text R@1 of such an image is always a miss.

"sort": the top k of each query are those torch.topk returns, which breaks ties in its own (implementation-defined)
order, and a query is a hit at k when one of its right candidates is among them: clip_benchmark's `recall_at_k`
and `accuracy`. `clip_benchmark_retrieval` / `clip_benchmark_zero_shot` give that protocol under clip_benchmark's
metric names, as fractions in [0, 1] ("image_retrieval_recall@k" is text→image, "text_retrieval_recall@k"
image→text; "acc1", "acc5", "mean_per_class_recall").
"""
import math
from collections.abc import Callable, Sequence

import torch

# Score rows per chunk in the metric functions: a chunk holds at most this many scores (64 MiB in fp32), so
# Flickr30k's full 31.8k x 159k protocol fits in memory on a CPU or a GPU.
SCORE_CHUNK_ELEMENTS = 1 << 24
TIES = ("count", "sort")  # module docstring

def _check_ks(ks: Sequence[int]) -> list[int]:
    ks = list(ks)
    if not ks or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of ints >= 1, got {ks!r}")
    return ks


def _check_features(name: str, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a 2-D floating-point tensor [N, D], got {shape}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 rows)")
    return x


def _feature_pair(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor):
    """Two checked feature matrices of one width, as float32 on a's device."""
    a = _check_features(name_a, a).float()
    b = _check_features(name_b, b).float().to(a.device)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{name_a} and {name_b} have different widths: {a.shape[1]} and {b.shape[1]}")
    return a, b


def _answer_ranks(queries: torch.Tensor, gallery: torch.Tensor, is_answer: Callable[[int, int], torch.Tensor]
                  ) -> torch.Tensor:
    """Per query, the number of wrong gallery items scoring >= its best right item (module docstring: ties count
    against the model); +inf where that best score is NaN. is_answer(start, stop) -> bool [stop - start, N_gallery].
    """
    rows = max(1, SCORE_CHUNK_ELEMENTS // gallery.shape[0])
    ranks = []
    for start in range(0, queries.shape[0], rows):
        stop = min(start + rows, queries.shape[0])
        scores = queries[start:stop] @ gallery.T
        right = is_answer(start, stop)
        best = scores.masked_fill(~right, -math.inf).amax(dim=1)  # NaN if any right score is NaN
        against = ((scores >= best[:, None]) | scores.isnan()) & ~right
        rank = against.sum(dim=1).double()
        ranks.append(rank.masked_fill(best.isnan(), math.inf))
    return torch.cat(ranks)


def _topk_hits(queries: torch.Tensor, gallery: torch.Tensor, is_answer: Callable[[int, int], torch.Tensor],
               ks: Sequence[int]) -> dict[int, torch.Tensor]:
    """Per k, bool [N_queries]: whether a right item is among the k that torch.topk picks (ties: its order)."""
    rows = max(1, SCORE_CHUNK_ELEMENTS // gallery.shape[0])
    hits = {k: [] for k in ks}
    for start in range(0, queries.shape[0], rows):
        stop = min(start + rows, queries.shape[0])
        scores = queries[start:stop] @ gallery.T
        right = is_answer(start, stop)
        for k in ks:  # one topk per k, as clip_benchmark does (topk(k) need not be a prefix of topk(k + 1))
            top = scores.topk(min(k, gallery.shape[0]), dim=1).indices
            hits[k].append(right.gather(1, top).any(dim=1))
    return {k: torch.cat(v) for k, v in hits.items()}


def _check_ties(ties: str) -> str:
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    return ties


def _percent_hits(ranks: torch.Tensor, k: int) -> float:
    return (ranks < k).double().mean().item() * 100.0


def _index_vector(name: str, values, length_name: str, length: int, upper: int, device) -> torch.Tensor:
    """`values` as a long [length] tensor on `device` whose entries lie in [0, upper); ValueError naming `name`."""
    t = torch.as_tensor(values)
    if t.dim() != 1 or t.shape[0] != length or t.is_floating_point():
        raise ValueError(f"{name} must be an integer tensor of shape [{length_name}={length}], got {t.dtype} "
                         f"{tuple(t.shape)}")
    t = t.long().to(device)
    if length and (t.min() < 0 or t.max() >= upper):
        raise ValueError(f"{name} holds values outside [0, {upper}): min {t.min().item()}, max {t.max().item()}")
    return t


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor,
                      ks: Sequence[int] = (1, 5, 10), *, ties: str = "count") -> dict[str, float]:
    """Image→text and text→image Recall@k, in percent.

    Args:
        image_features: [N_img, D], L2-normalised (scores are dot products).
        text_features: [N_txt, D], L2-normalised.
        text_to_image: long [N_txt], the image index of each caption; every image needs at least one caption.
        ks: the k of Recall@k.
        ties: "count" (ties count against the model) or "sort" (torch.topk breaks them, as clip_benchmark).
    Returns:
        {"i2t_R@1": ..., "i2t_R@5": ..., "i2t_R@10": ..., "t2i_R@1": ..., ...}: floats in [0, 100]. An image→text
        hit: ANY of the image's captions in the top k.
    Raises:
        ValueError: shapes that disagree, an index out of range, an image without a caption, bad ks.
    """
    ks, ties = _check_ks(ks), _check_ties(ties)
    images, texts = _feature_pair("image_features", image_features, "text_features", text_features)
    num_images = images.shape[0]
    t2i = _index_vector("text_to_image", text_to_image, "N_txt", texts.shape[0], num_images, images.device)
    captions_per_image = torch.bincount(t2i, minlength=num_images)
    if (captions_per_image == 0).any():
        missing = (captions_per_image == 0).nonzero().flatten()
        raise ValueError(f"{missing.numel()} of {num_images} images have no caption (e.g. image "
                         f"{missing[0].item()}); drop them from image_features")
    image_ids = torch.arange(num_images, device=images.device)
    i2t_answers = lambda a, b: t2i[None, :] == image_ids[a:b, None]  # noqa: E731
    t2i_answers = lambda a, b: image_ids[None, :] == t2i[a:b, None]  # noqa: E731
    if ties == "sort":
        hits = {"i2t": _topk_hits(images, texts, i2t_answers, ks), "t2i": _topk_hits(texts, images, t2i_answers, ks)}
        return {f"{d}_R@{k}": hits[d][k].double().mean().item() * 100.0 for d in ("i2t", "t2i") for k in ks}
    i2t = _answer_ranks(images, texts, i2t_answers)
    t2i_ranks = _answer_ranks(texts, images, t2i_answers)
    out = {f"i2t_R@{k}": _percent_hits(i2t, k) for k in ks}
    out.update({f"t2i_R@{k}": _percent_hits(t2i_ranks, k) for k in ks})
    return out


def zero_shot_metrics(image_features: torch.Tensor, class_embeddings: torch.Tensor, labels: torch.Tensor,
                      ks: Sequence[int] = (1, 5), *, ties: str = "count") -> dict[str, float]:
    """Top-k zero-shot classification accuracy, in percent.

    Args:
        image_features: [N, D], L2-normalised.
        class_embeddings: [C, D], one L2-normalised embedding per class (see `class_embeddings`).
        labels: long [N], class ids in [0, C).
        ks: the k of top-k; the top-k is capped at C classes, so a k >= C counts every image as a hit (unless its
            score is NaN).
        ties: "count" or "sort" (module docstring).
    Returns:
        {"top1": ..., "top5": ...}: floats in [0, 100].
    """
    ks, ties = _check_ks(ks), _check_ties(ties)
    images, classes = _feature_pair("image_features", image_features, "class_embeddings", class_embeddings)
    num_classes = classes.shape[0]
    labels = _index_vector("labels", labels, "N", images.shape[0], num_classes, images.device)
    class_ids = torch.arange(num_classes, device=images.device)
    answers = lambda a, b: class_ids[None, :] == labels[a:b, None]  # noqa: E731
    if ties == "sort":  # clip_benchmark's accuracy: one topk(max k), its first k columns for each k
        top = (images @ classes.T).topk(min(max(ks), num_classes), dim=1).indices
        correct = top == labels[:, None]
        return {f"top{k}": correct[:, :k].any(dim=1).double().mean().item() * 100.0 for k in ks}
    ranks = _answer_ranks(images, classes, answers)
    return {f"top{k}": _percent_hits(ranks, min(k, num_classes)) for k in ks}


def mean_per_class_recall(image_features: torch.Tensor, class_embeddings: torch.Tensor, labels: torch.Tensor
                          ) -> float:
    """clip_benchmark's mean_per_class_recall (balanced accuracy), in percent: the prediction is the argmax class
    (ties: the lowest class id), the recall of each class present in `labels` averaged with equal weights."""
    images = _check_features("image_features", image_features).float()
    classes = _check_features("class_embeddings", class_embeddings).float().to(images.device)
    labels = _index_vector("labels", labels, "N", images.shape[0], classes.shape[0], images.device)
    predicted = (images @ classes.T).argmax(dim=1)
    present = labels.unique()
    recalls = [(predicted[labels == c] == c).double().mean() for c in present]
    return torch.stack(recalls).mean().item() * 100.0


def clip_benchmark_retrieval(image_features, text_features, text_to_image, ks: Sequence[int] = (1, 5, 10)
                             ) -> dict[str, float]:
    """Retrieval as clip_benchmark reports it: ties="sort", its names, fractions in [0, 1]."""
    got = retrieval_metrics(image_features, text_features, text_to_image, ks, ties="sort")
    out = {f"image_retrieval_recall@{k}": got[f"t2i_R@{k}"] / 100.0 for k in ks}
    out.update({f"text_retrieval_recall@{k}": got[f"i2t_R@{k}"] / 100.0 for k in ks})
    return out


def clip_benchmark_zero_shot(image_features, class_embeddings, labels) -> dict[str, float]:
    """Zero-shot classification as clip_benchmark reports it: acc1, acc5 (ties="sort") and mean_per_class_recall,
    fractions in [0, 1]."""
    got = zero_shot_metrics(image_features, class_embeddings, labels, (1, 5), ties="sort")
    return {"acc1": got["top1"] / 100.0, "acc5": got["top5"] / 100.0,
            "mean_per_class_recall": mean_per_class_recall(image_features, class_embeddings, labels) / 100.0}

