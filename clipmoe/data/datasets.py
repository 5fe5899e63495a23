"""Image-caption datasets: CSV/TSV files and webdataset tar shards, in open_clip's formats.

Every dataset yields `(image, tokens)` per sample, or `(image, tokens, index)` with `with_index=True` (map-style):
image = preprocess(PIL RGB image), by default a float [3, H, W] tensor in [0, 1] (pass open_clip's transform to
resize and normalise); tokens = tokenizer([caption])[0], a long [context_length] tensor (with tokenizer=None the
raw caption string is returned instead, for inspection). `make_transforms_and_tokenizer` builds the pair from an
open_clip model name or model.

Formats:
- CSV/TSV (`CsvCaptionDataset`, map-style): a header row plus one row per sample, open_clip's `--csv-img-key
  filepath --csv-caption-key title --csv-separator "\\t"` by default. Relative image paths are resolved against
  `root`, by default the CSV's folder.
- webdataset (`WebDatasetCaptions`, an IterableDataset): tar shards whose members share a key per sample, one image
  (`.jpg`, `.jpeg`, `.png` or `.webp`) and one caption (`.txt`); other members (`.json`, ...) are ignored. Shards are
  given as a brace pattern ("data/{000000..000009}.tar"), a "::"-separated list of patterns, or a list. Shards are
  split over torch.distributed ranks and DataLoader workers (shard k goes to consumer k mod (world·workers)).

Fixed order with indices (the MCL pipeline embeds the whole training set, clusters it, then a sampler picks
indices): the map-style datasets have `__len__`/`__getitem__` and `with_index`. A webdataset stream has no stable
indices, so `WebDatasetCaptions.to_indexed()` reads every shard once, in the given order, and materialises the
samples into a map-style dataset: in memory (`InMemoryCaptionDataset`, the encoded image bytes, fine for data that
fits in RAM) or, with `cache_dir`, as image files plus a TSV on disk (a `CsvCaptionDataset`). Large shard sets are
read by index instead: `clipmoe.data.shards.ShardCaptionDataset` keeps a small cached offset index per shard and
decodes each sample on access (what the training commands use for `.tar` data).

Bad input:
- Structural problems raise at construction with the file and the problem named: a missing CSV or shard
  (FileNotFoundError), a CSV without the named columns (ValueError listing the columns it has), a CSV without rows,
  a CSV that is not UTF-8 (a UTF-8 byte-order mark is accepted) or has a record running over several lines (what an
  unclosed double quote at the start of a caption makes of the rows after it; ValueError naming the line).
- Bad samples (missing or unreadable image, empty caption, a shard sample without image or caption) are skipped and
  counted, not fatal, as long as they are at most `max_bad_fraction` of the data:
  - CSV: empty captions are counted at construction; more than max_bad_fraction·N raises ValueError naming the file
    and lines. `check_files=True` also stats every image path at construction (FileNotFoundError beyond the limit).
    An image that fails to load is found when read; `on_error` says what `__getitem__` does then:
    "skip" (default) returns None, so the DataLoader needs `collate_fn=collate_skip_none`, which drops it (the batch
    is one smaller); "substitute" returns the next readable sample (index+1, ...; with `with_index` its own index),
    which keeps batches full (needed when every rank must have the same batch size, e.g. all-gathered losses);
    "raise" raises at once. Each distinct bad sample is logged once per process (logger "clipmoe.data.datasets")
    and counted; once a process has seen more than max_bad_fraction·N distinct bad samples the read raises
    (FileNotFoundError if the file is missing, else ValueError) naming the file. With DataLoader workers each
    worker checks the samples it read, so the limit trips later (up to num_workers times more bad samples).
  - webdataset: bad samples are skipped; at the end of every shard, if more than max_bad_fraction of the samples
    read so far by this process were bad, iteration raises ValueError naming the shard and an example. A shard that
    cannot be opened or is not a valid tar is logged and skipped; an iteration that yields no sample at all raises.
  - `dataset.num_skipped`: skip events summed over all processes that share the dataset (DataLoader workers
    included), read from the main process; a sample skipped in two epochs counts twice.
"""
import csv
import io
import logging
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.context import get_spawning_popen

