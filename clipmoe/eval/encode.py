"""Bulk embedding of a dataset (`clipmoe encode`): images and captions in, embedding shards and metadata out.

Inputs (`read_items`): a CSV/TSV of image paths and/or captions (open_clip's --csv-* columns), local webdataset
tar shards (image and .txt members per key; indexed once, then read by offset, so DataLoader workers read in
parallel and the order is fixed), a folder of images (recursive, sorted) or a captions file (one per line).

Output folder:
    encode.json                         the settings of the run (a resumed run must match them) and, at the end, totals
    img_emb/img_emb_{k:05d}.npy         [n_k, D] image embeddings of shard k (float16 by default, L2-normalised
    text_emb/text_emb_{k:05d}.npy         unless normalize=False); or emb/emb_{k:05d}.safetensors ("image", "text")
    metadata/metadata_{k:05d}.csv       one row per embedding row, same order: index (the item's position in the
                                        input), source, caption; .parquet with metadata_format="parquet" (pyarrow)
    metadata/skipped_{k:05d}.csv        the items of shard k that were skipped (unreadable image, empty caption)
Shard k holds items [k * shard_size, (k + 1) * shard_size) minus the skipped ones. Every file is written atomically
and the metadata last, so a shard is done when its metadata file exists: a killed run, started again with the same
arguments, encodes only the missing shards and ends with the same files as one uninterrupted run (batches never
cross a shard boundary, so each shard's batches are the same in both).
"""
import csv
import json
import math
import os
import tarfile
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from clipmoe.data.datasets import IMAGE_EXTS, BadSample, decode_image
from clipmoe.fileio import atomic_write
from clipmoe.inference import encoders

RUN_FILE = "encode.json"
DTYPES = {"float16": np.float16, "float32": np.float32}


# ---------------------------------------------------------------------------------------------------------- inputs
def _csv_items(path: Path, img_key: str, caption_key: str, sep: str):
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter=sep)
        header = [h.strip() for h in next(reader, [])]
        img_col = header.index(img_key) if img_key in header else None
        cap_col = header.index(caption_key) if caption_key in header else None
        if img_col is None and cap_col is None:
            hint = f"; the separator {sep!r} may be wrong" if len(header) <= 1 else ""
            raise ValueError(f"{path}: neither the image column {img_key!r} (--csv-img-key) nor the caption column "
                             f"{caption_key!r} (--csv-caption-key); the header has columns {header}{hint}")
        items = []
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            image, caption = (row[col].strip() if col is not None and col < len(row) else None
                              for col in (img_col, cap_col))
            image = os.path.join(path.parent, os.path.expanduser(image)) if image else ("" if img_col is not None
                                                                                          else None)
            items.append({"source": image or f"{path}:{line}", "image": image, "caption": caption})
    return items


def _tar_items(url: str):
    """One item per webdataset key of a local tar: the image member as (tar, offset, size), the caption text."""
    groups = {}
    with tarfile.open(url) as tar:
        for member in tar:
            if not member.isfile():
                continue
            folder, _, name = member.name.rpartition("/")
            stem, _, ext = name.partition(".")
            groups.setdefault(f"{folder}/{stem}" if folder else stem, {})[ext.lower()] = member
        items = []
        for key, members in groups.items():
            image = next((members[e] for e in IMAGE_EXTS if e in members), None)
            caption = members.get("txt")
            caption = tar.extractfile(caption).read().decode("utf-8", errors="replace").strip() if caption else None
            items.append({"source": f"{url}:{key}", "caption": caption,
                          "image": (url, image.offset_data, image.size) if image is not None else ""})
    return items


