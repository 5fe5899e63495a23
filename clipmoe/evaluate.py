"""Zero-shot evaluation of CLIP and CLIP-MoE models, and routing analysis of their MoE layers.

Metrics (the protocol of the CLIP-MoE code, which follows Long-CLIP; docs algorithm.md §2g):
- Retrieval, `retrieval_metrics`: a gallery of N_img images and N_txt captions, each caption belonging to one image
  (`text_to_image`), an image having one or more captions (5 in COCO and Flickr30k). Scores are dot products of the
  features (cosine similarities for L2-normalised features). Image→text Recall@k: the share of images for which ANY
  of their captions is among the k best-scoring captions. Text→image Recall@k: the share of captions whose image is
  among the k best-scoring images.
- Zero-shot classification, `zero_shot_metrics` / `class_embeddings`: each class's prompts (class name × templates)
  are encoded and L2-normalised, averaged, and the mean re-normalised; an image is classified by its best-scoring
  class embedding; top-k accuracy (a top-k larger than the number of classes counts every image as a hit).

Ties count against the model. The rank of a query's answer is the number of WRONG candidates whose score is greater
than OR EQUAL to the best score of a right one, and a query is a hit at k when that rank is < k. So a model that
cannot tell candidates apart is not rewarded: with constant features every candidate ties, and Recall@k is 0 for any
k smaller than the number of wrong candidates (an index-order tie-break, as argsort gives, would instead credit the
caption that happens to come first). The other right candidates of an image (its other captions) never count
against it. A NaN score counts as a tie (against the model); a NaN best right score makes the query a miss. Exact
ties are what the rule decides: identical captions of different images (frequent in a small synthetic vocabulary)
have identical features, so image→text R@1 of such an image is always a miss.

Routing analysis, `collect_routing` / `routing_statistics` / `plot_routing_heatmap`: per tower ("visual" for modules
whose name starts with "visual." or "vision_model.", else "text"), per MoE layer (module name) and per expert, the
share of the routed tokens whose j-th choice is that expert (j = 1..k: first choice, second choice, ...), the mean
router probability, and the balance losses of the layer (docs algorithm.md §2c) over the same tokens. Every token
that passes a layer counts, padding tokens and the ViT class token included (the model routes them too).

Feature extraction runs the model in eval mode under torch.no_grad (the model's previous mode is restored), in fp32
unless the model is in another dtype; features are returned L2-normalised, as float32 on the CPU.
"""
import hashlib
import math
import os
import sys
from collections import Counter
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from clipmoe.data import _decode_image, _to_tensor
from clipmoe.moe_ffn import MoEFFN

# Score rows per chunk in the metric functions: a chunk holds at most this many scores (64 MiB in fp32), so
# Flickr30k's full 31.8k x 159k protocol fits in memory on a CPU or a GPU.
SCORE_CHUNK_ELEMENTS = 1 << 24

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


# ---------------------------------------------------------------------------------------------------------- metrics
def _check_ks(ks: Sequence[int]) -> List[int]:
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
                      ks: Sequence[int] = (1, 5, 10)) -> Dict[str, float]:
    """Image→text and text→image Recall@k, in percent.

    Args:
        image_features: [N_img, D], L2-normalised (scores are dot products).
        text_features: [N_txt, D], L2-normalised.
        text_to_image: long [N_txt], the image index of each caption; every image needs at least one caption.
        ks: the k of Recall@k.
    Returns:
        {"i2t_R@1": ..., "i2t_R@5": ..., "i2t_R@10": ..., "t2i_R@1": ..., ...}: floats in [0, 100]. An image→text
        hit: ANY of the image's captions in the top k. Ties count against the model (module docstring).
    Raises:
        ValueError: shapes that disagree, an index out of range, an image without a caption, bad ks.
    """
    ks = _check_ks(ks)
    images = _check_features("image_features", image_features).float()
    texts = _check_features("text_features", text_features).float().to(images.device)
    if images.shape[1] != texts.shape[1]:
        raise ValueError(f"image_features and text_features have different widths: {images.shape[1]} and "
                         f"{texts.shape[1]}")
    num_images = images.shape[0]
    t2i = _index_vector("text_to_image", text_to_image, "N_txt", texts.shape[0], num_images, images.device)
    captions_per_image = torch.bincount(t2i, minlength=num_images)
    if (captions_per_image == 0).any():
        missing = (captions_per_image == 0).nonzero().flatten()
        raise ValueError(f"{missing.numel()} of {num_images} images have no caption (e.g. image "
                         f"{missing[0].item()}); drop them from image_features")
    image_ids = torch.arange(num_images, device=images.device)
    i2t = _answer_ranks(images, texts, lambda a, b: t2i[None, :] == image_ids[a:b, None])
    t2i_ranks = _answer_ranks(texts, images, lambda a, b: image_ids[None, :] == t2i[a:b, None])
    out = {f"i2t_R@{k}": _percent_hits(i2t, k) for k in ks}
    out.update({f"t2i_R@{k}": _percent_hits(t2i_ranks, k) for k in ks})
    return out