import torch
from torch.utils.data import Dataset, default_collate

from clipmoe.fileio import read_text

logger = logging.getLogger(__name__)

ON_ERROR = ("skip", "substitute", "raise")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# Default tolerated share of bad samples: 1% lets a scraped data set with a few broken files train, while a small
# hand-made file with one broken row (>= 1 in 100) still fails loudly.
DEFAULT_MAX_BAD_FRACTION = 0.01

Preprocess = Callable | None
Tokenizer = Callable | None


# ---------------------------------------------------------------------------------------------------------- helpers
class SharedCounter:
    """An integer shared by the process that made it and its DataLoader workers (fork or spawn).

    Pickling outside process start-up (deepcopy, torch.save) keeps a snapshot of the value, not the sharing.
    """

    def __init__(self, value: int = 0):
        self._value = multiprocessing.Value("q", value)

    @property
    def value(self) -> int:
        return self._value.value

    def add(self, n: int = 1) -> None:
        with self._value.get_lock():
            self._value.value += n

    def __getstate__(self):
        return {"shared": self._value} if get_spawning_popen() is not None else {"value": self.value}

    def __setstate__(self, state):
        self._value = state["shared"] if "shared" in state else multiprocessing.Value("q", state["value"])


class BadSample(Exception):
    """A sample whose image or caption cannot be used; `path` names the file it came from."""

    def __init__(self, path: str, reason: str, missing: bool = False):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason, self.missing = path, reason, missing


def decode_image(data_or_path, name: str):
    """Open a file path or bytes as an RGB PIL image; raise BadSample naming `name` when it cannot be used."""
    from PIL import Image

    if isinstance(data_or_path, str) and not os.path.isfile(data_or_path):
        raise BadSample(name, "image file not found", missing=True)
    try:
        src = io.BytesIO(data_or_path) if isinstance(data_or_path, (bytes, bytearray)) else data_or_path
        with Image.open(src) as im:
            return im.convert("RGB")  # forces the full decode, so a truncated file fails here, not in preprocess
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadSample(name, f"unreadable image ({type(e).__name__}: {e})") from e


def to_tensor(image) -> torch.Tensor:
    """PIL RGB image -> float [3, H, W] in [0, 1] (the default when no preprocess is given)."""
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return data.view(image.height, image.width, 3).permute(2, 0, 1).float().div_(255)


def tokenize(tokenizer: Tokenizer, caption: str):
    return caption if tokenizer is None else tokenizer([caption])[0]


def check_fraction(max_bad_fraction: float) -> float:
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction!r}")
    return max_bad_fraction


