"""ShiftShapes, the data of `clipmoe demo`: the caption shift (short pre-training captions, NEW fine-tuning samples
with full captions), the held-out split, three values per attribute that k-means can isolate, and hard attributes
that are in the pixels (a linear probe reads them)."""
import numpy as np
import pytest
import torch

from clipmoe.data.synthetic import BACKGROUND, SHIFT_ATTRIBUTES, SHIFT_CLASSES, SHIFT_EASY, ShiftShapes, shift_caption
from clipmoe.eval.stats import normalized_mutual_info
from clipmoe.train.cluster import kmeans


def _keys(ds):
    return [tuple(r) + (j,) for r, j in zip(ds.labels.tolist(), ds.jitters.tolist(), strict=True)]


def test_caption_shift():
    pre, fine = ShiftShapes(600, source="pretrain"), ShiftShapes(600)
    hard_words = {w for a in SHIFT_ATTRIBUTES if a not in SHIFT_EASY for w in SHIFT_CLASSES[a]} | {
        "circles", "squares", "crosses"}
    for ds, style in ((pre, "short"), (fine, "full")):
        assert ds.caption_style == style
        for row, caption in zip(ds.labels.tolist(), ds.captions, strict=True):
            named = {a: SHIFT_CLASSES[a][v] for a, v in zip(SHIFT_ATTRIBUTES, row, strict=True)}
            words = caption.split()
            if style == "short":  # the easy attributes only
                assert not hard_words & set(words)
                assert all(named[a] in words for a in SHIFT_EASY)
            else:
                assert all(named[a] in words or named[a] + "s" in words or named[a] + "es" in words
                           for a in SHIFT_ATTRIBUTES)
    assert shift_caption([0, 2, 1, 2, 1, 1], "full") == "two large red striped crosses at the centre"
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
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    assert tokens.shape == (16,) and torch.equal(tokens, test.tokenizer([test.full_captions[3]])[0])
    for j, attribute in enumerate(SHIFT_ATTRIBUTES):  # three values, all present, roughly balanced
        counts = torch.bincount(train.labels[:, j], minlength=3)
        assert len(SHIFT_CLASSES[attribute]) == 3 and counts.min() > 0.8 * len(train) / 3


def test_kmeans_isolates_an_attribute_and_hard_attributes_are_in_the_pixels():
    train, test = ShiftShapes(2000), ShiftShapes(500, source="test")
    # k-means with k = 3 on the mean colour (background removed) recovers the colour exactly
    mean_rgb = train.images.reshape(len(train), -1, 3).astype(np.float32).mean(1) - np.float32(BACKGROUND)
    _, labels = kmeans(torch.from_numpy(mean_rgb), 3, seed=0)
    assert normalized_mutual_info(labels.numpy(), train.labels[:, 0].numpy()) > 0.99
    # ridge probe on raw pixels: every attribute, hard ones included, is readable far above chance (1/3)
    x = train.images.reshape(len(train), -1).astype(np.float64) / 255
    mu = x.mean(0)
    x, xt = x - mu, test.images.reshape(len(test), -1).astype(np.float64) / 255 - mu
    dual = np.linalg.solve(x @ x.T + 10 * np.eye(len(x)), np.eye(3)[train.labels.numpy()].reshape(len(x), -1))
    scores = (xt @ x.T @ dual).reshape(len(xt), len(SHIFT_ATTRIBUTES), 3)  # ridge, solved in the dual
    for j, attribute in enumerate(SHIFT_ATTRIBUTES):
        accuracy = (scores[:, j].argmax(1) == test.labels[:, j].numpy()).mean()
        assert accuracy > 0.7, (attribute, accuracy)
    # and the mean colour alone does not give the hard ones (texture keeps the mean colour)
    assert normalized_mutual_info(labels.numpy(), train.labels[:, SHIFT_ATTRIBUTES.index("texture")].numpy()) < 0.01
