"""SyntheticShapes: a procedural image-caption dataset with independent, labelled attributes, for seeing feature
suppression (MCL paper) and what each MCL stage / expert adds, on CPU, with no downloads.

Each image shows a group of identical objects on a dark grey background; the caption names every attribute, in a
fixed order: "{count} {size} {colour} {texture} {shape}[s] at the {position}", e.g.
"two small red striped circles at the top left". The design below is FIXED (version `DESIGN_VERSION`): results of
different methods are only comparable on the same design, so change it only by bumping the version.

Attributes (all drawn independently and uniformly; `CLASSES` lists the values in label order):
    colour   8  red orange yellow green cyan blue purple pink  EASY: fills the object; read from the mean colour.
    size     2  small (4.5 px), large (7 px)                     EASY: total coloured area (~2.4x), a coarse cue.
    position 4  the quadrant that holds the group                EASY for pixels (a 2x2 pooling reads it), though
                                                                 CLIP-style models are known to be weak at spatial
                                                                 words (MMVP); whether it is suppressed is measured.
    shape    4  circle square triangle cross                     MEDIUM: outline only; on small objects a few pixels.
    count    3  one two three                                    HARD: 1 vs 2 vs 3 objects, confounded with size in
                                                                 the total area (3 small ~ 1 large).
    texture  3  plain striped checkered                          HARD: a 1-px pattern (alternate rows, or a checker
                                                                 board) that keeps the object's mean colour: it is
                                                                 invisible to any pooled or low-resolution cue.
Why: in contrastive learning with random negatives, a few salient features (colour, area) already separate most
pairs in a batch, and the gradient to learn the others fades (feature suppression). MCL's clusters on the first
model's embeddings will mostly be colour/size groups; negatives drawn inside a cluster share those, so later stages
must use shape, count, texture and position. Joint label space: 8·2·4·3·3·4 = 2304 combinations.

Pixels: the design canvas is 32x32 (tiny test models see 32 px). Quadrants are 16x16; an object is drawn at 4x
supersampling and box-filtered (anti-aliased edges, sub-pixel placement), with shape areas roughly equalised
(circle diameter 0.85·d, square side 0.75·d, triangle base = height = d, cross arm d by 0.36·d, for size d) so area
encodes size and count, not shape. Slots inside the quadrant: one object at the centre (8, 8); two side by side
(4, 8), (12, 8); three in a triangle (4, 4), (12, 4), (8, 12) (1 px apart at the large size). The whole group is
shifted by a nuisance jitter (dx, dy) in {-0.5, -0.25, 0, 0.25, 0.5}² px (25 values), so samples of one combination
differ. Texture multiplies the object colour by 0.55 / 1.45 on alternate rows (striped) or checker cells
(checkered), on the canvas pixel grid; colours have channels <= 175 so 1.45x stays in range. `image_size` > 32
upscales with nearest neighbour: the same information at any size.

Splits: for every attribute combination, a seeded random 20% (`test_fraction`, in steps of 1/25) of the 25 jitter
values belong to "test", the rest to "train". A split draws (attributes, jitter) uniformly and keeps those of its
split, so both splits have every combination with equal probability (attributes stay exactly independent), and no
test image equals a train image (same objects, unseen sub-pixel placement). Samples are drawn in fixed chunks, so
the first n samples do not depend on num_samples. Same seed -> identical bytes.

Zero-shot: `zero_shot_prompts(attribute)` gives per-class prompts that reuse the caption's words (e.g. colour:
"red objects"), so an evaluation can do per-attribute zero-shot classification and see which attributes a model
tells apart. `WordTokenizer` is a word-level tokenizer over `VOCAB` (about 40 ids), usable with tiny test models
(vocab_size >= tokenizer.vocab_size); CLIP's BPE tokenizer works as well, the captions being plain English.

Measured salience (design version 1, seed 0; logistic-regression probe, L-BFGS, on standardised pixels average-
pooled to P x P, trained on 8192 train samples, accuracy on 2048 test samples; a proxy for how coarse a cue each
attribute needs, not a model result):
    P (pooled size)   colour  size  position  count  shape  texture
    1 (mean colour)    0.99   0.80    0.25    0.53   0.27    0.34
    2                  0.97   0.80    1.00    0.53   0.27    0.34
    4                  1.00   0.82    1.00    0.71   0.38    0.39
    8                  1.00   0.97    1.00    1.00   0.49    0.48
    32 (all pixels)    1.00   1.00    1.00    1.00   0.96    1.00
    chance             0.12   0.50    0.25    0.33   0.25    0.33
So colour, position and size are readable from a few pooled numbers, count from a coarse grid, and shape and
texture only from full-resolution detail: the easy/hard split the experiments rely on.
"""
import csv
import functools
import io
import itertools
import os
import re
import tarfile
from collections.abc import Sequence