def zero_shot_metrics(image_features: torch.Tensor, class_embeddings: torch.Tensor, labels: torch.Tensor,
                      ks: Sequence[int] = (1, 5)) -> Dict[str, float]:
    """Top-k zero-shot classification accuracy, in percent.

    Args:
        image_features: [N, D], L2-normalised.
        class_embeddings: [C, D], one L2-normalised embedding per class (see `class_embeddings`).
        labels: long [N], class ids in [0, C).
        ks: the k of top-k; the top-k is capped at C classes, so a k >= C counts every image as a hit (unless its
            score is NaN).
    Returns:
        {"top1": ..., "top5": ...}: floats in [0, 100]. Ties count against the model (module docstring).
    """
    ks = _check_ks(ks)
    images = _check_features("image_features", image_features).float()
    classes = _check_features("class_embeddings", class_embeddings).float().to(images.device)
    if images.shape[1] != classes.shape[1]:
        raise ValueError(f"image_features and class_embeddings have different widths: {images.shape[1]} and "
                         f"{classes.shape[1]}")
    num_classes = classes.shape[0]
    labels = _index_vector("labels", labels, "N", images.shape[0], num_classes, images.device)
    class_ids = torch.arange(num_classes, device=images.device)
    ranks = _answer_ranks(images, classes, lambda a, b: class_ids[None, :] == labels[a:b, None])
    return {f"top{k}": _percent_hits(ranks, min(k, num_classes)) for k in ks}


# ------------------------------------------------------------------------------------------------------- embeddings
def _progress_bar(iterable, total: int, desc: str, progress: Optional[bool]):
    from tqdm import tqdm

    # progress=None: a bar only when stderr is a terminal (no bar lines in logs and captured output).
    disable = not sys.stderr.isatty() if progress is None else not progress
    return tqdm(iterable, total=total, desc=desc, unit="batch", disable=disable, leave=False)


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
    encode = getattr(model, f"encode_{tower}", None)
    if encode is None:
        raise TypeError(f"{type(model).__name__} has no encode_{tower} method (an open_clip CLIP-style model with "
                        f"encode_image and encode_text is expected)")
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
                 progress: Optional[bool] = None) -> torch.Tensor:
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
                progress: Optional[bool] = None) -> torch.Tensor:
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


def _embed_captions(model, tokenizer, captions: Sequence[str], device, batch_size: int, progress, desc="texts"
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
                     batch_size: int = 256, *, progress: Optional[bool] = None) -> torch.Tensor:
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
    features = _embed_captions(model, tokenizer, prompts, device, batch_size, progress, desc="class prompts")
    owner = torch.tensor(owner)
    sums = torch.zeros(int(owner.max()) + 1, features.shape[1]).index_add_(0, owner, features)
    return F.normalize(sums / torch.bincount(owner)[:, None], dim=-1)


