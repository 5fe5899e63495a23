"""Random access by sample index into local webdataset tar shards, from a small per-shard offset index.

MCL needs a map-style dataset (the cluster sampler picks indices), but a webdataset is a stream. Instead of reading
the shards into memory, `ShardCaptionDataset` reads each shard's tar headers once, records where every sample's
image and caption members lie (byte offset and size), and afterwards reads one sample with two positioned reads and
decodes its image on access. Memory per process: four numbers per sample (24 bytes), held in numpy arrays.

Index files: one per shard, `<shard>.idx.npz` beside it (numpy's npz, loaded with allow_pickle=False), holding the
offsets, the sample keys (read only to name a bad sample) and a JSON header with the shard's size and mtime, the
member extensions it was built for and the bad samples it found. An index whose shard changed (size or mtime), or
that was built for other extensions or by another format version, is rebuilt. Where the shard's folder is not
writable the index goes to a cache folder: `index_dir` if given (then it is used for reading and writing), else
$CLIPMOE_CACHE/shard-index (default ~/.cache/clipmoe/shard-index), named by a hash of the shard's real path.

Building: under torch.distributed the shards that lack a valid index on any rank are split over the ranks (shard k
of them to rank k mod W), each rank indexes its share, the results are all-gathered (every rank ends with the whole
index, also when nodes have their own disks), and local rank 0 of each node writes the files. This is a collective:
every rank must construct the dataset with the same shards.

Samples are grouped as webdataset groups them (consecutive members sharing the name up to the first dot of the
basename, extensions lower-cased); index i is the i-th good sample in shard order, as `WebDatasetCaptions` streams
them. Bad input:
- found while indexing (and counted in `num_bad_indexed`): a sample without an image (first of `image_exts`
  present) or without a caption member, an empty caption, a repeated member name; a shard that is not a tar file,
  ends inside a member (a truncated download: the samples before the cut are kept, the cut one is counted bad), or
  lacks the tar end-of-archive marker. More than max_bad_fraction of the samples bad, or more than
  max_bad_fraction of the shards damaged, raises ValueError naming a shard and an example.
- found on access: an image that does not decode follows `on_error`, as for CSV data (clipmoe.data.datasets).
"""
import hashlib
import json
import logging
import os
import re
import tarfile
from collections.abc import Sequence

import numpy as np
import torch.distributed as dist

from clipmoe.data.datasets import (
    DEFAULT_MAX_BAD_FRACTION,
    IMAGE_EXTS,
    BadSample,
    MapCaptionDataset,
    Preprocess,
    Tokenizer,
    decode_image,
)
from clipmoe.data.webdataset import expand_urls
from clipmoe.fileio import atomic_write
from clipmoe.runtime import rank_world

logger = logging.getLogger(__name__)

INDEX_VERSION = 1
INDEX_SUFFIX = ".idx.npz"
OFFSET_FIELDS = ("image_offset", "image_size", "caption_offset", "caption_size")
_META_MEMBER = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members (__key__ ...), not sample members
_TAR_BLOCK = 512