def read_csv_rows(path, sep: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of every non-blank row of a UTF-8 CSV/TSV file (the header first), with CSV quoting.

    A record that runs over several lines is refused: it is what an unclosed double quote at the start of a field
    makes of the rows after it (they would silently become one caption), and it cannot be told apart from a caption
    holding a line break. Raises ValueError naming the file and the line."""
    text = read_text(path, "")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep)
    start = 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise ValueError(f"{path}: line {reader.line_num}: not valid CSV ({exc})") from None
        end, line = reader.line_num, start
        start = end + 1
        if end > line:
            raise ValueError(f"{path}: line {line}: a field runs over {end - line + 1} lines, to line {end}: a field "
                             f"that starts with a double quote (\") ends only at the next one, swallowing the rows in "
                             f"between. Quote such a field whole with its inner quotes doubled (\"a \"\"b\"\" c\"), "
                             f"or drop the leading quote; captions with line breaks are not supported")
        if row:
            yield line, row


def collate_skip_none(batch: list):
    """DataLoader collate_fn that drops the None items of skipped samples; returns None if all were skipped."""
    batch = [item for item in batch if item is not None]
    return default_collate(batch) if batch else None


# ---------------------------------------------------------------------------------------------- transforms, tokenizer
def make_transforms_and_tokenizer(model_name_or_model, *, is_train: bool = False, image_size=None,
                                  context_length: int | None = None) -> tuple[Callable, Callable]:
    """open_clip's image transform and tokenizer for a model.

    Args:
        model_name_or_model: an open_clip model name ("ViT-B-32", "hf-hub:...") or a model object (open_clip.CLIP or
            CustomTextCLIP). For a model object the preprocessing config (size, mean, std, resize mode) is read from
            the model and the tokenizer is CLIP's BPE (open_clip.SimpleTokenizer) at the model's context length;
            for models with another tokenizer (SigLIP, HF text towers) pass the name instead.
        is_train: open_clip's training transform (random resized crop) instead of resize + centre crop.
        image_size: overrides the model's image size (int or (H, W)).
        context_length: overrides the model's text context length.

    Returns:
        (preprocess, tokenizer): preprocess(PIL image) -> float [3, H, W]; tokenizer(list of str) -> long [N, L].

    Raises:
        ValueError: unknown model name; a model whose vocabulary is smaller than CLIP's BPE (tiny test models: use
            clipmoe.synthetic.WordTokenizer).
    """
    import open_clip

    if isinstance(model_name_or_model, str):
        name = model_name_or_model
        if not name.startswith(("hf-hub:", "local-dir:")):
            cfg = open_clip.get_model_config(name)
            if cfg is None:
                raise ValueError(f"unknown open_clip model name {name!r}; see open_clip.list_models()")
            if image_size is None:
                image_size = cfg["vision_cfg"].get("image_size", 224)
        elif image_size is None:
            raise ValueError(f"pass image_size for {name!r} (its config is not read here: no hub access)")
        preprocess = open_clip.image_transform(image_size, is_train=is_train)
        tokenizer = open_clip.get_tokenizer(name, context_length=context_length)
        return preprocess, tokenizer

    model = model_name_or_model
    cfg = dict(open_clip.get_model_preprocess_cfg(model))
    size = image_size if image_size is not None else cfg.get("size")
    if size is None:
        raise ValueError(f"{type(model).__name__} has no image size; pass image_size")
    preprocess = open_clip.image_transform(size, is_train=is_train, mean=cfg.get("mean"), std=cfg.get("std"),
                                           interpolation=cfg.get("interpolation"),
                                           resize_mode=cfg.get("resize_mode"))
    tok_cfg = open_clip.get_model_tokenize_cfg(model)
    length = context_length or tok_cfg.get("context_length") or 77
    tokenizer = open_clip.SimpleTokenizer(context_length=length)
    vocab = tok_cfg.get("vocab_size")
    if vocab is not None and vocab < len(tokenizer.encoder):
        raise ValueError(f"{type(model).__name__} has vocab_size {vocab}, smaller than CLIP's BPE vocabulary "
                         f"({len(tokenizer.encoder)}); its token ids would be out of range. For tiny test models use "
                         f"clipmoe.synthetic.WordTokenizer (or a model built with vocab_size >= "
                         f"{len(tokenizer.encoder)})")
    return preprocess, tokenizer


# ------------------------------------------------------------------------------------------------ map-style datasets
class MapCaptionDataset(Dataset):
    """Shared item logic: bad-sample policy, counters, with_index. Subclasses define `_load(i) -> (PIL, caption)`,
    `__len__` and `source` (the file named in errors)."""

    source: str = "<dataset>"

    def _init_common(self, preprocess: Preprocess, tokenizer: Tokenizer, with_index: bool, on_error: str,
                     max_bad_fraction: float) -> None:
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.preprocess, self.tokenizer = preprocess, tokenizer
        self.with_index, self.on_error = with_index, on_error
        self.max_bad_fraction = check_fraction(max_bad_fraction)
        self._skipped = SharedCounter()
        self.bad_samples: dict[int, str] = {}  # index -> reason, for the samples this process found bad

    @property
    def num_skipped(self) -> int:
        """Bad-sample reads skipped or substituted so far, summed over the DataLoader workers."""
        return self._skipped.value

    def _load(self, index: int):
        raise NotImplementedError

    def _bad(self, index: int, error: BadSample) -> None:
        new = index not in self.bad_samples
        self.bad_samples[index] = error.reason
        if self.on_error == "raise" or len(self.bad_samples) > self.max_bad_fraction * len(self):
            why = ("" if self.on_error == "raise" else
                   f"{len(self.bad_samples)} of {len(self)} samples are bad, more than max_bad_fraction="
                   f"{self.max_bad_fraction}; ")
            exc = FileNotFoundError if error.missing else ValueError
            raise exc(f"{self.source}: {why}sample {index}: {error}") from error
        if new:
            logger.warning("%s: skipping sample %d: %s", self.source, index, error)
        self._skipped.add()

    def __getitem__(self, index: int):
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        tries = 1 if self.on_error == "skip" else n
        for step in range(tries):
            i = (index + step) % n
            try:
                image, caption = self._load(i)
            except BadSample as e:
                self._bad(i, e)
                continue
            image = to_tensor(image) if self.preprocess is None else self.preprocess(image)
            item = (image, tokenize(self.tokenizer, caption))
            return item + (i,) if self.with_index else item
        return None


class CsvCaptionDataset(MapCaptionDataset):
    """Map-style dataset over a CSV/TSV of image paths and captions (open_clip's --csv-* convention).

    Args:
        path: the CSV/TSV file; its first row names the columns.
        preprocess: PIL image -> tensor (e.g. from make_transforms_and_tokenizer); None: float [3, H, W] in [0, 1].
        tokenizer: list of str -> long [N, L]; None: the caption string is returned.
        img_key, caption_key, sep: column names and separator (open_clip: --csv-img-key, --csv-caption-key,
            --csv-separator; defaults "filepath", "title", tab).
        root: folder that relative image paths are relative to (default: the CSV's folder).
        with_index: items are (image, tokens, index) instead of (image, tokens).
        on_error: "skip" | "substitute" | "raise" for a sample that cannot be read (module docstring).
        max_bad_fraction: tolerated share of bad samples before reads raise.
        check_files: stat every image path now; missing ones beyond the limit raise FileNotFoundError (costs one
            stat per row, seconds per million rows on a local disk).

    Attributes: `paths` (resolved image paths), `captions`, `lines` (the CSV line each sample starts on),
    `num_skipped`, `bad_samples`.
    """

    def __init__(self, path: str | os.PathLike, preprocess: Preprocess = None, tokenizer: Tokenizer = None, *,
                 img_key: str = "filepath", caption_key: str = "title", sep: str = "\t",
                 root: str | os.PathLike | None = None, with_index: bool = False, on_error: str = "skip",
                 max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION, check_files: bool = False):
        self._init_common(preprocess, tokenizer, with_index, on_error, max_bad_fraction)
        path = os.fspath(path)
        self.source = path
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: CSV file not found")
        root = os.path.dirname(os.path.abspath(path)) if root is None else os.fspath(root)
        self.paths: list[str] = []
        self.captions: list[str] = []
        self.lines: list[int] = []
        rows = read_csv_rows(path, sep)
        header = next(rows, (1, None))[1]
        if header is None:
            raise ValueError(f"{path}: empty file (no header row)")
        header = [h.strip() for h in header]
        for key, flag in ((img_key, "--csv-img-key / img_key"), (caption_key, "--csv-caption-key / caption_key")):
            if key not in header:
                hint = ""
                if len(header) == 1:
                    hint = f"; only one column was found, so the separator {sep!r} may be wrong"
                raise ValueError(f"{path}: no column {key!r} ({flag}); the header has columns {header}{hint}")
        img_col, cap_col = header.index(img_key), header.index(caption_key)
        for line, row in rows:
            img = row[img_col].strip() if img_col < len(row) else ""
            cap = row[cap_col].strip() if cap_col < len(row) else ""
            self.paths.append(os.path.join(root, os.path.expanduser(img)) if img else "")
            self.captions.append(cap)
            self.lines.append(line)
        n = len(self.paths)
        if n == 0:
            raise ValueError(f"{path}: no data rows after the header")
        limit = self.max_bad_fraction * n
        empty = [self.lines[i] for i in range(n) if not self.captions[i]]
        if len(empty) > limit:
            raise ValueError(f"{path}: {len(empty)} of {n} rows have an empty caption (column {caption_key!r}), "
                             f"e.g. line(s) {empty[:5]}; more than max_bad_fraction={self.max_bad_fraction}")
        no_path = [self.lines[i] for i in range(n) if not self.paths[i]]
        if len(no_path) > limit:
            raise ValueError(f"{path}: {len(no_path)} of {n} rows have an empty image path (column {img_key!r}), "
                             f"e.g. line(s) {no_path[:5]}; more than max_bad_fraction={self.max_bad_fraction}")
        if empty or no_path:
            logger.warning("%s: %d empty caption(s), %d empty image path(s) (e.g. lines %s); those samples will be "
                           "skipped", path, len(empty), len(no_path), (empty + no_path)[:5])
        if check_files:
            missing = [i for i in range(n) if self.paths[i] and not os.path.isfile(self.paths[i])]
            if len(missing) > limit:
                shown = ", ".join(f"{self.paths[i]} (line {self.lines[i]})" for i in missing[:3])
                raise FileNotFoundError(f"{path}: {len(missing)} of {n} image files not found, e.g. {shown}; more "
                                        f"than max_bad_fraction={self.max_bad_fraction}")
            if missing:
                logger.warning("%s: %d image file(s) not found, e.g. %s; those samples will be skipped", path,
                               len(missing), self.paths[missing[0]])

    def __len__(self) -> int:
        return len(self.paths)

    def _load(self, index: int):
        where = f"{self.paths[index] or '<empty path>'} (line {self.lines[index]} of {self.source})"
        if not self.captions[index]:
            raise BadSample(where, "empty caption")
        if not self.paths[index]:
            raise BadSample(where, "empty image path", missing=True)
        return decode_image(self.paths[index], where), self.captions[index]


class InMemoryCaptionDataset(MapCaptionDataset):
    """Map-style dataset over encoded images (bytes of a .jpg/.png/...) and captions held in memory.

    Made by `WebDatasetCaptions.to_indexed()`; the arguments after `captions` are those of CsvCaptionDataset.
    `names[i]` says where sample i came from (for errors), e.g. "shard.tar:key".
    """

    def __init__(self, images: Sequence[bytes], captions: Sequence[str], preprocess: Preprocess = None,
                 tokenizer: Tokenizer = None, *, names: Sequence[str] | None = None, source: str = "<memory>",
                 with_index: bool = False, on_error: str = "skip",
                 max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION):
        if len(images) != len(captions):
            raise ValueError(f"{source}: {len(images)} images but {len(captions)} captions")
        self._init_common(preprocess, tokenizer, with_index, on_error, max_bad_fraction)
        self.images, self.captions = list(images), list(captions)
        self.names = list(names) if names is not None else [f"{source}[{i}]" for i in range(len(images))]
        self.source = source

    def __len__(self) -> int:
        return len(self.images)

    def _load(self, index: int):
        if not self.captions[index].strip():
            raise BadSample(self.names[index], "empty caption")
        return decode_image(self.images[index], self.names[index]), self.captions[index]