# ------------------------------------------------------------------------------------------------------ evaluations
def evaluate_synthetic(model: nn.Module, dataset, tokenizer, device="cpu", batch_size: int = 256, *,
                       progress: Optional[bool] = None) -> dict:
    """Retrieval and per-attribute zero-shot classification on a `clipmoe.synthetic.SyntheticShapes` split (the
    test split, built with the model's eval preprocess and its tokenizer).

    Retrieval uses one caption per image (the tokens of the dataset items); zero-shot classification, for each
    attribute, the prompts of `dataset.zero_shot_prompts(attribute)` against `dataset.labels`.
    Returns {"retrieval": retrieval_metrics(...), "zero_shot": {attribute: {"top1": .., "top5": ..}},
    "zero_shot_mean_top1": mean top-1 over the attributes, "num_samples": N, "num_shared_captions": the number of
    images whose caption another image of the split has too}. Identical captions have identical features, so under
    the tie rule (module docstring) those images are always image->text misses at k = 1: image->text R@1 is at most
    100 * (N - num_shared_captions) / N, for any model.
    """
    device = _check_device(model, device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=_collate_pairs)
    images, texts = [], []
    with _inference(model):
        for image, tokens in _progress_bar(loader, len(loader), "images+captions", progress):
            images.append(_encode(model, "image", image.to(device)).cpu())
            texts.append(_encode(model, "text", tokens.to(device)).cpu())
    images, texts = torch.cat(images), torch.cat(texts)
    retrieval = retrieval_metrics(images, texts, torch.arange(images.shape[0]))
    zero_shot = {}
    for j, attribute in enumerate(dataset.attributes):
        classifier = class_embeddings(model, tokenizer, dataset.zero_shot_prompts(attribute), device, batch_size,
                                      progress=progress)
        zero_shot[attribute] = zero_shot_metrics(images, classifier, dataset.labels[:, j])
    mean_top1 = sum(r["top1"] for r in zero_shot.values()) / len(zero_shot)
    caption_counts = Counter(dataset.captions)
    shared = sum(caption_counts[c] > 1 for c in dataset.captions)
    return {"retrieval": retrieval, "zero_shot": zero_shot, "zero_shot_mean_top1": mean_top1,
            "num_samples": images.shape[0], "num_shared_captions": shared}


def evaluate_retrieval(model: nn.Module, images_dataset, captions: Union[Sequence[str], torch.Tensor],
                       text_to_image, tokenizer, device="cpu", batch_size: int = 256, *, num_workers: int = 0,
                       progress: Optional[bool] = None) -> Dict[str, float]:
    """retrieval_metrics of a model on an image dataset (items (image, ...), e.g. KarpathyRetrieval) and its
    captions (strings, tokenised with `tokenizer`, or token ids [N_txt, L]) with text_to_image [N_txt]."""
    image_features = embed_images(model, images_dataset, device, batch_size, num_workers, progress=progress)
    if isinstance(captions, torch.Tensor):
        text_features = embed_texts(model, captions, device, batch_size, progress=progress)
    else:
        text_features = _embed_captions(model, tokenizer, list(captions), device, batch_size, progress)
    return retrieval_metrics(image_features, text_features, torch.as_tensor(text_to_image))


# ------------------------------------------------------------------------------------------------- image datasets
class ImageFiles(Dataset):
    """Images read from files (or held as encoded bytes), items (image, index); a bad image raises, naming it
    (evaluation must see every image). preprocess: PIL -> tensor; None: float [3, H, W] in [0, 1]."""

    def __init__(self, sources: Sequence[Union[str, bytes]], preprocess: Optional[Callable] = None,
                 names: Optional[Sequence[str]] = None):
        self.sources, self.preprocess = list(sources), preprocess
        self.names = list(names) if names is not None else [s if isinstance(s, str) else f"image {i}"
                                                            for i, s in enumerate(self.sources)]

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int):
        from clipmoe.data import BadSample
        try:
            image = _decode_image(self.sources[index], self.names[index])
        except BadSample as e:
            raise (FileNotFoundError if e.missing else ValueError)(str(e)) from e
        return (_to_tensor(image) if self.preprocess is None else self.preprocess(image)), index