def read_items(spec: str, *, img_key: str = "filepath", caption_key: str = "title", sep: str = "\t"):
    """The items of `spec` in their fixed order: dicts with "source" (where it comes from), "image" (a path, a
    (tar, offset, size) member, "" when the item should have one but has not, None for text-only inputs) and
    "caption" (str, or None for image-only inputs)."""
    path = Path(spec)
    if ".tar" in spec and not path.is_dir():
        from clipmoe.data.webdataset import expand_urls
        urls = expand_urls(spec)
        remote = [u for u in urls if "://" in u or u.startswith("pipe:")]
        if remote:
            raise ValueError(f"--data {spec}: encode reads local tar shards (by offset); got {remote[0]}")
        missing = [u for u in urls if not os.path.isfile(u)]
        if missing:
            raise FileNotFoundError(f"--data {spec}: {len(missing)} of {len(urls)} shards not found, e.g. {missing[0]}")
        items = [item for url in urls for item in _tar_items(url)]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTS)
        items = [{"source": str(p), "image": str(p), "caption": None} for p in files]
    elif not path.is_file():
        raise FileNotFoundError(f"--data {spec}: no such file or folder (expected a CSV/TSV, .tar shards, an image "
                                f"folder or a captions .txt)")
    elif path.suffix.lower() == ".txt":
        lines = path.read_text(encoding="utf-8").splitlines()
        items = [{"source": f"{path}:{i}", "image": None, "caption": line.strip()}
                 for i, line in enumerate(lines, start=1) if line.strip()]
    else:
        items = _csv_items(path, img_key, caption_key, sep)
    if not items:
        raise ValueError(f"--data {spec}: no items")
    return items


class EncodeItems(Dataset):
    """Items of `read_items` -> (index, image tensor or None, tokens or None, reason it is skipped or None)."""

    def __init__(self, items, preprocess, tokenizer, images: bool, texts: bool):
        self.items, self.preprocess, self.tokenizer = items, preprocess, tokenizer
        self.images, self.texts = images, texts

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        item = self.items[index]
        image = tokens = None
        if self.texts:
            if not item["caption"]:
                return index, None, None, "empty caption"
            tokens = self.tokenizer([item["caption"]])[0]
        if self.images:
            source = item["image"]
            try:
                if not source:
                    raise BadSample(item["source"], "no image")
                if isinstance(source, tuple):
                    url, offset, size = source
                    with open(url, "rb") as f:
                        f.seek(offset)
                        source = f.read(size)
                image = self.preprocess(decode_image(source, item["source"]))
            except BadSample as e:
                return index, None, None, e.reason
        return index, image, tokens, None


def _collate(batch):
    good = [b for b in batch if b[3] is None]
    stack = lambda j: torch.stack([b[j] for b in good]) if good and good[0][j] is not None else None  # noqa: E731
    return [b[0] for b in good], stack(1), stack(2), [(b[0], b[3]) for b in batch if b[3] is not None]


# ---------------------------------------------------------------------------------------------------------- output
def shard_files(out: Path, k: int, fmt: str, metadata_format: str) -> dict:
    files = {"metadata": out / "metadata" / f"metadata_{k:05d}.{metadata_format}",
             "skipped": out / "metadata" / f"skipped_{k:05d}.csv"}
    if fmt == "npy":
        files.update(image=out / "img_emb" / f"img_emb_{k:05d}.npy", text=out / "text_emb" / f"text_emb_{k:05d}.npy")
    else:
        files["emb"] = out / "emb" / f"emb_{k:05d}.safetensors"
    return files


def _write_csv(path, header, rows):
    def write(tmp):
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)
    atomic_write(path, write)


def _save_npy(path, array):
    with open(path, "wb") as f:  # a file object: np.save would append ".npy" to the temporary name
        np.save(f, array)


def _write_shard(files: dict, arrays: dict, metadata_rows, skipped_rows, fmt: str, metadata_format: str):
    if fmt == "npy":
        for tower, array in arrays.items():
            atomic_write(files[tower], lambda tmp, a=array: _save_npy(tmp, a))
    else:
        from safetensors.numpy import save_file
        atomic_write(files["emb"], lambda tmp: save_file(arrays, str(tmp)))
    _write_csv(files["skipped"], ["index", "source", "reason"], skipped_rows)
    header = ["index", "source", "caption"]
    if metadata_format == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        table = pa.Table.from_pydict({h: [r[i] for r in metadata_rows] for i, h in enumerate(header)})
        atomic_write(files["metadata"], lambda tmp: pq.write_table(table, str(tmp)))
    else:
        _write_csv(files["metadata"], header, metadata_rows)


