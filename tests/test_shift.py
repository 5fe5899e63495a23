"""ShiftShapes, the data of `clipmoe demo`: the caption shift (short pre-training captions, NEW fine-tuning samples
with full captions), the held-out split, three values per attribute that k-means can isolate, hard attributes that
are in the pixels (a linear probe reads them) and in one patch token of the demo's ViT, and the zero-shot prompts."""
import itertools

import numpy as np
import pytest
import torch

from clipmoe.data.synthetic import (
    BACKGROUND,
    SHIFT_ATTRIBUTES,
    SHIFT_CANVAS,
    SHIFT_CELL,
    SHIFT_CLASSES,
    SHIFT_EASY,
    ShiftShapes,
    shift_caption,
)
from clipmoe.eval.stats import normalized_mutual_info
from clipmoe.train.cluster import kmeans


def _keys(ds):
    return [tuple(r) + (j,) for r, j in zip(ds.labels.tolist(), ds.jitters.tolist(), strict=True)]


def test_caption_shift():
    pre, fine = ShiftShapes(600, source="pretrain"), ShiftShapes(600)
    hard_words = {w for a in SHIFT_ATTRIBUTES if a not in SHIFT_EASY for w in SHIFT_CLASSES[a]}
    for ds, style in ((pre, "short"), (fine, "full")):
        assert ds.caption_style == style
        for row, caption in zip(ds.labels.tolist(), ds.captions, strict=True):
            named = {a: SHIFT_CLASSES[a][v] for a, v in zip(SHIFT_ATTRIBUTES, row, strict=True)}
            words = caption.split()
            if style == "short":  # the easy attributes only
                assert not hard_words & set(words)
                assert all(named[a] in words for a in SHIFT_EASY)
            else:  # every attribute, each as one word (the shape in the singular; "object(s)" carries the number)
                assert all(named[a] in words for a in SHIFT_ATTRIBUTES)
                assert words[5] == ("object" if named["count"] == "one" else "objects")
    assert shift_caption([0, 2, 1, 2, 1, 1], "full") == "two large red striped cross objects at the centre"
    assert shift_caption([2, 0, 2, 0, 0, 0], "full") == "one small blue plain bar object at the right"
    assert shift_caption([0, 2, 1, 2, 1, 1], "short") == "a large red object at the centre"
    assert (pre.tokens.max(1).values == pre.tokenizer.eot_id).all() and (fine.tokens[:, -1] == 0).all()
    assert (fine.tokens != fine.tokenizer.unk_id).all() and (pre.tokens != pre.tokenizer.unk_id).all()
    # the fine-tuning samples are new draws, not the pre-training samples re-captioned
    same = sum(a == b for a, b in zip(_keys(pre), _keys(fine), strict=True))
    assert same < 10
    with pytest.raises(ValueError, match="source"):
        ShiftShapes(4, source="web")
    with pytest.raises(ValueError, match="captions"):
        ShiftShapes(4, captions="long")


def test_held_out_split_and_determinism():
    train, test = ShiftShapes(3000), ShiftShapes(800, source="test")
    assert not set(_keys(train)) & set(_keys(test))  # no held-out image is a training image
    again = ShiftShapes(800, source="test")
    assert again.images.tobytes() == test.images.tobytes() and again.captions == test.captions
    assert ShiftShapes(800, source="test", seed=1).images.tobytes() != test.images.tobytes()
    image, tokens = test[3]
    assert image.shape == (3, SHIFT_CANVAS, SHIFT_CANVAS) and image.dtype == torch.float32
    assert 0 <= image.min() <= image.max() <= 1
    assert tokens.shape == (16,) and torch.equal(tokens, test.tokenizer([test.full_captions[3]])[0])
    for j, attribute in enumerate(SHIFT_ATTRIBUTES):  # three values, all present, roughly balanced
        counts = torch.bincount(train.labels[:, j], minlength=3)
        assert len(SHIFT_CLASSES[attribute]) == 3 and counts.min() > 0.8 * len(train) / 3