class KarpathyRetrieval(ImageFiles):
    """The images of one split of a Karpathy-style COCO / Flickr30k JSON, with their captions.

    The file: {"images": [{"filename": "x.jpg", "filepath": "val2014" (optional), "split": "test",
    "sentences": [{"raw": "a caption", "tokens": [...]}, ...]}, ...]}; the image path is
    image_root/filepath/filename (image_root/filename without "filepath").

    Args:
        split: a split name ("test", "val", "train", "restval"), a list of them, or None / "all" for every image
            (Long-CLIP's Flickr30k protocol uses all 31.8k images).
        preprocess: PIL -> tensor (the model's eval transform); None: float [3, H, W] in [0, 1].
        max_captions: keep the first n captions of each image (COCO's 5k protocol: 5; a few COCO images have 6-7).
        check_files: stat every image now and raise FileNotFoundError naming the missing ones.
    Items: (image, index). Attributes: paths, captions (list of N_txt str), text_to_image (long [N_txt]),
    num_without_captions (images of the split dropped because they have no caption).
    """

    def __init__(self, json_path, image_root, split: Optional[Union[str, Sequence[str]]] = "test",
                 preprocess: Optional[Callable] = None, *, max_captions: Optional[int] = None,
                 check_files: bool = True):
        import json

        json_path = os.fspath(json_path)
        if not os.path.isfile(json_path):
            raise FileNotFoundError(f"{json_path}: Karpathy JSON file not found")
        if not os.path.isdir(image_root):
            raise FileNotFoundError(f"{image_root}: image root folder not found")
        with open(json_path, encoding="utf-8") as f:
            try:
                document = json.load(f)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{json_path}: not valid JSON ({exc})") from exc
        entries = document.get("images") if isinstance(document, dict) else None
        if not isinstance(entries, list):
            raise ValueError(f"{json_path}: expected a Karpathy-style JSON object with an \"images\" list")
        splits = None if split in (None, "all") else ({split} if isinstance(split, str) else set(split))
        paths, captions, text_to_image = [], [], []
        self.num_without_captions = 0
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or "filename" not in entry:
                raise ValueError(f"{json_path}: images[{i}] has no \"filename\"")
            if splits is not None and entry.get("split") not in splits:
                continue
            texts = []
            for sentence in entry.get("sentences", []):
                if isinstance(sentence, dict):
                    text = sentence.get("raw") or " ".join(sentence.get("tokens", []))
                else:
                    text = str(sentence)
                if text.strip():
                    texts.append(text.strip())
            texts = texts[:max_captions] if max_captions is not None else texts
            if not texts:
                self.num_without_captions += 1
                continue
            text_to_image.extend([len(paths)] * len(texts))
            captions.extend(texts)
            paths.append(os.path.join(os.fspath(image_root), entry.get("filepath", ""), entry["filename"]))
        if not paths:
            found = sorted({str(e.get("split")) for e in entries if isinstance(e, dict)})
            raise ValueError(f"{json_path}: no image with a caption in split {split!r}; the file has splits {found}")
        if check_files:
            missing = [p for p in paths if not os.path.isfile(p)]
            if missing:
                raise FileNotFoundError(f"{json_path}: {len(missing)} of {len(paths)} images not found under "
                                        f"{image_root}, e.g. {missing[0]}")
        super().__init__(paths, preprocess)
        self.paths, self.captions = paths, captions
        self.text_to_image = torch.tensor(text_to_image, dtype=torch.long)


def group_captions(keys: Sequence, captions: Sequence[str]):
    """Rows (image key, caption) -> (unique keys in first-seen order, text_to_image [N_txt] long)."""
    first: Dict = {}
    text_to_image = [first.setdefault(k, len(first)) for k in keys]
    return list(first), torch.tensor(text_to_image, dtype=torch.long)


def dedup_images(images: Sequence[bytes], captions: Sequence[str]):
    """Encoded images with one caption each (webdataset samples) -> (unique images, text_to_image): byte-identical
    images (a shard written one sample per caption) become one gallery image with several captions."""
    keys = [hashlib.sha1(data).hexdigest() for data in images]
    unique_keys, text_to_image = group_captions(keys, captions)
    by_key = dict(zip(keys, images, strict=True))
    return [by_key[k] for k in unique_keys], text_to_image


# --------------------------------------------------------------------------------------------------------- routing
def tower_of(module_name: str) -> str:
    """"visual" for the image tower (open_clip "visual.", transformers "vision_model."), else "text"."""
    return "visual" if module_name.startswith(("visual.", "vision_model.")) else "text"


