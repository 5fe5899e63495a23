"""Image datasets of evaluation: image files (or bytes), Karpathy-style COCO / Flickr30k retrieval splits and COCO
caption annotation files (captions_val2017.json)."""
import hashlib
import os
from collections.abc import Callable, Sequence

import torch
from torch.utils.data import Dataset

from clipmoe.data.datasets import decode_image, to_tensor
from clipmoe.fileio import read_text


class ImageFiles(Dataset):
    """Images read from files (or held as encoded bytes), items (image, index); a bad image raises, naming it
    (evaluation must see every image). preprocess: PIL -> tensor; None: float [3, H, W] in [0, 1]."""

    def __init__(self, sources: Sequence[str | bytes], preprocess: Callable | None = None,
                 names: Sequence[str] | None = None):
        self.sources, self.preprocess = list(sources), preprocess
        self.names = list(names) if names is not None else [s if isinstance(s, str) else f"image {i}"
                                                            for i, s in enumerate(self.sources)]

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int):
        from clipmoe.data.datasets import BadSample
        try:
            image = decode_image(self.sources[index], self.names[index])
        except BadSample as e:
            raise (FileNotFoundError if e.missing else ValueError)(str(e)) from e
        return (to_tensor(image) if self.preprocess is None else self.preprocess(image)), index


def _check_images_exist(json_path, image_root, paths) -> None:
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{json_path}: {len(missing)} of {len(paths)} images not found under {image_root}, "
                                f"e.g. {missing[0]}")


class _CaptionedImages(ImageFiles):
    """Images of an annotation file with their captions: `paths`, `captions`, `text_to_image` [N_txt]."""

    def _set_gallery(self, json_path, image_root, paths, captions, text_to_image, preprocess, check_files):
        if check_files:
            _check_images_exist(json_path, image_root, paths)
        ImageFiles.__init__(self, paths, preprocess)
        self.paths, self.captions = paths, captions
        self.text_to_image = torch.tensor(text_to_image, dtype=torch.long)


class KarpathyRetrieval(_CaptionedImages):
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

    def __init__(self, json_path, image_root, split: str | Sequence[str] | None = "test",
                 preprocess: Callable | None = None, *, max_captions: int | None = None,
                 check_files: bool = True):
        import json

        json_path = os.fspath(json_path)
        if not os.path.isfile(json_path):
            raise FileNotFoundError(f"{json_path}: Karpathy JSON file not found")
        if not os.path.isdir(image_root):
            raise FileNotFoundError(f"{image_root}: image root folder not found")
        try:
            document = json.loads(read_text(json_path, ""))
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
        self._set_gallery(json_path, image_root, paths, captions, text_to_image, preprocess, check_files)


COCO_MAX_CAPTIONS = 5  # the CLIP-MoE and Long-CLIP COCO scripts keep each image's first 5 captions


class CocoCaptions(_CaptionedImages):
    """The images of a COCO caption annotation file (e.g. captions_val2017.json) with their captions, in the order
    torchvision's CocoCaptions gives them, which the CLIP-MoE and Long-CLIP COCO evaluations use: images by increasing
    id, each image's captions in file order, the first `max_captions` kept (default 5; None keeps all).

    The file: {"images": [{"id": 139, "file_name": "000000000139.jpg", ...}, ...],
    "annotations": [{"image_id": 139, "id": ..., "caption": "A woman ..."}, ...]}; the image path is
    image_root/file_name. Items: (image, index). Attributes as KarpathyRetrieval's (paths, captions,
    text_to_image, num_without_captions).
    """

    def __init__(self, json_path, image_root, preprocess: Callable | None = None, *,
                 max_captions: int | None = COCO_MAX_CAPTIONS, check_files: bool = True, document=None):
        import json

        json_path = os.fspath(json_path)
        if document is None:
            with open(json_path, encoding="utf-8") as f:
                document = json.load(f)
        images, annotations = document.get("images"), document.get("annotations")
        if not isinstance(images, list) or not isinstance(annotations, list):
            raise ValueError(f"{json_path}: expected a COCO captions file with \"images\" and \"annotations\" lists")
        by_image: dict = {}
        for i, ann in enumerate(annotations):
            if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
                raise ValueError(f"{json_path}: annotations[{i}] has no \"image_id\" and \"caption\"")
            if ann["caption"].strip():
                by_image.setdefault(ann["image_id"], []).append(ann["caption"].strip())
        files = {}
        for i, entry in enumerate(images):
            if not isinstance(entry, dict) or "id" not in entry or "file_name" not in entry:
                raise ValueError(f"{json_path}: images[{i}] has no \"id\" and \"file_name\"")
            files[entry["id"]] = entry["file_name"]
        paths, captions, text_to_image = [], [], []
        self.num_without_captions = 0
        for image_id in sorted(files):
            texts = by_image.get(image_id, [])[:max_captions]
            if not texts:
                self.num_without_captions += 1
                continue
            text_to_image.extend([len(paths)] * len(texts))
            captions.extend(texts)
            paths.append(os.path.join(os.fspath(image_root), files[image_id]))
        if not paths:
            raise ValueError(f"{json_path}: no image with a caption")
        self._set_gallery(json_path, image_root, paths, captions, text_to_image, preprocess, check_files)


def retrieval_json(json_path, image_root, *, split="test", preprocess=None, max_captions=None):
    """A COCO caption annotation file (it has "annotations": CocoCaptions, max_captions default 5) or a
    Karpathy-style JSON (KarpathyRetrieval of `split`, all captions by default)."""
    import json

    json_path = os.fspath(json_path)
    if not os.path.isfile(json_path):
        raise FileNotFoundError(f"{json_path}: JSON file not found")
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"{image_root}: image root folder not found")
    with open(json_path, encoding="utf-8") as f:
        try:
            document = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{json_path}: not valid JSON ({exc})") from exc
    if isinstance(document, dict) and "annotations" in document:
        return CocoCaptions(json_path, image_root, preprocess,
                            max_captions=COCO_MAX_CAPTIONS if max_captions is None else max_captions,
                            document=document)
    return KarpathyRetrieval(json_path, image_root, split=split, preprocess=preprocess, max_captions=max_captions)


def group_captions(keys: Sequence, captions: Sequence[str]):
    """Rows (image key, caption) -> (unique keys in first-seen order, text_to_image [N_txt] long)."""
    first: dict = {}
    text_to_image = [first.setdefault(k, len(first)) for k in keys]
    return list(first), torch.tensor(text_to_image, dtype=torch.long)


def dedup_images(images: Sequence[bytes], captions: Sequence[str]):
    """Encoded images with one caption each (webdataset samples) -> (unique images, text_to_image): byte-identical
    images (a shard written one sample per caption) become one gallery image with several captions."""
    keys = [hashlib.sha1(data).hexdigest() for data in images]
    unique_keys, text_to_image = group_captions(keys, captions)
    by_key = dict(zip(keys, images, strict=True))
    return [by_key[k] for k in unique_keys], text_to_image

