"""webdataset tar shards of image-caption pairs (open_clip's format); see clipmoe.data.datasets for the
sample contract and the bad-input rules."""
import csv
import logging
import os
import random
from typing import List, Optional, Sequence, Union

from torch.utils.data import IterableDataset, get_worker_info

logger = logging.getLogger(__name__)

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


# ------------------------------------------------------------------------------------------------------- webdataset
def expand_urls(urls: Union[str, Sequence[str]]) -> List[str]:
    """Shard spec -> list of shards: brace patterns ("d/{000..009}.tar") and "::"-separated lists are expanded."""
    import braceexpand

    if isinstance(urls, (str, os.PathLike)):
        urls = os.fspath(urls).split("::")
    out: List[str] = []
    for url in urls:
        out.extend(braceexpand.braceexpand(os.fspath(url)))
    return out


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:") or url.startswith("file://")


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

    Iteration order without shuffles: shards in the given order, samples in tar order; with several ranks or
    DataLoader workers each consumer reads every (world·workers)-th shard, so use at least that many shards (a
    consumer without a shard yields nothing; a warning says so). Items carry no index: see `to_indexed()`.
    """

    def __init__(self, urls: Union[str, Sequence[str]], preprocess: Preprocess = None, tokenizer: Tokenizer = None,
                 *, num_samples: Optional[int] = None, shuffle_shards: bool = False, shuffle_buffer: int = 0,
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
        in place of the caption; None is yielded after each shard."""
        import webdataset as wds

        for url in urls:
            errors: List[Exception] = []

            def handler(exc, errors=errors):
                errors.append(exc)
                return False  # stop this shard: an unreadable tar is not worth scanning further

            for raw in wds.tarfile_samples([{"url": url}], handler=handler):
                key = raw.get("__key__", "?")
                image = next((raw[e] for e in self.image_exts if e in raw), None)
                caption = raw.get(self.caption_ext)
                if image is None or caption is None:
                    have = sorted(k for k in raw if not k.startswith("__"))
                    need = f"an image ({'/'.join(self.image_exts)})" if image is None else f"a .{self.caption_ext}"
                    yield url, key, None, f"no {need} member (has {have})"
                    continue
                caption = caption.decode("utf-8", errors="replace").strip()
                if not caption:
                    yield url, key, None, "empty caption"
                    continue
                yield url, key, image, caption
            if errors:
                self.num_bad_shards += 1
                logger.warning("%s: cannot read shard, skipping the rest of it: %s", url, errors[0])
            yield None

    def _samples(self, urls: Sequence[str]):
        """Decoded (name, PIL image, caption) with the bad-sample accounting."""
        seen = bad = 0
        example = last_url = ""
        for raw in self._raw_samples(urls):
            if raw is None:  # end of a shard
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

    def _my_urls(self) -> List[str]:
        urls = list(self.urls)
        if self.shuffle_shards:
            random.Random(self.seed + self.epoch).shuffle(urls)
        rank, world = rank_world()
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        consumers, me = world * workers, rank * workers + worker
        if len(urls) < consumers:
            logger.warning("%d shards for %d consumers (ranks x workers): consumer %d may get none", len(urls),
                           consumers, me)
        return urls[me::consumers]

    def __iter__(self):
        rank, _ = rank_world()
        info = get_worker_info()
        consumer = rank * (info.num_workers if info else 1) + (info.id if info else 0)
        rng = random.Random((self.seed + self.epoch) * 1_000_003 + consumer)
        buffer: List = []
        for name, image, caption in self._samples(self._my_urls()):
            image = to_tensor(image) if self.preprocess is None else self.preprocess(image)
            item = (image, tokenize(self.tokenizer, caption))
            if self.shuffle_buffer <= 0:
                yield item
                continue
            buffer.append(item)
            if len(buffer) >= self.shuffle_buffer:
                j = rng.randrange(len(buffer))
                buffer[j], buffer[-1] = buffer[-1], buffer[j]
                yield buffer.pop()
        rng.shuffle(buffer)
        yield from buffer

    def to_indexed(self, cache_dir: Optional[Union[str, os.PathLike]] = None, *, max_samples: Optional[int] = None,
                   with_index: bool = False, on_error: str = "skip"):
        """Read all shards once, in the given order, into a map-style dataset with fixed indices.

        Bad samples are skipped (and counted in num_skipped) here, so index i is the i-th good sample in shard
        order. Holds every encoded image in memory unless cache_dir is given.

        Args:
            cache_dir: None: return an InMemoryCaptionDataset (encoded bytes, decoded on access). A folder: write
                `images/{i:09d}.{ext}` and `index.tsv` (filepath, title, source) there and return a
                CsvCaptionDataset over it (reusable: CsvCaptionDataset(cache_dir/"index.tsv") later).
            max_samples: stop after this many good samples.
            with_index, on_error: passed to the returned dataset.
        """
        images: List[bytes] = []
        captions: List[str] = []
        names: List[str] = []
        exts: List[str] = []
        seen = bad = 0
        for raw in self._raw_samples(self.urls):
            if raw is None:
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
            for i, (data, caption, name, ext) in enumerate(zip(images, captions, names, exts)):
                rel = os.path.join("images", f"{i:09d}.{ext}")
                with open(os.path.join(cache_dir, rel), "wb") as img_f:
                    img_f.write(data)
                writer.writerow([rel, caption, name])
        os.replace(tsv + ".tmp", tsv)
        return CsvCaptionDataset(tsv, self.preprocess, self.tokenizer, with_index=with_index, on_error=on_error,
                                 max_bad_fraction=self.max_bad_fraction)


def _image_ext(data: bytes) -> str:
    """File extension from an encoded image's magic bytes (for the on-disk cache)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "img"