def _check_run(out: Path, settings: dict):
    run = out / RUN_FILE
    if run.is_file():
        previous = json.loads(run.read_text()).get("settings", {})
        differ = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
        if differ:
            raise ValueError(f"--output {out} holds a run with other settings ({', '.join(differ)}: "
                             f"{[previous.get(k) for k in differ]} there, {[settings.get(k) for k in differ]} now); "
                             f"use another folder, or the same arguments to resume it")
    else:
        atomic_write(run, lambda tmp: Path(tmp).write_text(json.dumps({"settings": settings}, indent=2) + "\n"))


# ---------------------------------------------------------------------------------------------------------- encode
def encode_dataset(model, items, preprocess, tokenizer, out, *, settings: dict, shard_size: int = 10000,
                   batch_size: int = 256, num_workers: int = 0, normalize: bool = True, dtype: str = "float16",
                   fmt: str = "npy", metadata_format: str = "csv", device="cpu", autocast: bool = True,
                   compile: bool = False, progress: bool = False, amp_dtype: torch.dtype = torch.float16) -> dict:
    """Encode `items` (from read_items) into shards under `out` (module docstring), skipping shards already done;
    returns the totals written to encode.json. `settings` describes the model and data (kept in encode.json; a
    resumed run must give the same); autocast (to amp_dtype) applies on CUDA only."""
    if dtype not in DTYPES or fmt not in ("npy", "safetensors") or metadata_format not in ("csv", "parquet"):
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, fmt npy or safetensors, metadata_format csv or "
                         f"parquet; got {dtype!r}, {fmt!r}, {metadata_format!r}")
    if metadata_format == "parquet":
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError as exc:
            raise ValueError("--metadata parquet needs pyarrow (pip install pyarrow); or use --metadata csv") from exc
    out, device = Path(out), torch.device(device)
    encode_image, encode_text = encoders(model)
    images = any(item["image"] is not None for item in items)
    texts = any(item["caption"] is not None for item in items)
    for wanted, fn, what in ((images, encode_image, "images"), (texts, encode_text, "captions")):
        if wanted and fn is None:
            raise ValueError(f"the data has {what} but {type(model).__name__} cannot encode them")
    if compile:
        encode_image = torch.compile(encode_image) if encode_image else None
        encode_text = torch.compile(encode_text) if encode_text else None
    settings = {**settings, "num_items": len(items), "shard_size": shard_size, "batch_size": batch_size,
                "normalize": normalize, "dtype": dtype, "format": fmt, "metadata": metadata_format,
                "towers": [t for t, on in (("image", images), ("text", texts)) if on]}
    _check_run(out, settings)
    num_shards = math.ceil(len(items) / shard_size)
    pending = [k for k in range(num_shards) if not shard_files(out, k, fmt, metadata_format)["metadata"].exists()]
    batches = [list(range(start, min(start + batch_size, (k + 1) * shard_size, len(items))))
               for k in pending for start in range(k * shard_size, min((k + 1) * shard_size, len(items)), batch_size)]
    loader = DataLoader(EncodeItems(items, preprocess, tokenizer, images, texts), batch_sampler=batches,
                        num_workers=num_workers, collate_fn=_collate, pin_memory=device.type == "cuda")
    param = next(model.parameters())
    amp = torch.autocast("cuda", dtype=amp_dtype) if autocast and device.type == "cuda" else nullcontext()

    def run(fn, x):
        with amp:
            y = fn(x.to(device, non_blocking=True))
        y = F.normalize(y.float(), dim=-1) if normalize else y.float()
        return y.cpu().numpy().astype(DTYPES[dtype])

    from tqdm import tqdm
    bar = tqdm(total=sum(map(len, batches)), unit="item", desc="encode", disable=not progress, smoothing=0.1)
    shard, parts = None, None
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for indices, image_batch, token_batch, skipped in loader:
                first = (indices or [i for i, _ in skipped])[0]
                if shard != first // shard_size:
                    shard, parts = first // shard_size, {"image": [], "text": [], "rows": [], "skipped": []}
                if indices:
                    if images:
                        parts["image"].append(run(encode_image, image_batch.to(param.dtype)))
                    if texts:
                        parts["text"].append(run(encode_text, token_batch))
                parts["rows"] += [[i, items[i]["source"], items[i]["caption"] or ""] for i in indices]
                parts["skipped"] += [[i, items[i]["source"], reason] for i, reason in skipped]
                bar.update(len(indices) + len(skipped))
                end = min((shard + 1) * shard_size, len(items))
                if max(indices + [i for i, _ in skipped]) == end - 1:  # the shard's last batch
                    arrays = {t: (np.concatenate(parts[t]) if parts[t] else np.zeros((0, 0), DTYPES[dtype]))
                              for t, on in (("image", images), ("text", texts)) if on}
                    _write_shard(shard_files(out, shard, fmt, metadata_format), arrays, parts["rows"],
                                 parts["skipped"], fmt, metadata_format)
    finally:
        bar.close()
        model.train(was_training)
    totals = {"num_shards": num_shards, "num_encoded_now": sum(map(len, batches)), "num_skipped": 0}
    for k in range(num_shards):
        with open(shard_files(out, k, fmt, metadata_format)["skipped"], newline="", encoding="utf-8") as f:
            totals["num_skipped"] += sum(1 for _ in f) - 1
    totals["num_embedded"] = len(items) - totals["num_skipped"]
    document = {"settings": settings, "totals": totals}
    atomic_write(out / RUN_FILE, lambda tmp: Path(tmp).write_text(json.dumps(document, indent=2) + "\n"))
    return totals


