"""Data: CSV/TSV and webdataset loaders on small files written here, bad-input errors, and the synthetic dataset
(determinism, held-out split, labels vs captions, attribute independence, salience design, file exports)."""
import csv
import hashlib
import io
import itertools
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from clipmoe.data.datasets import (
    CsvCaptionDataset,
    InMemoryCaptionDataset,
    collate_skip_none,
    make_transforms_and_tokenizer,
)
from clipmoe.data.synthetic import (
    ATTRIBUTES,
    CLASSES,
    VOCAB,
    SyntheticShapes,
    WordTokenizer,
    caption_for,
    parse_caption,
)
from clipmoe.data.webdataset import WebDatasetCaptions
from tests.tar_files import write_tar


# ---------------------------------------------------------------------------------------------------------- helpers
def _image(i: int, size=(12, 10)) -> Image.Image:
    """A small image whose top-left pixel encodes i (to check which sample came back)."""
    arr = np.full((size[1], size[0], 3), 30, np.uint8)
    arr[0, 0] = (i, 255 - i, 7)
    return Image.fromarray(arr)


def _encode(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def _write_table(path, rows, sep="\t", header=("filepath", "title")):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=sep)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def _write_images(folder, n, fmt="PNG", ext="png"):
    os.makedirs(folder, exist_ok=True)
    names = []
    for i in range(n):
        name = f"{i:03d}.{ext}"
        _image(i).save(os.path.join(folder, name), format=fmt)
        names.append(name)
    return names


def _pixel_id(image: torch.Tensor) -> int:
    """Inverse of _image for the default preprocess (float [3, H, W] in [0, 1])."""
    return int(round(image[0, 0, 0].item() * 255))


# -------------------------------------------------------------------------------------------------------------- CSV
def test_tsv_relative_and_absolute_paths_with_index(tmp_path):
    names = _write_images(tmp_path / "imgs", 4)
    rows = [[f"imgs/{n}", f"caption {i}"] for i, n in enumerate(names)]
    rows[3][0] = str(tmp_path / "imgs" / names[3])  # absolute path
    table = _write_table(tmp_path / "train.tsv", rows)
    tok = WordTokenizer(["caption"], context_length=8)

    ds = CsvCaptionDataset(table, tokenizer=tok, with_index=True)
    assert len(ds) == 4 and ds.captions[2] == "caption 2"
    image, tokens, index = ds[2]
    assert image.shape == (3, 10, 12) and image.dtype == torch.float32 and _pixel_id(image) == 2
    assert tokens.shape == (8,) and tokens.dtype == torch.long and index == 2
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch[0].shape == (4, 3, 10, 12) and batch[1].shape == (4, 8) and batch[2].tolist() == [0, 1, 2, 3]
    assert [_pixel_id(im) for im in batch[0]] == [0, 1, 2, 3]

    plain = CsvCaptionDataset(table)  # no tokenizer: the caption string
    assert plain[1][1] == "caption 1" and len(plain[1]) == 2


def test_csv_separator_custom_keys_root_and_jpg(tmp_path):
    names = _write_images(tmp_path / "pics", 3, fmt="JPEG", ext="jpg")
    os.makedirs(tmp_path / "meta")
    rows = [[n, f"a, quoted caption {i}", "x"] for i, n in enumerate(names)]
    table = _write_table(tmp_path / "meta" / "data.csv", rows, sep=",", header=("image", "caption", "other"))
    ds = CsvCaptionDataset(table, img_key="image", caption_key="caption", sep=",", root=tmp_path / "pics")
    assert ds[2][1] == "a, quoted caption 2" and ds[2][0].shape == (3, 10, 12)