import numpy as np
import torch

from clipmoe.data.datasets import MapCaptionDataset

DESIGN_VERSION = 1
CANVAS = 32          # design resolution (px); images are rendered here and upscaled to image_size
SUPERSAMPLE = 4      # shapes are drawn at 4x and box-filtered: anti-aliased edges, quarter-pixel placement
BACKGROUND = (40, 40, 40)

ATTRIBUTES = ("colour", "size", "shape", "texture", "count", "position")
CLASSES: dict[str, tuple[str, ...]] = {
    "colour": ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink"),
    "size": ("small", "large"),
    "shape": ("circle", "square", "triangle", "cross"),
    "texture": ("plain", "striped", "checkered"),
    "count": ("one", "two", "three"),
    "position": ("top left", "top right", "bottom left", "bottom right"),
}
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
# RGB per colour; every channel <= 175 so the 1.45x texture highlight stays <= 255 (textures keep the mean colour).
PALETTE = np.array([(175, 35, 35), (175, 105, 25), (170, 160, 30), (40, 160, 40),
                    (30, 160, 170), (45, 70, 175), (120, 50, 170), (175, 80, 140)], dtype=np.float32)
SIZES = (4.5, 7.0)                      # object size d (px on the 32-px canvas)
TEXTURE_LOW, TEXTURE_HIGH = 0.55, 1.45  # mean 1.0: texture does not change the mean colour
SLOTS = {1: ((8.0, 8.0),), 2: ((4.0, 8.0), (12.0, 8.0)), 3: ((4.0, 4.0), (12.0, 4.0), (8.0, 12.0))}
QUADRANTS = ((0, 0), (16, 0), (0, 16), (16, 16))  # (x, y) origin per position class
JITTER = (-0.5, -0.25, 0.0, 0.25, 0.5)
NUM_JITTERS = len(JITTER) ** 2
CHUNK = 4096          # samples drawn per RNG chunk (fixed: the first n samples never depend on num_samples)

ZERO_SHOT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "colour": ("{} objects", "a photo of a {} object"),
    "size": ("{} objects", "a photo of a {} object"),
    "shape": ("a {}", "a photo of a {}"),
    "texture": ("{} objects", "a photo of a {} object"),
    "count": ("{} objects", "a photo of {} objects"),
    "position": ("objects at the {}", "a photo of objects at the {}"),
}
VOCAB: tuple[str, ...] = tuple(dict.fromkeys(
    [w for attr in ATTRIBUTES for name in CLASSES[attr] for w in name.split()]
    + list(PLURAL.values()) + ["a", "an", "the", "at", "of", "photo", "object", "objects"]))