def default_cache_dir() -> str:
    root = os.environ.get("CLIPMOE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "clipmoe")
    return os.path.join(root, "shard-index")


def _local_path(url: str) -> str:
    if url.startswith("file://"):
        return url[len("file://"):]
    if "://" in url or url.startswith("pipe:"):
        raise ValueError(f"{url}: indexed access needs local shard files (download the shards first); streaming "
                         f"remote shards works with WebDatasetCaptions")
    return url


def _split_name(name: str):
    """(sample key, lower-cased extension) as webdataset groups tar members, or None for a non-sample member."""
    from webdataset.tariterators import base_plus_ext

    if _META_MEMBER.search(name):
        return None
    key, ext = base_plus_ext(name)
    return None if key is None else (key, ext.lower())


# --------------------------------------------------------------------------------------------------------- indexing
def index_shard(path: str, image_exts: Sequence[str] = IMAGE_EXTS, caption_ext: str = "txt") -> dict:
    """Read one shard's tar headers (and caption members, to find empty ones): the offsets of its good samples.

    Returns {"image_offset", "image_size", "caption_offset", "caption_size": int64 [n], "keys": bytes [n],
    "meta": dict} with meta = shard size/mtime, extensions, num_seen, num_bad, bad_examples, damage ("" if the
    shard is whole)."""
    stat = os.stat(path)
    rows: list[tuple] = []
    keys: list[bytes] = []
    seen = bad = 0
    examples: list[str] = []
    damage = ""

    def reject(key, reason):
        nonlocal bad
        bad += 1
        if len(examples) < 3:
            examples.append(f"{path}:{key}: {reason}")

    def finish(key, members, duplicate):
        nonlocal seen
        if key is None:
            return
        seen += 1
        image = next((members[e] for e in image_exts if e in members), None)
        caption = members.get(caption_ext)
        if duplicate:
            reject(key, f"member .{duplicate} appears twice")
        elif image is None or caption is None:
            need = f"image ({'/'.join(image_exts)})" if image is None else f".{caption_ext}"
            reject(key, f"no {need} member (has {sorted(members)})")
        elif caption[2]:
            reject(key, "empty caption")
        else:
            rows.append(image[:2] + caption[:2])
            keys.append(key.encode("utf-8", errors="replace"))

    key, members, duplicate = None, {}, ""
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                split = _split_name(member.name)
                end = member.offset_data + member.size
                if end > stat.st_size:  # a truncated download: this member, and its sample, are cut
                    damage = f"truncated: member {member.name} ends at byte {end}, the file has {stat.st_size}"
                    cut = split[0] if split else member.name
                    if cut != key:
                        finish(key, members, duplicate)
                    key = None
                    seen += 1
                    reject(cut, "cut off by the end of the file")
                    break
                if split is None:
                    continue
                if split[0] != key:
                    finish(key, members, duplicate)
                    key, members, duplicate = split[0], {}, ""
                if split[1] in members:
                    duplicate = split[1]
                empty = False
                if split[1] == caption_ext:
                    f.seek(member.offset_data)
                    empty = not f.read(member.size).decode("utf-8", errors="replace").strip()
                members[split[1]] = (member.offset_data, member.size, empty)
            else:
                f.seek(tar.offset)
                if f.read(_TAR_BLOCK) != bytes(_TAR_BLOCK):
                    damage = (f"no end-of-archive marker at byte {tar.offset} (the file is truncated or a header "
                              f"there is damaged; what follows is lost)")
    except (tarfile.TarError, OSError) as e:
        damage = damage or f"not a readable tar file ({type(e).__name__}: {e})"
    finish(key, members, duplicate)
    table = np.array(rows, dtype=np.int64).reshape(-1, 4)
    out = {name: table[:, j].copy() for j, name in enumerate(OFFSET_FIELDS)}
    out["keys"] = np.array(keys, dtype=bytes) if keys else np.zeros(0, dtype="S1")
    out["meta"] = {"version": INDEX_VERSION, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                   "image_exts": list(image_exts), "caption_ext": caption_ext, "num_seen": seen, "num_bad": bad,
                   "bad_examples": examples, "damage": damage}
    return out


def _index_paths(shard: str, index_dir: str | None) -> list[str]:
    """Where the index of `shard` may live, in lookup order: index_dir only when given, else beside the shard and
    then the default cache folder."""
    real = os.path.realpath(shard)
    cached = f"{hashlib.sha256(real.encode()).hexdigest()[:16]}-{os.path.basename(shard)}{INDEX_SUFFIX}"
    if index_dir is not None:
        return [os.path.join(os.fspath(index_dir), cached)]
    return [shard + INDEX_SUFFIX, os.path.join(default_cache_dir(), cached)]


def _wanted_meta(shard: str, image_exts, caption_ext) -> dict:
    stat = os.stat(shard)
    return {"version": INDEX_VERSION, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "image_exts": list(image_exts), "caption_ext": caption_ext}


def load_index(shard: str, image_exts=IMAGE_EXTS, caption_ext: str = "txt", index_dir=None) -> dict | None:
    """The cached index of `shard` without its keys, or None when there is none that matches the shard as it is now
    (an unreadable or stale index file is treated as absent: it is rebuilt)."""
    wanted = _wanted_meta(shard, image_exts, caption_ext)
    for path in _index_paths(shard, index_dir):
        if not os.path.isfile(path):
            continue
        try:
            with np.load(path, allow_pickle=False) as npz:
                meta = json.loads(str(npz["meta"]))
                if any(meta.get(k) != v for k, v in wanted.items()):
                    logger.info("%s: stale shard index (the shard or the member extensions changed)", path)
                    continue
                out = {name: npz[name] for name in OFFSET_FIELDS}
        except (OSError, ValueError, KeyError) as e:
            logger.warning("%s: unreadable shard index, rebuilding it: %s", path, e)
            continue
        out["meta"], out["path"] = meta, path
        return out
    return None


def _savez(path, arrays: dict) -> None:
    with open(path, "wb") as f:  # a file object: np.savez would append ".npz" to a temporary name
        np.savez(f, **arrays)


def save_index(shard: str, index: dict, index_dir=None) -> str:
    """Write `index` (from index_shard) beside the shard, or to the cache folder when that fails; returns the path."""
    arrays = {name: index[name] for name in (*OFFSET_FIELDS, "keys")}
    arrays["meta"] = np.array(json.dumps(index["meta"]))
    candidates = _index_paths(shard, index_dir)
    for i, path in enumerate(candidates):
        try:
            atomic_write(path, lambda tmp: _savez(tmp, arrays))
            return path
        except OSError as e:
            if i == len(candidates) - 1:
                raise OSError(f"{shard}: cannot write its index to {path}: {e}; pass another index_dir") from e
            logger.info("%s: cannot write the index beside the shard (%s); using %s", shard, e, candidates[i + 1])
    raise AssertionError("unreachable")


def build_indexes(shards: Sequence[str], image_exts=IMAGE_EXTS, caption_ext: str = "txt",
                  index_dir=None) -> list[dict]:
    """The index of every shard, from the cache where valid, else built (over the ranks when torch.distributed is
    initialised: a collective) and cached. Returns one dict per shard (OFFSET_FIELDS arrays and "meta")."""
    rank, world = rank_world()
    indexes: list[dict | None] = [load_index(s, image_exts, caption_ext, index_dir) for s in shards]
    missing = [k for k, index in enumerate(indexes) if index is None]
    if world > 1:  # build what any rank lacks (nodes may have their own disks), each rank a share
        everyone: list[list[int] | None] = [None] * world
        dist.all_gather_object(everyone, missing)
        missing = sorted(set().union(*everyone))
    built = {k: index_shard(shards[k], image_exts, caption_ext) for k in missing[rank::world]}
    if world > 1:
        parts: list[dict[int, dict] | None] = [None] * world
        dist.all_gather_object(parts, built)
        built = {k: v for part in parts for k, v in part.items()}
    if missing and int(os.environ.get("LOCAL_RANK", rank)) == 0:  # one writer per node: nodes may not share disks
        for k in missing:
            save_index(shards[k], built[k], index_dir)
    if missing and world > 1:
        dist.barrier()  # the others wait for the files (read later to name bad samples)
    for k in missing:
        indexes[k] = {**{name: built[k][name] for name in OFFSET_FIELDS}, "meta": built[k]["meta"]}
    if missing and rank == 0:
        logger.info("indexed %d of %d shards (%d samples)", len(missing), len(shards),
                    sum(len(built[k]["image_offset"]) for k in missing))
    return indexes


# ---------------------------------------------------------------------------------------------------------- dataset
class ShardCaptionDataset(MapCaptionDataset):
    """Map-style dataset over local webdataset tar shards by sample index (module docstring: index, bad input).

    Args:
        urls: shard spec as for WebDatasetCaptions (brace pattern, "::"-separated patterns, a list); local files.
        preprocess, tokenizer, with_index, on_error, max_bad_fraction: as CsvCaptionDataset (clipmoe.data.datasets).
        index_dir: folder for the index files (default: beside the shards, or the cache folder when that fails).
        image_exts, caption_ext: member extensions of the image (first present wins) and of the caption.
        max_samples: keep only the first this many samples.

    Attributes: `urls`, `num_bad_indexed` (bad samples found while indexing), `damaged_shards` ({shard: what is
    wrong}), `index_bytes` (memory of the offset arrays), `num_skipped`/`bad_samples` (found on access).
    """

    def __init__(self, urls: str | Sequence[str], preprocess: Preprocess = None, tokenizer: Tokenizer = None, *,
                 index_dir: str | os.PathLike | None = None, with_index: bool = False,
                 on_error: str = "skip", max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
                 image_exts: Sequence[str] = IMAGE_EXTS, caption_ext: str = "txt",
                 max_samples: int | None = None):
        self._init_common(preprocess, tokenizer, with_index, on_error, max_bad_fraction)
        self.urls = expand_urls(urls)
        if not self.urls:
            raise ValueError(f"no shards in {urls!r}")
        paths = [_local_path(u) for u in self.urls]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} of {len(paths)} shard file(s) not found: {', '.join(missing[:5])}")
        self.paths = paths
        self.source = paths[0] if len(paths) == 1 else f"{paths[0]} (+{len(paths) - 1} shards)"
        self.image_exts, self.caption_ext = tuple(e.lower() for e in image_exts), caption_ext.lower()
        self.index_dir = None if index_dir is None else os.fspath(index_dir)
        indexes = build_indexes(paths, self.image_exts, self.caption_ext, self.index_dir)

        seen = sum(ix["meta"]["num_seen"] for ix in indexes)
        self.num_bad_indexed = sum(ix["meta"]["num_bad"] for ix in indexes)
        self.damaged_shards = {p: ix["meta"]["damage"] for p, ix in zip(paths, indexes, strict=True)
                               if ix["meta"]["damage"]}
        examples = [e for ix in indexes for e in ix["meta"]["bad_examples"]]
        for path, damage in self.damaged_shards.items():
            logger.warning("%s: damaged shard: %s", path, damage)
        if self.num_bad_indexed:
            logger.warning("%s: %d of %d samples are bad and skipped, e.g. %s", self.source, self.num_bad_indexed,
                           seen, examples[0])
        if len(self.damaged_shards) > self.max_bad_fraction * len(paths):
            path, damage = next(iter(self.damaged_shards.items()))
            raise ValueError(f"{path}: {damage}; {len(self.damaged_shards)} of {len(paths)} shards are damaged, more "
                             f"than max_bad_fraction={self.max_bad_fraction} (re-fetch them or leave them out)")
        if self.num_bad_indexed > self.max_bad_fraction * seen:
            raise ValueError(f"{self.source}: {self.num_bad_indexed} of {seen} samples are bad, more than "
                             f"max_bad_fraction={self.max_bad_fraction}; e.g. {examples[0]}")

        counts = np.array([len(ix["image_offset"]) for ix in indexes], dtype=np.int64)
        self._shard_start = np.concatenate([[0], np.cumsum(counts)])
        if self._shard_start[-1] == 0:
            raise ValueError(f"{self.source}: no readable image-caption samples ({self.num_bad_indexed} bad of "
                             f"{seen}; {len(self.damaged_shards)} damaged shard(s))")
        n = int(self._shard_start[-1]) if max_samples is None else min(int(max_samples), int(self._shard_start[-1]))
        # Offsets as int64, sizes as int32 (a member over 2 GiB is refused): 24 bytes per sample.
        self._image_offset = np.concatenate([ix["image_offset"] for ix in indexes])[:n]
        self._caption_offset = np.concatenate([ix["caption_offset"] for ix in indexes])[:n]
        sizes = [np.concatenate([ix[f] for ix in indexes])[:n] for f in ("image_size", "caption_size")]
        if n and max(int(s.max()) for s in sizes) >= 2 ** 31:
            raise ValueError(f"{self.source}: a member of 2 GiB or more; not an image-caption shard")
        self._image_size, self._caption_size = (s.astype(np.int32) for s in sizes)
        self._length = n

    def __len__(self) -> int:
        return self._length

    @property
    def index_bytes(self) -> int:
        return sum(a.nbytes for a in (self._image_offset, self._image_size, self._caption_offset, self._caption_size,
                                      self._shard_start))

    def shard_of(self, index: int):
        """(shard path, position of the sample in that shard's index)."""
        k = int(np.searchsorted(self._shard_start, index, side="right")) - 1
        return self.paths[k], index - int(self._shard_start[k])

    def key(self, index: int) -> str:
        """The webdataset key of sample `index` (read from the index file: for messages)."""
        path, pos = self.shard_of(index)
        stored = load_index(path, self.image_exts, self.caption_ext, self.index_dir)
        if stored is not None:
            with np.load(stored["path"], allow_pickle=False) as npz:
                return npz["keys"][pos].decode("utf-8", errors="replace")
        return f"#{pos}"

    def _load(self, index: int):
        path, _ = self.shard_of(index)
        with open(path, "rb") as f:
            f.seek(int(self._image_offset[index]))
            image = f.read(int(self._image_size[index]))
            f.seek(int(self._caption_offset[index]))
            caption = f.read(int(self._caption_size[index])).decode("utf-8", errors="replace").strip()
        try:
            return decode_image(image, path), caption
        except BadSample as e:
            raise BadSample(f"{path}:{self.key(index)}", e.reason) from e