def test_csv_errors_name_the_file_and_problem(tmp_path):
    missing = tmp_path / "nope.tsv"
    with pytest.raises(FileNotFoundError, match="nope.tsv"):
        CsvCaptionDataset(missing)

    names = _write_images(tmp_path / "imgs", 2)
    wrong_cols = _write_table(tmp_path / "cols.tsv", [[f"imgs/{n}", "c"] for n in names], header=("path", "title"))
    with pytest.raises(ValueError, match=r"cols\.tsv: no column 'filepath'.*\['path', 'title'\]"):
        CsvCaptionDataset(wrong_cols)
    wrong_sep = _write_table(tmp_path / "sep.csv", [[f"imgs/{n}", "c"] for n in names], sep=",")
    with pytest.raises(ValueError, match=r"sep\.csv: no column 'filepath'.*separator"):
        CsvCaptionDataset(wrong_sep)  # tab is the default separator

    empty_cap = _write_table(tmp_path / "empty.tsv", [[f"imgs/{names[0]}", "fine"], [f"imgs/{names[1]}", "  "]])
    with pytest.raises(ValueError, match=r"empty\.tsv: 1 of 2 rows have an empty caption .*line\(s\) \[3\]"):
        CsvCaptionDataset(empty_cap)
    header_only = _write_table(tmp_path / "header.tsv", [])
    with pytest.raises(ValueError, match="header.tsv: no data rows"):
        CsvCaptionDataset(header_only)

    gone = _write_table(tmp_path / "gone.tsv", [[f"imgs/{names[0]}", "a"], ["imgs/missing.png", "b"]])
    with pytest.raises(FileNotFoundError, match=r"gone\.tsv: 1 of 2 image files not found.*missing\.png"):
        CsvCaptionDataset(gone, check_files=True)
    ds = CsvCaptionDataset(gone)  # without check_files the read fails, naming the image and the CSV line
    assert ds[0][0].shape == (3, 10, 12)
    with pytest.raises(FileNotFoundError, match=r"gone\.tsv: 1 of 2 samples are bad.*missing\.png \(line 3"):
        ds[1]


def test_unreadable_image_is_skipped_and_counted(tmp_path, caplog):
    names = _write_images(tmp_path / "imgs", 20)
    (tmp_path / "imgs" / names[7]).write_bytes(b"not a png at all")
    table = _write_table(tmp_path / "t.tsv", [[f"imgs/{n}", f"c {i}"] for i, n in enumerate(names)])

    ds = CsvCaptionDataset(table, with_index=True, max_bad_fraction=0.1)
    with caplog.at_level(logging.WARNING, logger="clipmoe.data.datasets"):
        batches = list(DataLoader(ds, batch_size=8, collate_fn=collate_skip_none))
    indices = torch.cat([b[2] for b in batches]).tolist()
    assert indices == [i for i in range(20) if i != 7]
    assert ds.num_skipped == 1 and list(ds.bad_samples) == [7] and "unreadable image" in ds.bad_samples[7]
    assert any(names[7] in r.getMessage() for r in caplog.records)

    # DataLoader workers share the counter
    ds = CsvCaptionDataset(table, with_index=True, max_bad_fraction=0.1)
    got = list(DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate_skip_none))
    assert sum(len(b[2]) for b in got) == 19 and ds.num_skipped == 1

    # substitute: full batches; the substitute keeps its own index
    ds = CsvCaptionDataset(table, with_index=True, max_bad_fraction=0.1, on_error="substitute")
    image, _, index = ds[7]
    assert index == 8 and _pixel_id(image) == 8 and ds.num_skipped == 1
    assert all(len(b[2]) == 4 for b in DataLoader(ds, batch_size=4))

    # over the limit (default 1%): the read raises, naming the file
    ds = CsvCaptionDataset(table)
    with pytest.raises(ValueError, match=rf"t\.tsv: 1 of 20 samples are bad.*{names[7]}.*unreadable image"):
        ds[7]
    ds = CsvCaptionDataset(table, on_error="raise", max_bad_fraction=0.5)
    with pytest.raises(ValueError, match=rf"{names[7]}.*unreadable image"):
        ds[7]


def test_in_memory_dataset():
    images = [_encode(_image(i), "PNG") for i in range(3)] + [b"garbage"]
    ds = InMemoryCaptionDataset(images, ["a", "b", "c", "d"], with_index=True, max_bad_fraction=0.5,
                                names=["s0", "s1", "s2", "s3"])
    assert _pixel_id(ds[1][0]) == 1 and ds[-1] is None and ds.num_skipped == 1
    with pytest.raises(IndexError):
        ds[4]