# ------------------------------------------------------------------------------------------------------- tokenizer
class WordTokenizer:
    """Word-level tokenizer over a fixed vocabulary, shaped like open_clip's (list of str -> long [N, L]).

    Ids: 0 = padding, 1..V = the words of `vocab`, V+1 = unknown word, V+2 = start, V+3 = end. The end token has
    the largest id, as in CLIP's BPE, because open_clip pools the text features at argmax(token id). Text is
    lower-cased and split into runs of letters; longer texts are cut to context_length with the end token kept.
    """

    def __init__(self, vocab: Sequence[str] = VOCAB, context_length: int = 32):
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (start and end tokens), got {context_length}")
        self.vocab = tuple(vocab)
        self.word_ids = {w: i + 1 for i, w in enumerate(self.vocab)}
        self.unk_id, self.sot_id, self.eot_id = len(self.vocab) + 1, len(self.vocab) + 2, len(self.vocab) + 3
        self.vocab_size = len(self.vocab) + 4
        self.context_length = context_length

    def encode(self, text: str) -> list[int]:
        return [self.word_ids.get(w, self.unk_id) for w in re.findall(r"[a-z]+", text.lower())]

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        length = context_length or self.context_length
        out = torch.zeros(len(texts), length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.sot_id] + self.encode(text)[: length - 2] + [self.eot_id]
            out[row, : len(ids)] = torch.tensor(ids)
        return out