def model_transforms(model, model_name=None):
    """(eval preprocess, tokenizer) of an open_clip model (or of the open_clip name `model_name`) or a transformers
    CLIP model (OpenAI CLIP's resize, centre crop and normalisation at its image size; CLIP's BPE at its context)."""
    from clipmoe.data.datasets import make_transforms_and_tokenizer
    config = getattr(model, "config", None)
    if config is None or model_name:
        from clipmoe.models import register_model_configs
        register_model_configs()
        return make_transforms_and_tokenizer(model_name or model)
    import open_clip
    vision = getattr(config, "vision_config", config)
    text = getattr(config, "text_config", config)
    preprocess = open_clip.image_transform(vision.image_size, is_train=False) if hasattr(vision, "image_size") \
        else None
    tokenizer = open_clip.SimpleTokenizer(context_length=text.max_position_embeddings) \
        if hasattr(text, "max_position_embeddings") else None
    return preprocess, tokenizer


def read_shards(out, fmt: str = "npy", metadata_format: str = "csv"):
    """{"image": array, "text": array, "metadata": list of rows} of a finished run, shards concatenated in order."""
    out = Path(out)
    settings = json.loads((out / RUN_FILE).read_text())["settings"]
    num_shards = math.ceil(settings["num_items"] / settings["shard_size"])
    result = {"image": [], "text": [], "metadata": []}
    for k in range(num_shards):
        files = shard_files(out, k, fmt, metadata_format)
        if fmt == "npy":
            for tower in ("image", "text"):
                if files[tower].exists():
                    result[tower].append(np.load(files[tower]))
        else:
            from safetensors.numpy import load_file
            for tower, array in load_file(str(files["emb"])).items():
                result[tower].append(array)
        with open(files["metadata"], newline="", encoding="utf-8") as f:
            result["metadata"] += list(csv.reader(f))[1:]
    return {k: (np.concatenate(v) if k != "metadata" and v else v) for k, v in result.items()}