def _ridge_accuracy(x, labels, xt, labels_t, columns, ridge=10.0):
    """Ridge regression onto one-hot labels (3 classes per column), solved in the dual; test accuracy per column."""
    mu = x.mean(0)
    x, xt = x - mu, xt - mu
    targets = np.eye(3)[labels[:, columns]].reshape(len(x), -1)
    dual = np.linalg.solve(x @ x.T + ridge * np.eye(len(x)), targets)
    scores = (xt @ x.T @ dual).reshape(len(xt), len(columns), 3)
    return {c: float((scores[:, i].argmax(1) == labels_t[:, c]).mean()) for i, c in enumerate(columns)}


def test_hard_attributes_sit_whole_in_one_patch():
    """The demo's ViT cuts the image into 12-px patches: each object fills the middle of its own cell, so the one
    patch token of an object's cell holds its shape and texture (in version 1 objects straddled patch borders and
    both stayed at chance for every model). A ridge probe on that single cell's pixels reads both."""
    train, test = ShiftShapes(2000), ShiftShapes(500, source="test")
    assert SHIFT_CANVAS == 3 * SHIFT_CELL

    def first_cell(ds):  # the top filled cell of the object's column: row 1 for one object, else row 0
        rows = np.where(ds.labels[:, SHIFT_ATTRIBUTES.index("count")].numpy() == 0, 1, 0)
        cols = ds.labels[:, SHIFT_ATTRIBUTES.index("position")].numpy()
        cells = [ds.images[i, r * SHIFT_CELL:(r + 1) * SHIFT_CELL, c * SHIFT_CELL:(c + 1) * SHIFT_CELL]
                 for i, (r, c) in enumerate(zip(rows, cols, strict=True))]
        return np.stack(cells).reshape(len(ds), -1).astype(np.float64) / 255

    hard = [SHIFT_ATTRIBUTES.index(a) for a in ("shape", "texture")]
    accuracy = _ridge_accuracy(first_cell(train), train.labels.numpy(), first_cell(test), test.labels.numpy(), hard)
    assert min(accuracy.values()) > 0.9, accuracy
    # and nothing of the object leaks into the neighbouring cell's patch (the background there stays uniform)
    one = test.labels[:, SHIFT_ATTRIBUTES.index("count")].numpy() == 0
    top = test.images[one, :SHIFT_CELL].astype(np.int64)
    assert np.abs(top - np.array(BACKGROUND)).max() == 0


def test_zero_shot_prompts_ensemble_the_caption_grammar():
    for j, attribute in enumerate(SHIFT_ATTRIBUTES):
        prompts = ShiftShapes.zero_shot_prompts(attribute)
        assert len(prompts) == 3
        for value, class_prompts in enumerate(prompts):
            full = class_prompts[2:]  # after the short templates: every full caption naming the class, once
            named = {shift_caption(row, "full") for row in itertools.product(range(3), repeat=6) if row[j] == value}
            assert len(full) == len(set(full)) == 3 ** 5 and set(full) == named
            name = SHIFT_CLASSES[attribute][value]
            assert all(name in p for p in class_prompts[:2])  # then the short templates
    with pytest.raises(ValueError, match="attribute"):
        ShiftShapes.zero_shot_prompts("weight")


def test_kmeans_isolates_an_attribute_and_hard_attributes_are_in_the_pixels():
    train, test = ShiftShapes(2000), ShiftShapes(500, source="test")
    # k-means with k = 3 on the mean colour (background removed) recovers the colour exactly
    mean_rgb = train.images.reshape(len(train), -1, 3).astype(np.float32).mean(1) - np.float32(BACKGROUND)
    _, labels = kmeans(torch.from_numpy(mean_rgb), 3, seed=0)
    assert normalized_mutual_info(labels.numpy(), train.labels[:, 0].numpy()) > 0.99
    # ridge probe on raw pixels: every attribute, hard ones included, is readable far above chance (1/3)
    pixels = [ds.images.reshape(len(ds), -1).astype(np.float64) / 255 for ds in (train, test)]
    accuracy = _ridge_accuracy(pixels[0], train.labels.numpy(), pixels[1], test.labels.numpy(),
                               list(range(len(SHIFT_ATTRIBUTES))))
    for j, attribute in enumerate(SHIFT_ATTRIBUTES):
        assert accuracy[j] > 0.7, (attribute, accuracy[j])
    # and the mean colour alone does not give the hard ones (texture keeps the mean colour)
    assert normalized_mutual_info(labels.numpy(), train.labels[:, SHIFT_ATTRIBUTES.index("texture")].numpy()) < 0.01