# ------------------------------------------------------------------------------------------------------- rendering
def draw_shape(draw, shape: str, cx: float, cy: float, d: float) -> None:
    s = SUPERSAMPLE
    if shape == "circle":
        r = 0.85 * d / 2
        draw.ellipse([(cx - r) * s, (cy - r) * s, (cx + r) * s - 1, (cy + r) * s - 1], fill=255)
    elif shape == "square":
        h = 0.75 * d / 2
        draw.rectangle([(cx - h) * s, (cy - h) * s, (cx + h) * s - 1, (cy + h) * s - 1], fill=255)
    elif shape == "triangle":
        h = d / 2
        draw.polygon([(cx * s, (cy - h) * s), ((cx + h) * s, (cy + h) * s), ((cx - h) * s, (cy + h) * s)], fill=255)
    elif shape in ("bar", "pillar"):  # a horizontal / vertical bar, d by 0.44 d
        w, h = (d / 2, 0.22 * d) if shape == "bar" else (0.22 * d, d / 2)
        draw.rectangle([(cx - w) * s, (cy - h) * s, (cx + w) * s - 1, (cy + h) * s - 1], fill=255)
    elif shape == "cross":
        h, w = d / 2, 0.36 * d / 2
        draw.rectangle([(cx - h) * s, (cy - w) * s, (cx + h) * s - 1, (cy + w) * s - 1], fill=255)
        draw.rectangle([(cx - w) * s, (cy - h) * s, (cx + w) * s - 1, (cy + h) * s - 1], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")


_MASKS: dict[tuple[int, int, int, int, int], np.ndarray] = {}


def _mask(shape: int, size: int, count: int, position: int, jitter: int) -> np.ndarray:
    """Coverage in [0, 1] ([32, 32] float32) of the object group; cached (2400 distinct masks in all)."""
    key = (shape, size, count, position, jitter)
    if key not in _MASKS:
        from PIL import Image, ImageDraw

        big = Image.new("L", (CANVAS * SUPERSAMPLE,) * 2, 0)
        draw = ImageDraw.Draw(big)
        ox, oy = QUADRANTS[position]
        dx, dy = JITTER[jitter % len(JITTER)], JITTER[jitter // len(JITTER)]
        for sx, sy in SLOTS[count + 1]:
            draw_shape(draw, CLASSES["shape"][shape], ox + sx + dx, oy + sy + dy, SIZES[size])
        small = big.resize((CANVAS, CANVAS), Image.BOX)
        _MASKS[key] = np.asarray(small, dtype=np.float32) / 255.0
    return _MASKS[key]


@functools.cache  # built once per canvas, read by every render call (never written)
def texture_patterns(canvas: int, period: int = 1) -> np.ndarray:
    """[3, canvas, canvas] colour multipliers for plain, striped, checkered, `period` px per stripe / checker cell;
    each has mean 1 over two periods, so a texture keeps the object's mean colour."""
    y, x = np.mgrid[0:canvas, 0:canvas] // period
    plain = np.ones((canvas, canvas), np.float32)
    striped = np.where(y % 2 == 0, TEXTURE_LOW, TEXTURE_HIGH).astype(np.float32)
    checkered = np.where((x + y) % 2 == 0, TEXTURE_LOW, TEXTURE_HIGH).astype(np.float32)
    return np.stack([plain, striped, checkered])


def composite(masks: np.ndarray, colours: np.ndarray, patterns: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] images: objects of `colours` [N, 3] textured by `patterns` [N, H, W] where `masks`
    [N, H, W] (coverage in [0, 1]) over the background."""
    bg = np.asarray(BACKGROUND, np.float32)
    fill = colours[:, None, None, :] * patterns[..., None]
    return np.clip(np.rint(bg + masks[..., None] * (fill - bg)), 0, 255).astype(np.uint8)


def render(labels: np.ndarray, jitters: np.ndarray) -> np.ndarray:
    """Images for attribute labels [N, 6] (ATTRIBUTES order) and jitter ids [N] -> uint8 [N, 32, 32, 3]."""
    labels = np.asarray(labels, dtype=np.int64)
    col, size, shape, tex, count, pos = (labels[:, a] for a in range(len(ATTRIBUTES)))
    masks = np.stack([_mask(*k) for k in zip(shape.tolist(), size.tolist(), count.tolist(), pos.tolist(),
                                             np.asarray(jitters).tolist(), strict=True)]) if len(labels) else \
        np.zeros((0, CANVAS, CANVAS), np.float32)
    return composite(masks, PALETTE[col], texture_patterns(CANVAS)[tex])


def caption_for(labels: Sequence[int]) -> str:
    """Caption of one sample's attribute labels (ATTRIBUTES order)."""
    name = {a: CLASSES[a][int(v)] for a, v in zip(ATTRIBUTES, labels, strict=False)}
    shape = name["shape"] if name["count"] == "one" else PLURAL[name["shape"]]
    return f"{name['count']} {name['size']} {name['colour']} {name['texture']} {shape} at the {name['position']}"


def parse_caption(caption: str) -> dict[str, str]:
    """Inverse of caption_for: attribute -> class name (raises ValueError on a caption not of this grammar)."""
    words = caption.split()
    if len(words) != 9 or words[5:7] != ["at", "the"]:
        raise ValueError(f"not a SyntheticShapes caption: {caption!r}")
    singular = {v: k for k, v in PLURAL.items()}
    out = {"count": words[0], "size": words[1], "colour": words[2], "texture": words[3],
           "shape": singular.get(words[4], words[4]), "position": " ".join(words[7:9])}
    for attr, value in out.items():
        if value not in CLASSES[attr]:
            raise ValueError(f"not a SyntheticShapes caption ({attr} {value!r}): {caption!r}")
    return out


# --------------------------------------------------------------------------------------------------------- dataset
def _split_table(seed: int, test_fraction: float, cards: Sequence[int], version: int) -> np.ndarray:
    """[num_combinations, 25] bool: True where (combination, jitter) belongs to the test split."""
    n_test = int(round(test_fraction * NUM_JITTERS))
    if not 1 <= n_test <= NUM_JITTERS - 1:
        raise ValueError(f"test_fraction must give 1..{NUM_JITTERS - 1} of {NUM_JITTERS} jitters, got "
                         f"{test_fraction!r}")
    rng = np.random.default_rng([seed, version, 0x5E11])
    ranks = np.argsort(np.argsort(rng.random((int(np.prod(cards)), NUM_JITTERS)), axis=1), axis=1)
    return ranks < n_test


def _draw(num_samples: int, seed: int, split: str, test_fraction: float, cards: Sequence[int] | None = None,
          version: int = DESIGN_VERSION, stream: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(attribute labels [n, A], jitter ids [n]) of a split; `stream` picks an independent draw of the same split
    (default: 0 for train, 1 for test)."""
    cards = [len(CLASSES[a]) for a in ATTRIBUTES] if cards is None else list(cards)
    is_test = _split_table(seed, test_fraction, cards, version)
    rng = np.random.default_rng([seed, version, (0 if split == "train" else 1) if stream is None else stream])
    labels, jitters, have = [], [], 0
    while have < num_samples:
        attrs = np.stack([rng.integers(0, c, CHUNK) for c in cards], axis=1)
        jit = rng.integers(0, NUM_JITTERS, CHUNK)
        keep = is_test[np.ravel_multi_index(attrs.T, cards), jit] == (split == "test")
        labels.append(attrs[keep])
        jitters.append(jit[keep])
        have += int(keep.sum())
    return np.concatenate(labels)[:num_samples], np.concatenate(jitters)[:num_samples]


class SyntheticShapes(MapCaptionDataset):
    """The synthetic image-caption dataset of this module (design in the module docstring), map-style.

    Args:
        num_samples: samples in this split.
        split: "train" or "test" (held out: disjoint images, same distribution).
        seed: everything (split table, attributes, jitter) derives from it.
        image_size: output size (>= 32; nearest-neighbour upscale of the 32-px design canvas).
        preprocess: PIL image -> tensor (e.g. open_clip's transform); None: float [3, H, W] in [0, 1].
        tokenizer: list of str -> long [N, L]; None: WordTokenizer(VOCAB, context_length).
        context_length: of the default tokenizer.
        test_fraction: share of the jitter values held out per combination (multiple of 1/25).
        with_index: items are (image, tokens, index).

    Attributes:
        images: uint8 [N, 32, 32, 3] (design resolution); captions: list of N str;
        labels: long [N, len(ATTRIBUTES)], class ids in `ATTRIBUTES` order; jitters: long [N];
        attributes (= ATTRIBUTES), classes (= CLASSES).
    """

    def __init__(self, num_samples: int = 4096, *, split: str = "train", seed: int = 0, image_size: int = CANVAS,
                 preprocess=None, tokenizer=None, context_length: int = 32, test_fraction: float = 0.2,
                 with_index: bool = False):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        if not isinstance(image_size, int) or image_size < CANVAS:
            raise ValueError(f"image_size must be an int >= {CANVAS} (the design canvas), got {image_size!r}")
        tokenizer = WordTokenizer(VOCAB, context_length) if tokenizer is None else tokenizer
        self._init_common(preprocess, tokenizer, with_index, "raise", 0.0)
        self.split, self.seed, self.image_size, self.test_fraction = split, seed, image_size, test_fraction
        self.source = f"SyntheticShapes(split={split!r}, seed={seed})"
        self.attributes, self.classes = ATTRIBUTES, CLASSES
        labels, jitters = _draw(num_samples, seed, split, test_fraction)
        self.images = render(labels, jitters)
        self.labels = torch.from_numpy(labels)
        self.jitters = torch.from_numpy(jitters)
        self.captions = [caption_for(row) for row in labels.tolist()]

    def __len__(self) -> int:
        return len(self.captions)

    def label(self, index: int) -> dict[str, str]:
        """Attribute -> class name of sample `index`."""
        return {a: CLASSES[a][int(v)] for a, v in zip(ATTRIBUTES, self.labels[index], strict=False)}

    def image(self, index: int):
        """Sample `index` as a PIL RGB image of image_size x image_size."""
        from PIL import Image

        im = Image.fromarray(self.images[index])
        return im if self.image_size == CANVAS else im.resize((self.image_size,) * 2, Image.NEAREST)

    def _load(self, index: int):
        return self.image(index), self.captions[index]

    @staticmethod
    def zero_shot_prompts(attribute: str) -> list[list[str]]:
        """Per class of `attribute` (CLASSES order), its prompts (ZERO_SHOT_TEMPLATES filled with the class name)."""
        if attribute not in CLASSES:
            raise ValueError(f"unknown attribute {attribute!r}; attributes are {ATTRIBUTES}")
        return [[t.format(name) for t in ZERO_SHOT_TEMPLATES[attribute]] for name in CLASSES[attribute]]

    def _encoded(self, index: int, fmt: str) -> bytes:
        buf = io.BytesIO()
        self.image(index).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
        return buf.getvalue()

    def write_csv(self, directory: str | os.PathLike, *, ext: str = "png", sep: str = "\t") -> str:
        """Write the images to `directory/{split}/{i:06d}.{ext}` and a table `directory/{split}.tsv` (or .csv when
        sep is ",") with columns filepath (relative), title, and one column per attribute. Returns the table path."""
        fmt = _format(ext)
        directory = os.fspath(directory)
        os.makedirs(os.path.join(directory, self.split), exist_ok=True)
        table = os.path.join(directory, f"{self.split}.{'csv' if sep == ',' else 'tsv'}")
        with open(table, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, delimiter=sep)
            writer.writerow(["filepath", "title", *ATTRIBUTES])
            for i in range(len(self)):
                rel = f"{self.split}/{i:06d}.{ext}"
                with open(os.path.join(directory, rel), "wb") as img:
                    img.write(self._encoded(i, fmt))
                writer.writerow([rel, self.captions[i], *self.label(i).values()])
        return table

    def write_webdataset(self, directory: str | os.PathLike, *, samples_per_shard: int = 1000,
                         ext: str = "png") -> str:
        """Write tar shards `directory/{split}-{k:06d}.tar` (members {i:09d}.{ext}, .txt caption, .json labels),
        byte-identical for the same dataset. Returns the brace pattern of the shards, for WebDatasetCaptions."""
        import json

        fmt = _format(ext)
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        num_shards = -(-len(self) // samples_per_shard)
        for k in range(num_shards):
            with tarfile.open(os.path.join(directory, f"{self.split}-{k:06d}.tar"), "w",
                              format=tarfile.USTAR_FORMAT) as tar:
                for i in range(k * samples_per_shard, min(len(self), (k + 1) * samples_per_shard)):
                    members = ((ext, self._encoded(i, fmt)), ("txt", self.captions[i].encode()),
                               ("json", json.dumps(self.label(i)).encode()))
                    for suffix, data in members:
                        info = tarfile.TarInfo(f"{i:09d}.{suffix}")
                        info.size, info.mtime, info.mode = len(data), 0, 0o644
                        tar.addfile(info, io.BytesIO(data))
        last = num_shards - 1
        name = f"{self.split}-{{000000..{last:06d}}}.tar" if last > 0 else f"{self.split}-000000.tar"
        return os.path.join(directory, name)


def _format(ext: str) -> str:
    formats = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG"}
    if ext not in formats:
        raise ValueError(f"ext must be one of {tuple(formats)}, got {ext!r}")
    return formats[ext]


# --------------------------------------------------------------------------------------------------- shift design
# ShiftShapes: the data of `clipmoe demo`, a miniature of CLIP-MoE's setting (a web-trained base, fine-tuned on
# re-captioned data). Six attributes of three values each (k-means with k = 3 per modality can isolate any one);
# pre-training captions name only the three easy ones (the alt-text analogue), fine-tuning uses NEW samples whose
# captions name all six (the re-caption analogue).
# Pixels (version 2): a 36-px canvas as a 3 x 3 grid of 12-px cells, the patch grid of the demo's tiny ViT (patch
# 12). Position is the column, count the cells filled in it (one: the middle; two: top and bottom; three: all), and
# every object sits in the middle of its own cell, so one patch token sees one whole object: shape and texture are in
# a single token instead of spread over fragments cut by patch borders (version 1: 32 px, 8-px patches, objects of
# 5-9 px centred on patch corners, where shape and texture stayed at chance for every model, base included).
# Shapes are a horizontal bar, a vertical bar and a cross: most of their pixels differ pairwise (circle and square
# differ in a few corner pixels, and a direct fine-tune read them at 37-40 %). Captions name the shape in the
# singular with "object(s)" carrying the number ("two medium red striped bar objects"), so each shape is one word
# (with "bar"/"bars" the fine-tuned text tower has two unrelated untrained embeddings per shape to merge).
# Rendering otherwise as SyntheticShapes: 4x supersampling, the same nuisance jitter and the same kind of held-out
# split, textures that keep the mean colour (here 2-px stripes / checker cells).
SHIFT_VERSION = 2
SHIFT_ATTRIBUTES = ("colour", "size", "position", "shape", "texture", "count")
SHIFT_CLASSES: dict[str, tuple[str, ...]] = {
    "colour": ("red", "green", "blue"),
    "size": ("small", "medium", "large"),
    "position": ("left", "centre", "right"),
    "shape": ("bar", "pillar", "cross"),
    "texture": ("plain", "striped", "checkered"),
    "count": ("one", "two", "three"),
}
SHIFT_EASY = ("colour", "size", "position")           # the attributes the short (pre-training) captions name
SHIFT_PALETTE = np.array([(175, 40, 40), (40, 165, 50), (50, 80, 175)], dtype=np.float32)
SHIFT_CELL = 12                                        # px; the demo model's patch size
SHIFT_CANVAS = 3 * SHIFT_CELL                          # image size (px)
SHIFT_SIZES = (6.0, 8.0, 10.0)                         # object size d (px), inside a 12-px cell with the jitter
SHIFT_ROWS = {1: (1,), 2: (0, 2), 3: (0, 1, 2)}         # cell rows filled, by count
SHIFT_TEXTURE_PERIOD = 2                               # px per stripe / checker cell
SHIFT_SOURCES = {"pretrain": 10, "finetune": 11, "test": 1}     # independent draws (RNG streams)
SHIFT_PROMPTS: dict[str, tuple[str, ...]] = {
    "colour": ("{} objects", "a {} object"), "size": ("{} objects", "a {} object"),
    "position": ("objects at the {}", "an object at the {}"), "shape": ("{} objects", "a {} object"),
    "texture": ("{} objects", "a {} object"), "count": ("{} objects", "{} objects at the"),
}
SHIFT_VOCAB: tuple[str, ...] = tuple(dict.fromkeys(
    [w for attr in SHIFT_ATTRIBUTES for w in SHIFT_CLASSES[attr]] + ["a", "an", "at", "the", "object", "objects"]))
SHIFT_CONTEXT = 16

_SHIFT_MASKS: dict[tuple[int, int, int, int, int], np.ndarray] = {}


def _shift_mask(shape: int, size: int, count: int, position: int, jitter: int) -> np.ndarray:
    key = (shape, size, count, position, jitter)
    if key not in _SHIFT_MASKS:
        from PIL import Image, ImageDraw

        big = Image.new("L", (SHIFT_CANVAS * SUPERSAMPLE,) * 2, 0)
        draw = ImageDraw.Draw(big)
        dx, dy = JITTER[jitter % len(JITTER)], JITTER[jitter // len(JITTER)]
        for row in SHIFT_ROWS[count + 1]:
            draw_shape(draw, SHIFT_CLASSES["shape"][shape], (position + 0.5) * SHIFT_CELL + dx,
                       (row + 0.5) * SHIFT_CELL + dy, SHIFT_SIZES[size])
        _SHIFT_MASKS[key] = np.asarray(big.resize((SHIFT_CANVAS,) * 2, Image.BOX), dtype=np.float32) / 255.0
    return _SHIFT_MASKS[key]


def shift_render(labels: np.ndarray, jitters: np.ndarray) -> np.ndarray:
    """Images for ShiftShapes labels [N, 6] (SHIFT_ATTRIBUTES order) and jitter ids [N] -> uint8 [N, 36, 36, 3]."""
    labels = np.asarray(labels, dtype=np.int64)
    col, size, pos, shape, tex, count = (labels[:, a] for a in range(len(SHIFT_ATTRIBUTES)))
    masks = np.stack([_shift_mask(*k) for k in zip(shape.tolist(), size.tolist(), count.tolist(), pos.tolist(),
                                                   np.asarray(jitters).tolist(), strict=True)])
    return composite(masks, SHIFT_PALETTE[col], texture_patterns(SHIFT_CANVAS, SHIFT_TEXTURE_PERIOD)[tex])


def shift_caption(labels: Sequence[int], style: str = "full") -> str:
    """"full": every attribute ("two medium red striped bar objects at the left"); "short": the easy ones only
    ("a medium red object at the left")."""
    name = {a: SHIFT_CLASSES[a][int(v)] for a, v in zip(SHIFT_ATTRIBUTES, labels, strict=False)}
    if style == "short":
        return f"a {name['size']} {name['colour']} object at the {name['position']}"
    if style != "full":
        raise ValueError(f"caption style must be 'short' or 'full', got {style!r}")
    noun = "object" if name["count"] == "one" else "objects"
    return (f"{name['count']} {name['size']} {name['colour']} {name['texture']} {name['shape']} {noun} at the "
            f"{name['position']}")


class ShiftShapes(torch.utils.data.Dataset):
    """The miniature's data (design above), with items (float image [3, 36, 36] in [0, 1], tokens [16]).

    Args:
        num_samples: samples to draw.
        source: "pretrain" (train split, short captions: the base's web data), "finetune" (train split, NEW
            samples, full captions: the re-captioned data) or "test" (held-out split: jitter values no training
            image has for that attribute combination).
        captions: "short" or "full" (default: short for pretrain, full otherwise).
        seed: everything (split table, attributes, jitter) derives from it.

    Attributes: images uint8 [N, 36, 36, 3]; labels long [N, 6] (SHIFT_ATTRIBUTES order); captions (the chosen
    style), short_captions, full_captions; tokens long [N, 16]; tokenizer (WordTokenizer over SHIFT_VOCAB);
    attributes, classes.
    """

    attributes, classes = SHIFT_ATTRIBUTES, SHIFT_CLASSES

    def __init__(self, num_samples: int, *, source: str = "finetune", captions: str | None = None,
                 seed: int = 0, test_fraction: float = 0.2):
        if source not in SHIFT_SOURCES:
            raise ValueError(f"source must be one of {tuple(SHIFT_SOURCES)}, got {source!r}")
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        captions = captions or ("short" if source == "pretrain" else "full")
        if captions not in ("short", "full"):
            raise ValueError(f"captions must be 'short' or 'full', got {captions!r}")
        self.source, self.seed, self.caption_style = source, seed, captions
        cards = [len(SHIFT_CLASSES[a]) for a in SHIFT_ATTRIBUTES]
        labels, jitters = _draw(num_samples, seed, "test" if source == "test" else "train", test_fraction, cards,
                                version=1000 + SHIFT_VERSION, stream=SHIFT_SOURCES[source])
        self.images = shift_render(labels, jitters)
        self.labels, self.jitters = torch.from_numpy(labels), torch.from_numpy(jitters)
        self.short_captions = [shift_caption(row, "short") for row in labels.tolist()]
        self.full_captions = [shift_caption(row, "full") for row in labels.tolist()]
        self.captions = self.short_captions if captions == "short" else self.full_captions
        self.tokenizer = WordTokenizer(SHIFT_VOCAB, SHIFT_CONTEXT)
        self.tokens = self.tokenizer(self.captions)
        self._pixels = torch.from_numpy(self.images).permute(0, 3, 1, 2)

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int):
        return self._pixels[index].float() / 255.0, self.tokens[index]

    @staticmethod
    def zero_shot_prompts(attribute: str) -> list[list[str]]:
        """Per class of `attribute`, its prompts: SHIFT_PROMPTS filled with the class name, then every full caption
        that names the class (the caption grammar as the template set, as CLIP ensembles its 80 templates; the
        other attributes average out). Why: a fine-tuned text tower has only seen full captions, and on the short
        prompts alone ("a circle") its words for the hard attributes land off the directions its captions use
        (measured on version-2 images with circles and squares, one direct fine-tune: shape 37 %, texture 69 %,
        count 71 % with the short prompts; 40 %, 73 %, 85 % with the ensemble; no attribute lost)."""
        if attribute not in SHIFT_CLASSES:
            raise ValueError(f"unknown attribute {attribute!r}; attributes are {SHIFT_ATTRIBUTES}")
        names = SHIFT_CLASSES[attribute]
        short = [[t.format(name) for t in SHIFT_PROMPTS[attribute]] for name in names]
        j = SHIFT_ATTRIBUTES.index(attribute)
        rows = itertools.product(*(range(len(SHIFT_CLASSES[a])) for a in SHIFT_ATTRIBUTES))
        full: list[list[str]] = [[] for _ in names]
        for row in rows:
            full[row[j]].append(shift_caption(row, "full"))
        return [s + f for s, f in zip(short, full, strict=True)]