# ------------------------------------------------------------------------------------------------------ webdataset
def _shards(tmp_path, n_shards=3, per_shard=4):
    paths, captions = [], []
    for s in range(n_shards):
        samples = []
        for j in range(per_shard):
            i = s * per_shard + j
            fmt, ext = ("PNG", "png") if i % 2 else ("JPEG", "jpg")
            samples.append((f"{i:06d}", {ext: _encode(_image(i), fmt), "txt": f"caption {i}".encode(),
                                         "json": b"{}"}))
            captions.append(f"caption {i}")
        paths.append(write_tar(tmp_path / f"shard-{s:06d}.tar", samples))
    return paths, captions


def test_webdataset_iterates_all_samples(tmp_path):
    paths, captions = _shards(tmp_path)
    spec = str(tmp_path / "shard-{000000..000002}.tar")
    ds = WebDatasetCaptions(spec, num_samples=12)
    assert ds.urls == paths and len(ds) == 12
    items = list(ds)
    assert [c for _, c in items] == captions and items[0][0].shape == (3, 10, 12)
    assert [_pixel_id(im) for im, _ in items[1::2]] == list(range(1, 12, 2))  # the PNGs (odd i) are exact

    tok = WordTokenizer(["caption"], context_length=6)
    ds = WebDatasetCaptions(paths, tokenizer=tok)  # a list of shards works too
    with pytest.raises(TypeError, match="num_samples"):
        len(ds)
    seen = []
    for images, tokens in DataLoader(ds, batch_size=5, num_workers=2):  # shards 0, 2 and 1
        assert tokens.shape[1] == 6 and images.shape[1:] == (3, 10, 12)
        seen.extend(tokens[:, 2].tolist())
    assert len(seen) == 12  # every sample exactly once over the workers

    shuffled = WebDatasetCaptions(spec, shuffle_shards=True, shuffle_buffer=5, seed=1)
    assert sorted(c for _, c in shuffled) == sorted(captions)


def test_webdataset_to_indexed(tmp_path):
    paths, captions = _shards(tmp_path, n_shards=2)
    ds = WebDatasetCaptions(paths)
    mem = ds.to_indexed(with_index=True)
    assert isinstance(mem, InMemoryCaptionDataset) and len(mem) == 8 and mem.captions == captions
    assert mem[5][2] == 5 and _pixel_id(mem[5][0]) == 5 and mem.names[5].endswith("shard-000001.tar:000005")
    disk = ds.to_indexed(tmp_path / "cache", max_samples=6)
    assert isinstance(disk, CsvCaptionDataset) and len(disk) == 6 and disk.captions == captions[:6]
    assert _pixel_id(disk[3][0]) == 3 and os.path.isfile(tmp_path / "cache" / "index.tsv")


def test_webdataset_bad_samples(tmp_path):
    good = {f"{i:03d}": {"png": _encode(_image(i), "PNG"), "txt": f"c {i}".encode()} for i in range(10)}
    good["003"]["png"] = b"broken"
    del good["005"]["txt"]
    good["008"]["txt"] = b"   "
    shard = write_tar(tmp_path / "bad.tar", list(good.items()))

    ds = WebDatasetCaptions(shard, max_bad_fraction=0.5)
    assert [c for _, c in ds] == [f"c {i}" for i in range(10) if i not in (3, 5, 8)] and ds.num_skipped == 3
    assert len(ds.to_indexed()) == 7
    with pytest.raises(ValueError, match=r"bad\.tar: 3 of 10 samples read so far are bad"):
        list(WebDatasetCaptions(shard))  # default limit 1%

    with pytest.raises(FileNotFoundError, match="missing-000001.tar"):
        WebDatasetCaptions([shard, str(tmp_path / "missing-000001.tar")])
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar file" * 40)
    with pytest.raises(ValueError, match="junk.tar: cannot read the whole shard .invalid header.; 1 of 1 shards"):
        list(WebDatasetCaptions(str(tmp_path / "junk.tar")))


