"""Feature extraction and zero-shot evaluation of CLIP and CLIP-MoE models: embeddings of images, texts and
class prompts, and the evaluations built on them (metrics: clipmoe.eval.metrics).

Feature extraction runs the model in eval mode under torch.no_grad (the model's previous mode is restored), in fp32
unless the model is in another dtype; features are returned L2-normalised, as float32 on the CPU.
"""
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from clipmoe.eval.metrics import (
    clip_benchmark_retrieval,
    clip_benchmark_zero_shot,
    retrieval_metrics,
    zero_shot_metrics,
)
from clipmoe.inference import encoders
from clipmoe.progress import progress_bar

# Prompt templates for zero-shot classification of arbitrary class names (OpenAI-style photo templates; the CLIP
# paper's ImageNet set has 80, this short set keeps CPU evaluation cheap).
ZERO_SHOT_TEMPLATES = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a close-up photo of a {}.",
    "a cropped photo of a {}.",
    "a bright photo of a {}.",
    "a rendering of a {}.",
    "art of the {}.",
    "itap of a {}.",
)



def _progress_bar(iterable, total: int, desc: str, progress: bool | None):
    # progress=None: the package's policy (clipmoe.progress: a terminal and no -q); True/False force it.
    return progress_bar(iterable, total=total, desc=desc, unit="batch", enabled=progress, leave=False)


def _check_device(model: nn.Module, device) -> torch.device:
    device = torch.device(device)
    param = next(model.parameters(), None)
    if param is not None and (param.device.type != device.type
                              or (device.index is not None and param.device.index != device.index)):
        raise ValueError(f"the model is on {param.device} but device={str(device)!r}; move it with model.to(device)")
    return device


@contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _encode(model: nn.Module, tower: str, x: torch.Tensor) -> torch.Tensor:
    encode = dict(zip(("image", "text"), encoders(model), strict=True))[tower]
    if encode is None:
        raise TypeError(f"{type(model).__name__} has no encode_{tower} method (an open_clip CLIP-style model with "
                        f"encode_image and encode_text, or a transformers CLIP model, is expected)")
    if tower == "image":
        param = next(model.parameters(), None)
        if param is not None and param.is_floating_point():
            x = x.to(param.dtype)
    return F.normalize(encode(x).float(), dim=-1)


def _first(item):
    if item is None:
        raise ValueError("a dataset item is None (a skipped bad sample); evaluation needs every item, so build the "
                         "dataset with on_error='raise'")
    return item[0] if isinstance(item, (tuple, list)) else item


def _collate_images(batch):
    return torch.stack([_first(item) for item in batch])


def _collate_pairs(batch):
    for item in batch:
        _first(item)
    return torch.stack([item[0] for item in batch]), torch.stack([torch.as_tensor(item[1]) for item in batch])


def embed_images(model: nn.Module, dataset, device="cpu", batch_size: int = 256, num_workers: int = 0, *,
                 progress: bool | None = None) -> torch.Tensor:
    """L2-normalised image features [N, D] (float32, CPU) of a map-style dataset whose items are (image, ...)
    tuples (item[0] is taken) or image tensors. The model must already be on `device`. progress: a tqdm bar
    (None: only when stderr is a terminal)."""
    device = _check_device(model, device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=_collate_images)
    out = []
    with _inference(model):
        for images in _progress_bar(loader, len(loader), "images", progress):
            out.append(_encode(model, "image", images.to(device)).cpu())
    return torch.cat(out)


def embed_texts(model: nn.Module, tokens: torch.Tensor, device="cpu", batch_size: int = 256, *,
                progress: bool | None = None) -> torch.Tensor:
    """L2-normalised text features [N, D] (float32, CPU) of token ids [N, L]; the model must be on `device`."""
    device = _check_device(model, device)
    tokens = torch.as_tensor(tokens)
    if tokens.dim() != 2 or tokens.shape[0] == 0:
        raise ValueError(f"tokens must be a non-empty [N, L] tensor, got shape {tuple(tokens.shape)}")
    batches = range(0, tokens.shape[0], batch_size)
    out = []
    with _inference(model):
        for start in _progress_bar(batches, len(batches), "texts", progress):
            out.append(_encode(model, "text", tokens[start:start + batch_size].to(device)).cpu())
    return torch.cat(out)


def embed_captions(model, tokenizer, captions: Sequence[str], device, batch_size: int, progress, desc="texts"
                    ) -> torch.Tensor:
    """embed_texts of tokenizer(captions), tokenising batch by batch (the bar covers the tokenizer's time too)."""
    device = _check_device(model, device)
    batches = range(0, len(captions), batch_size)
    out = []
    with _inference(model):
        for start in _progress_bar(batches, len(batches), desc, progress):
            tokens = tokenizer(list(captions[start:start + batch_size]))
            out.append(_encode(model, "text", tokens.to(device)).cpu())
    return torch.cat(out)