class RoutingCollector:
    """Routing counts of MoEFFN layers, accumulated over forwards (see `collect_routing`).

    Per layer: tokens seen, forwards, counts [k, E] of tokens whose j-th choice is expert e, and the sum of the
    router probabilities [E] (float64). `statistics()` turns them into `routing_statistics`' dict.
    """

    def __init__(self, source: str = "collected"):
        self.source = source
        self.layers: Dict[str, dict] = {}

    def add(self, name: str, module: MoEFFN) -> None:
        """Add the routing of `module`'s last forward (its `aux`) under layer `name`."""
        aux = module.aux
        if aux is None or aux.topk_ids.shape[0] == 0:
            return
        ids = aux.topk_ids.detach().long()
        num_tokens, top_k = ids.shape
        num_experts = aux.router_probs.shape[1]
        slots = ids + torch.arange(top_k, device=ids.device) * num_experts  # (choice j, expert e) -> j·E + e
        counts = torch.bincount(slots.flatten(), minlength=top_k * num_experts).view(top_k, num_experts)
        prob_sum = aux.router_probs.detach().sum(dim=0, dtype=torch.float64)
        layer = self.layers.get(name)
        if layer is None:
            self.layers[name] = {"tokens": num_tokens, "forwards": 1, "counts": counts, "prob_sum": prob_sum}
        else:
            layer["tokens"] += num_tokens
            layer["forwards"] += 1
            layer["counts"] = layer["counts"] + counts.to(layer["counts"].device)
            layer["prob_sum"] = layer["prob_sum"] + prob_sum.to(layer["prob_sum"].device)

    def statistics(self) -> dict:
        """The routing statistics of everything added so far (format: `routing_statistics`)."""
        if not self.layers:
            raise ValueError("no MoEFFN forward was recorded (does the model have MoE layers, and did it run "
                             "inside collect_routing?)")
        towers: Dict[str, dict] = {}
        for name, layer in self.layers.items():
            counts = layer["counts"].double().cpu()
            share = counts / layer["tokens"]                       # [k, E]; each row sums to 1
            mean_prob = (layer["prob_sum"].cpu() / layer["tokens"])  # [E]
            num_experts = share.shape[1]
            stats = {
                "num_tokens": layer["tokens"], "num_forwards": layer["forwards"],
                "num_experts": num_experts, "top_k": share.shape[0],
                "choice_share": share.tolist(),
                "first_choice_share": share[0].tolist(),
                "mean_router_prob": mean_prob.tolist(),
                # the balance losses of clipmoe.losses.balance_loss, over all the tokens counted here
                "balance_loss": (num_experts * (share[0] * mean_prob).sum()).item(),
                "balance_loss_topk": (num_experts * (share * mean_prob).sum()).item(),
            }
            if share.shape[0] >= 2:
                stats["second_choice_share"] = share[1].tolist()
            towers.setdefault(tower_of(name), {"layers": {}})["layers"][name] = stats
        for tower in towers.values():
            losses = [s["balance_loss"] for s in tower["layers"].values()]
            tower["num_layers"] = len(losses)
            tower["mean_balance_loss"] = sum(losses) / len(losses)
        ordered = {t: towers[t] for t in ("visual", "text") if t in towers}
        return {"source": self.source, "towers": ordered}


@contextmanager
def collect_routing(model: nn.Module) -> Iterator[RoutingCollector]:
    """Accumulate the routing of every MoEFFN of `model` over all forwards run inside the block:

        with collect_routing(model) as routing:
            evaluate_synthetic(model, data, tokenizer)
        stats = routing_statistics(model, routing)

    Forward hooks read each layer's `aux` after every forward; they are removed when the block ends, and the
    counts stay readable. A model without MoEFFN layers records nothing (statistics() then raises).
    """
    collector = RoutingCollector()
    handles = [module.register_forward_hook(lambda m, args, out, name=name: collector.add(name, m))
               for name, module in model.named_modules() if isinstance(module, MoEFFN)]
    try:
        yield collector
    finally:
        for handle in handles:
            handle.remove()