# --------------------------------------------------------------------------------------------- open_clip transforms
def test_make_transforms_and_tokenizer():
    open_clip = pytest.importorskip("open_clip")
    preprocess, tokenizer = make_transforms_and_tokenizer("ViT-B-32")
    assert preprocess(_image(1)).shape == (3, 224, 224) and tokenizer(["a cat"]).shape == (1, 77)

    def tiny(vocab):
        return open_clip.CLIP(embed_dim=16, vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=1,
                                                            head_width=16),
                              text_cfg=dict(context_length=16, vocab_size=vocab, width=32, heads=2, layers=1))

    preprocess, tokenizer = make_transforms_and_tokenizer(tiny(49408))
    ds = SyntheticShapes(8, preprocess=preprocess, tokenizer=tokenizer)
    image, tokens = ds[0]
    assert image.shape == (3, 32, 32) and tokens.shape == (16,) and tokens.max() == 49407
    with pytest.raises(ValueError, match="vocab_size 100.*WordTokenizer"):
        make_transforms_and_tokenizer(tiny(100))
    model = tiny(WordTokenizer().vocab_size)  # the synthetic tokenizer fits a tiny vocabulary
    _, tokens = SyntheticShapes(4, context_length=16)[0]
    with torch.no_grad():
        assert model.encode_text(tokens[None]).shape == (1, 16)


# ------------------------------------------------------------------------------------------------------- synthetic
def test_synthetic_deterministic_from_seed(tmp_path):
    a, b, c = SyntheticShapes(600, seed=3), SyntheticShapes(600, seed=3), SyntheticShapes(600, seed=4)
    assert a.images.tobytes() == b.images.tobytes() and a.captions == b.captions
    assert torch.equal(a.labels, b.labels)
    assert a.images.tobytes() != c.images.tobytes() and a.captions != c.captions
    prefix = SyntheticShapes(100, seed=3)  # the first n samples do not depend on num_samples
    assert prefix.images.tobytes() == a.images[:100].tobytes()
    # the files too: same seed -> identical bytes
    for ds, out in ((a, "a"), (b, "b")):
        ds.write_webdataset(tmp_path / out, samples_per_shard=250)
    for name in sorted(os.listdir(tmp_path / "a")):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert sorted(os.listdir(tmp_path / "a")) == [f"train-00000{k}.tar" for k in range(3)]


def test_synthetic_items_and_sizes():
    ds = SyntheticShapes(16, image_size=64, with_index=True)
    image, tokens, index = ds[5]
    assert image.shape == (3, 64, 64) and tokens.shape == (32,) and index == 5
    assert torch.equal(image[:, ::2, ::2], SyntheticShapes(16)[5][0])  # nearest upscale: same information
    batch = next(iter(DataLoader(ds, batch_size=16)))
    assert batch[0].shape == (16, 3, 64, 64) and batch[2].tolist() == list(range(16))
    with pytest.raises(ValueError, match="image_size"):
        SyntheticShapes(4, image_size=16)
    with pytest.raises(ValueError, match="split"):
        SyntheticShapes(4, split="val")


def test_synthetic_held_out_split_is_disjoint():
    train, test = SyntheticShapes(3000, seed=1), SyntheticShapes(800, seed=1, split="test")
    digest = {hashlib.sha1(im.tobytes()).digest() for im in train.images}
    assert not any(hashlib.sha1(im.tobytes()).digest() in digest for im in test.images)

    def keys(ds):
        return {tuple(row) + (j,) for row, j in zip(ds.labels.tolist(), ds.jitters.tolist(), strict=True)}
    assert not keys(train) & keys(test)
    assert len({tuple(r) for r in test.labels.tolist()} & {tuple(r) for r in train.labels.tolist()}) > 100