def class_embeddings(model: nn.Module, tokenizer, prompts_per_class: Sequence[Sequence[str]], device="cpu",
                     batch_size: int = 256, *, progress: bool | None = None) -> torch.Tensor:
    """Zero-shot classifier [C, D]: per class, its prompts encoded and L2-normalised, averaged, re-normalised.

    Args:
        tokenizer: list of str -> long [N, L] (open_clip's, or clipmoe.synthetic.WordTokenizer).
        prompts_per_class: one non-empty list of prompts per class (e.g. a class name in every template:
            [[t.format(name) for t in ZERO_SHOT_TEMPLATES] for name in class_names]).
    """
    prompts, owner = [], []
    for c, class_prompts in enumerate(prompts_per_class):
        if isinstance(class_prompts, str) or len(class_prompts) == 0:
            raise ValueError(f"prompts_per_class[{c}] must be a non-empty list of prompts (one list per class), got "
                             f"{class_prompts!r}")
        prompts.extend(class_prompts)
        owner.extend([c] * len(class_prompts))
    if not prompts:
        raise ValueError("prompts_per_class is empty (no class)")
    features = embed_captions(model, tokenizer, prompts, device, batch_size, progress, desc="class prompts")
    owner = torch.tensor(owner)
    sums = torch.zeros(int(owner.max()) + 1, features.shape[1]).index_add_(0, owner, features)
    return F.normalize(sums / torch.bincount(owner)[:, None], dim=-1)


# ------------------------------------------------------------------------------------------------------ evaluations
PROTOCOLS = ("clipmoe", "clip_benchmark")


def protocol_metrics(protocol: str):
    """(retrieval metric function, zero-shot metric function, zero-shot top-1 key) of a protocol: "clipmoe" (ties
    count against the model, percent) or "clip_benchmark" (sorting breaks ties, its names, fractions)."""
    if protocol == "clipmoe":
        return retrieval_metrics, zero_shot_metrics, "top1"
    if protocol == "clip_benchmark":
        return clip_benchmark_retrieval, clip_benchmark_zero_shot, "acc1"
    raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")


def evaluate_synthetic(model: nn.Module, dataset, tokenizer, device="cpu", batch_size: int = 256, *,
                       progress: bool | None = None, protocol: str = "clipmoe") -> dict:
    """Retrieval and per-attribute zero-shot classification on a `clipmoe.synthetic.SyntheticShapes` split (the
    test split, built with the model's eval preprocess and its tokenizer).

    Retrieval uses one caption per image (the tokens of the dataset items); zero-shot classification, for each
    attribute, the prompts of `dataset.zero_shot_prompts(attribute)` against `dataset.labels`.
    Returns {"retrieval": retrieval_metrics(...), "zero_shot": {attribute: {"top1": .., "top5": ..}},
    "zero_shot_mean_top1": mean top-1 over the attributes, "num_samples": N, "num_shared_captions": the number of
    images whose caption another image of the split has too}. Identical captions have identical features, so under
    the tie rule (module docstring) those images are always image->text misses at k = 1: image->text R@1 is at most
    100 * (N - num_shared_captions) / N, for any model. protocol="clip_benchmark": its metrics (protocol_metrics).
    """
    retrieval_fn, zero_shot_fn, top1 = protocol_metrics(protocol)
    device = _check_device(model, device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=_collate_pairs)
    images, texts = [], []
    with _inference(model):
        for image, tokens in _progress_bar(loader, len(loader), "images+captions", progress):
            images.append(_encode(model, "image", image.to(device)).cpu())
            texts.append(_encode(model, "text", tokens.to(device)).cpu())
    images, texts = torch.cat(images), torch.cat(texts)
    retrieval = retrieval_fn(images, texts, torch.arange(images.shape[0]))
    zero_shot = {}
    for j, attribute in enumerate(dataset.attributes):
        classifier = class_embeddings(model, tokenizer, dataset.zero_shot_prompts(attribute), device, batch_size,
                                      progress=progress)
        zero_shot[attribute] = zero_shot_fn(images, classifier, dataset.labels[:, j])
    mean_top1 = sum(r[top1] for r in zero_shot.values()) / len(zero_shot)
    caption_counts = Counter(dataset.captions)
    shared = sum(caption_counts[c] > 1 for c in dataset.captions)
    return {"retrieval": retrieval, "zero_shot": zero_shot, "zero_shot_mean_top1": mean_top1,
            "num_samples": images.shape[0], "num_shared_captions": shared}


def evaluate_retrieval(model: nn.Module, images_dataset, captions: Sequence[str] | torch.Tensor,
                       text_to_image, tokenizer, device="cpu", batch_size: int = 256, *, num_workers: int = 0,
                       progress: bool | None = None) -> dict[str, float]:
    """retrieval_metrics of a model on an image dataset (items (image, ...), e.g. KarpathyRetrieval) and its
    captions (strings, tokenised with `tokenizer`, or token ids [N_txt, L]) with text_to_image [N_txt]."""
    image_features = embed_images(model, images_dataset, device, batch_size, num_workers, progress=progress)
    if isinstance(captions, torch.Tensor):
        text_features = embed_texts(model, captions, device, batch_size, progress=progress)
    else:
        text_features = embed_captions(model, tokenizer, list(captions), device, batch_size, progress)
    return retrieval_metrics(image_features, text_features, torch.as_tensor(text_to_image))

