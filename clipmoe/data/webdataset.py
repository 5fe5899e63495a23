"""webdataset tar shards of image-caption pairs (open_clip's format); see clipmoe.data.datasets for the
sample contract and the bad-input rules."""
import csv
import logging
import os
from collections.abc import Sequence
from typing import NamedTuple

from torch.utils.data import IterableDataset, get_worker_info

from clipmoe.data.datasets import (
    DEFAULT_MAX_BAD_FRACTION,
    IMAGE_EXTS,
    BadSample,
    CsvCaptionDataset,
    InMemoryCaptionDataset,
    Preprocess,
    SharedCounter,
    Tokenizer,
    check_fraction,
    decode_image,
    to_tensor,
    tokenize,
)
from clipmoe.runtime import rank_world

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------- webdataset
def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Shard spec -> list of shards: brace patterns ("d/{000..009}.tar") and "::"-separated lists are expanded."""
    import braceexpand

    if isinstance(urls, (str, os.PathLike)):
        urls = os.fspath(urls).split("::")
    out: list[str] = []
    for url in urls:
        out.extend(braceexpand.braceexpand(os.fspath(url)))
    return out


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:") or url.startswith("file://")


class ShardEnd(NamedTuple):
    """Marks the end of a shard in the raw sample stream; error: what stopped reading it early, or None."""
    url: str
    error: Exception | None


class WebDatasetCaptions(IterableDataset):
    """Iterable dataset over webdataset tar shards of (image, caption) samples, open_clip's format.

    Args:
        urls: shard spec: brace pattern, "::"-separated patterns, or a list; local paths, file://, or anything
            webdataset's gopen opens (http(s)://, pipe:...). Local shards must exist at construction.
        preprocess, tokenizer: as CsvCaptionDataset.
        num_samples: the number of samples, if known: then `len(dataset)` returns it (a nominal length, as
            open_clip's --train-num-samples; the stream itself is not cut or padded to it).
        shuffle_shards: shuffle the shard order each epoch (seed + epoch, identical on all ranks; call set_epoch).
        shuffle_buffer: > 0 shuffles samples within a buffer of this many (seed + epoch + consumer id).
        seed: base seed for the shuffles.
        max_bad_fraction: tolerated share of bad samples (checked at each shard end; module docstring).
        image_exts, caption_ext: member extensions that hold the image (first present wins) and the caption.

    Iteration order without shuffles: shards in the given order, samples in tar order. Shards are split with
    webdataset's `split_by_node` then `split_by_worker` (rank r, worker j of w reads shards[r::world][j::w]), so use
    at least world·workers shards (a consumer without a shard yields nothing; a warning says so); the shuffles are
    webdataset's `shuffle`, seeded. A shard that cannot be read to its end (truncated, not a tar) is logged and
    counted in `num_bad_shards`; its lost samples cannot be counted, so more than max_bad_fraction of the shards read
    so far damaged raises ValueError. Items carry no index: see `clipmoe.data.shards.ShardCaptionDataset` (random
    access by index from a small on-disk index, for large shard sets) and `to_indexed()` (small sets, in memory).
    """

    def __init__(self, urls: str | Sequence[str], preprocess: Preprocess = None, tokenizer: Tokenizer = None,
                 *, num_samples: int | None = None, shuffle_shards: bool = False, shuffle_buffer: int = 0,
                 seed: int = 0, max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
                 image_exts: Sequence[str] = IMAGE_EXTS, caption_ext: str = "txt"):
        self.urls = expand_urls(urls)
        if not self.urls:
            raise ValueError(f"no shards in {urls!r}")
        missing = [u for u in self.urls if _is_local(u) and not os.path.isfile(u.removeprefix("file://"))]
        if missing:
            raise FileNotFoundError(f"{len(missing)} of {len(self.urls)} shard file(s) not found: "
                                    f"{', '.join(missing[:5])}")
        self.preprocess, self.tokenizer = preprocess, tokenizer
        self.num_samples = num_samples
        self.shuffle_shards, self.shuffle_buffer, self.seed = shuffle_shards, shuffle_buffer, seed
        self.max_bad_fraction = check_fraction(max_bad_fraction)
        self.image_exts, self.caption_ext = tuple(e.lower() for e in image_exts), caption_ext.lower()
        self.epoch = 0
        self._skipped = SharedCounter()
        self.num_bad_shards = 0

    @property
    def num_skipped(self) -> int:
        """Bad samples skipped so far, summed over the DataLoader workers."""
        return self._skipped.value

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.num_samples is None:
            raise TypeError("WebDatasetCaptions has no length: pass num_samples, or use to_indexed()")
        return self.num_samples

    def _raw_samples(self, urls: Sequence[str]):
        """Yield (url, key, image bytes, caption) per sample; bad samples are yielded with image None and the reason
        in place of the caption; after each shard, ShardEnd(url, error) with the error that stopped reading it
        (None when the whole shard was read)."""
        import webdataset as wds

        for url in urls:
            errors: list[Exception] = []

            def handler(exc, errors=errors):
                errors.append(exc)
                return False  # stop this shard: an unreadable tar is not worth scanning further

            for raw in wds.tarfile_samples([{"url": url}], handler=handler):
                key = raw.get("__key__", "?")
                image = next((raw[e] for e in self.image_exts if e in raw), None)
                caption = raw.get(self.caption_ext)
                if image is None or caption is None:
                    have = sorted(k for k in raw if not k.startswith("__"))
                    need = f"image ({'/'.join(self.image_exts)})" if image is None else f".{self.caption_ext}"
                    yield url, key, None, f"no {need} member (has {have})"
                    continue
                caption = caption.decode("utf-8", errors="replace").strip()
                if not caption:
                    yield url, key, None, "empty caption"
                    continue
                yield url, key, image, caption
            if errors:
                logger.warning("%s: cannot read the whole shard, skipping the rest of it: %s", url, _reason(errors[0]))
            yield ShardEnd(url, errors[0] if errors else None)

    def _check_shards(self, end: "ShardEnd", done: int) -> None:
        """Count a damaged shard (its lost samples cannot be counted) against max_bad_fraction of the shards."""
        if end.error is None:
            return
        self.num_bad_shards += 1
        if self.num_bad_shards > self.max_bad_fraction * done:
            raise ValueError(f"{end.url}: cannot read the whole shard ({_reason(end.error)}); {self.num_bad_shards} "
                             f"of {done} shards read so far are damaged, more than max_bad_fraction="
                             f"{self.max_bad_fraction} (truncated or not a tar file: re-fetch it or leave it out)")

    def _samples(self, urls: Sequence[str]):
        """Decoded (name, PIL image, caption) with the bad-sample and damaged-shard accounting."""
        seen = bad = shards = 0
        example = last_url = ""
        for raw in self._raw_samples(urls):
            if isinstance(raw, ShardEnd):
                shards += 1
                self._check_shards(raw, shards)
                if bad > self.max_bad_fraction * seen:
                    raise ValueError(f"{last_url}: {bad} of {seen} samples read so far are bad, more than "
                                     f"max_bad_fraction={self.max_bad_fraction}; e.g. {example}")
                continue
            url, key, image, caption = raw
            last_url, seen, name = url, seen + 1, f"{url}:{key}"
            try:
                if image is None:
                    raise BadSample(name, caption)
                yield name, decode_image(image, name), caption
            except BadSample as e:
                bad += 1
                example = str(e)
                logger.warning("skipping sample %s", e)
                self._skipped.add()
        if urls and seen == bad:
            raise ValueError(f"{', '.join(urls[:3])}{' ...' if len(urls) > 3 else ''}: no readable image-caption "
                             f"samples ({bad} bad of {seen}; {self.num_bad_shards} unreadable shard(s))")

    def _consumer(self):
        """(this consumer's id, consumers) with consumers = ranks x DataLoader workers."""
        rank, world = rank_world()
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return rank * workers + worker, world * workers

    def _my_urls(self) -> list[str]:
        """This consumer's shards: webdataset's shard shuffle (seed + epoch, the same on every rank), then its split
        by node (rank) and by DataLoader worker."""
        import webdataset as wds

        urls = iter(self.urls)
        if self.shuffle_shards:
            urls = wds.shuffle(len(self.urls), len(self.urls), seed=self.seed + self.epoch)(urls)
        mine = list(wds.split_by_worker(wds.split_by_node(urls)))
        me, consumers = self._consumer()
        if len(self.urls) < consumers:
            logger.warning("%d shards for %d consumers (ranks x workers): consumer %d may get none", len(self.urls),
                           consumers, me)
        return mine

    def __iter__(self):
        import webdataset as wds

        items = ((to_tensor(image) if self.preprocess is None else self.preprocess(image),
                  tokenize(self.tokenizer, caption)) for _, image, caption in self._samples(self._my_urls()))
        if self.shuffle_buffer <= 0:
            yield from items
            return
        me, _ = self._consumer()
        seed = (self.seed + self.epoch) * 1_000_003 + me
        yield from wds.shuffle(self.shuffle_buffer, self.shuffle_buffer, seed=seed)(items)

    def to_indexed(self, cache_dir: str | os.PathLike | None = None, *, max_samples: int | None = None,
                   with_index: bool = False, on_error: str = "skip"):
        """Read all shards once, in the given order, into a map-style dataset with fixed indices (for small shard
        sets: for large ones use clipmoe.data.shards.ShardCaptionDataset, which reads samples from the shards).

        Bad samples are skipped (and counted in num_skipped) here, so index i is the i-th good sample in shard
        order. Holds every encoded image in memory unless cache_dir is given.

        Args:
            cache_dir: None: return an InMemoryCaptionDataset (encoded bytes, decoded on access). A folder: write
                `images/{i:09d}.{ext}` and `index.tsv` (filepath, title, source) there and return a
                CsvCaptionDataset over it (reusable: CsvCaptionDataset(cache_dir/"index.tsv") later).
            max_samples: stop after this many good samples.
            with_index, on_error: passed to the returned dataset.
        """
        images: list[bytes] = []
        captions: list[str] = []
        names: list[str] = []
        exts: list[str] = []
        seen = bad = 0
        for raw in self._raw_samples(self.urls):
            if isinstance(raw, ShardEnd):
                self._check_shards(raw, len(self.urls))  # all shards are read: the limit is over all of them
                continue
            url, key, image, caption = raw
            seen += 1
            name = f"{url}:{key}"
            if image is None:
                bad += 1
                logger.warning("skipping sample %s: %s", name, caption)
                self._skipped.add()
                continue
            try:
                decode_image(image, name)
            except BadSample as e:
                bad += 1
                logger.warning("skipping sample %s", e)
                self._skipped.add()
                continue
            images.append(image)
            captions.append(caption)
            names.append(name)
            exts.append(_image_ext(image))
            if max_samples is not None and len(images) >= max_samples:
                break
        source = self.urls[0] if len(self.urls) == 1 else f"{self.urls[0]} (+{len(self.urls) - 1} shards)"
        if not images:
            raise ValueError(f"{source}: no readable image-caption samples ({bad} bad of {seen})")
        if bad > self.max_bad_fraction * seen:
            raise ValueError(f"{source}: {bad} of {seen} samples are bad, more than "
                             f"max_bad_fraction={self.max_bad_fraction}")
        if cache_dir is None:
            return InMemoryCaptionDataset(images, captions, self.preprocess, self.tokenizer, names=names,
                                          source=source, with_index=with_index, on_error=on_error,
                                          max_bad_fraction=self.max_bad_fraction)
        cache_dir = os.fspath(cache_dir)
        os.makedirs(os.path.join(cache_dir, "images"), exist_ok=True)
        tsv = os.path.join(cache_dir, "index.tsv")
        with open(tsv + ".tmp", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, delimiter="\t")
            writer.writerow(["filepath", "title", "source"])
            for i, (data, caption, name, ext) in enumerate(zip(images, captions, names, exts, strict=True)):
                rel = os.path.join("images", f"{i:09d}.{ext}")
                with open(os.path.join(cache_dir, rel), "wb") as img_f:
                    img_f.write(data)
                writer.writerow([rel, caption, name])
        os.replace(tsv + ".tmp", tsv)
        return CsvCaptionDataset(tsv, self.preprocess, self.tokenizer, with_index=with_index, on_error=on_error,
                                 max_bad_fraction=self.max_bad_fraction)


def _reason(error: Exception) -> str:
    """webdataset appends the stream and url to its exceptions' args: keep the message."""
    return error.args[0] if error.args and isinstance(error.args[0], str) else str(error)


def _image_ext(data: bytes) -> str:
    """File extension from an encoded image's magic bytes (for the on-disk cache)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "img"