def test_synthetic_labels_match_captions():
    ds = SyntheticShapes(2000, seed=2)
    for i in range(len(ds)):
        assert parse_caption(ds.captions[i]) == ds.label(i)
    assert ds.labels.shape == (2000, len(ATTRIBUTES)) and ds.labels.dtype == torch.long
    assert caption_for([0, 0, 0, 1, 1, 0]) == "two small red striped circles at the top left"
    tok = WordTokenizer()
    assert tok.vocab == VOCAB and tok.vocab_size == len(VOCAB) + 4
    ids = tok(ds.captions[:50])
    assert (ids != tok.unk_id).all() and (ids.argmax(1) == 10).all()  # sot + 9 words + eot at the max id
    for attr in ATTRIBUTES:
        prompts = SyntheticShapes.zero_shot_prompts(attr)
        assert len(prompts) == len(CLASSES[attr])
        assert (tok([p for per_class in prompts for p in per_class]) != tok.unk_id).all()
    assert tok(["three large blue crosses"], context_length=4).tolist() == [[tok.sot_id, tok.word_ids["three"],
                                                                            tok.word_ids["large"], tok.eot_id]]


def test_synthetic_attributes_are_independent():
    ds = SyntheticShapes(8000, seed=5)
    labels = ds.labels.numpy()
    n = len(labels)
    for a, b in itertools.combinations(range(len(ATTRIBUTES)), 2):
        ka, kb = len(CLASSES[ATTRIBUTES[a]]), len(CLASSES[ATTRIBUTES[b]])
        counts = np.zeros((ka, kb))
        np.add.at(counts, (labels[:, a], labels[:, b]), 1)
        expected = n / (ka * kb)
        # each cell within 6 binomial standard deviations of uniform (fails only on a real dependence)
        assert np.abs(counts - expected).max() < 6 * np.sqrt(expected), (ATTRIBUTES[a], ATTRIBUTES[b], counts)


def test_synthetic_salience_design():
    """Colour is read from the mean colour alone; texture and shape are not (texture keeps the mean colour)."""
    train, test = SyntheticShapes(3000, seed=0), SyntheticShapes(1000, seed=0, split="test")

    def mean_rgb(ds):
        return ds.images.reshape(len(ds), -1, 3).mean(1)

    xtr, xte = mean_rgb(train), mean_rgb(test)
    accuracy = {}
    for a, attr in enumerate(ATTRIBUTES):
        ytr, yte = train.labels[:, a].numpy(), test.labels[:, a].numpy()
        k = len(CLASSES[attr])
        means = np.stack([xtr[ytr == c].mean(0) for c in range(k)])
        # per-class diagonal Gaussian: the colour model of each class in mean-RGB space
        var = np.stack([xtr[ytr == c].var(0) + 1e-3 for c in range(k)])
        ll = -(((xte[:, None] - means) ** 2) / var + np.log(var)).sum(-1)
        accuracy[attr] = (ll.argmax(1) == yte).mean()
    assert accuracy["colour"] > 0.9, accuracy
    assert accuracy["texture"] < 0.45 and accuracy["shape"] < 0.4, accuracy


def test_synthetic_exports_round_trip(tmp_path):
    ds = SyntheticShapes(30, seed=7, split="test")
    table = ds.write_csv(tmp_path / "csv")
    assert table.endswith("test.tsv")
    loaded = CsvCaptionDataset(table, tokenizer=ds.tokenizer, with_index=True)
    for i in (0, 17, 29):
        assert torch.equal(loaded[i][0], ds[i][0]) and torch.equal(loaded[i][1], ds[i][1])
    with open(table, newline="") as f:
        row = list(csv.DictReader(f, delimiter="\t"))[17]
    assert {a: row[a] for a in ATTRIBUTES} == ds.label(17)

    pattern = ds.write_webdataset(tmp_path / "wds", samples_per_shard=8)
    assert pattern.endswith("test-{000000..000003}.tar")
    streamed = list(WebDatasetCaptions(pattern, tokenizer=ds.tokenizer))
    assert len(streamed) == 30
    assert all(torch.equal(img, ds[i][0]) and torch.equal(tok, ds[i][1]) for i, (img, tok) in enumerate(streamed))