def routing_statistics(model: nn.Module, collector: Optional[RoutingCollector] = None) -> dict:
    """Per tower, MoE layer and expert: the share of tokens routed to the expert as j-th choice, and per layer the
    balance losses. JSON-serialisable.

    With a `collector` (from `collect_routing`): over every forward it recorded, e.g. a whole eval set. Without:
    from each MoEFFN's last forward only (call it right after running the model on eval data; with separate image
    and text forwards, each tower reflects its own last batch).

    Returns {"source": "collected" | "last_forward", "towers": {"visual" | "text": {"num_layers", "mean_balance_loss",
    "layers": {module name: {"num_tokens", "num_forwards", "num_experts", "top_k", "choice_share" [k][E] (each row
    sums to 1), "first_choice_share" [E], "second_choice_share" [E] (k >= 2), "mean_router_prob" [E],
    "balance_loss" (paper form: E·Σ_e f_e·P_e with first choices; 1 at perfect balance), "balance_loss_topk"
    (official-code form over all k choices; k at perfect balance)}}}}}.
    """
    if collector is None:
        collector = RoutingCollector(source="last_forward")
        moes = [(name, m) for name, m in model.named_modules() if isinstance(m, MoEFFN)]
        if not moes:
            raise ValueError("the model has no MoEFFN layer")
        for name, module in moes:
            collector.add(name, module)
        if not collector.layers:
            raise ValueError("no MoEFFN layer of the model has run a forward; run the model on eval data first")
    return collector.statistics()


def _layer_label(name: str, tower: str) -> str:
    prefix = {"visual": ("visual.", "vision_model."), "text": ()}[tower]
    for p in prefix:
        if name.startswith(p):
            name = name[len(p):]
    for suffix in (".mlp", ".moe"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name.replace("transformer.resblocks.", "block ").replace("encoder.layers.", "block ")


def plot_routing_heatmap(stats: Mapping, path, *, choices: Optional[int] = None, title: Optional[str] = None):
    """Heatmaps of `routing_statistics` (like the CLIP-MoE paper's routing figure): one column of panels per tower,
    one row per routing choice (first choice, second choice, ... up to `choices`, default all k); each panel is
    layers x experts, the cell the share of the layer's tokens whose j-th choice is that expert. Writes a PNG (Agg,
    no pyplot state) and returns `path`."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    towers = stats.get("towers") if isinstance(stats, Mapping) else None
    if not towers:
        raise ValueError("stats has no towers; pass the dict returned by routing_statistics")
    top_k = max(layer["top_k"] for t in towers.values() for layer in t["layers"].values())
    rows = top_k if choices is None else max(1, min(choices, top_k))
    max_layers = max(len(t["layers"]) for t in towers.values())
    max_experts = max(layer["num_experts"] for t in towers.values() for layer in t["layers"].values())
    width = 1.5 + len(towers) * (2.2 + 0.4 * max_experts)
    height = 0.8 + rows * (1.0 + 0.3 * max_layers)
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, len(towers), squeeze=False)
    vmax = max(max(layer["choice_share"][j]) for t in towers.values() for layer in t["layers"].values()
               for j in range(min(rows, layer["top_k"])))
    ordinal = ["first", "second", "third"] + [f"{j + 1}th" for j in range(3, rows)]
    image = None
    for col, (tower, data) in enumerate(towers.items()):
        names = list(data["layers"])
        grid = np.full((rows, len(names), max_experts), np.nan)
        for i, name in enumerate(names):
            layer = data["layers"][name]
            for j in range(min(rows, layer["top_k"])):
                grid[j, i, : layer["num_experts"]] = layer["choice_share"][j]
        for j in range(rows):
            ax = axes[j][col]
            image = ax.imshow(grid[j], aspect="auto", cmap="viridis", vmin=0.0, vmax=max(vmax, 1e-9))
            ax.set_title(f"{tower}: {ordinal[j]} choice", fontsize=9)
            ax.set_xticks(range(max_experts), [str(e) for e in range(max_experts)], fontsize=7)
            ax.set_yticks(range(len(names)), [_layer_label(n, tower) for n in names], fontsize=7)
            ax.set_xlabel("expert", fontsize=8)
            if len(names) * max_experts <= 512:
                for (i, e), value in np.ndenumerate(grid[j]):
                    if not np.isnan(value):
                        ax.text(e, i, f"{100 * value:.0f}", ha="center", va="center", fontsize=6,
                                color="white" if value < 0.6 * vmax else "black")
    fig.colorbar(image, ax=axes.ravel().tolist(), label="share of tokens")
    fig.suptitle(title or f"routing ({stats.get('source', '')}); cell = % of the layer's tokens", fontsize=9)
    from clipmoe.fileio import atomic_write
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    return os.fspath(path)
