"""clipmoe.eval.retrieval: metric functions against hand-computed cases, routing statistics of a tiny CLIP-MoE, and
`clipmoe eval` end to end on the synthetic data, a CSV, webdataset shards and a Karpathy JSON."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import clipmoe
from clipmoe import eval as ev
from clipmoe.cli import main as cli_main
from clipmoe.data import eval_sets
from clipmoe.data.synthetic import ATTRIBUTES, SyntheticShapes
from clipmoe.losses import balance_loss
from clipmoe.models import create_model


def scores_as_features(scores):
    """(image_features, text_features) whose dot products are exactly `scores` [N_img, N_txt]."""
    scores = torch.as_tensor(scores, dtype=torch.float32)
    return torch.eye(scores.shape[0]), scores.T.contiguous()


# ------------------------------------------------------------------------------------------------ retrieval metrics
def test_perfect_ranking_scores_100():
    x = F.normalize(torch.randn(12, 16), dim=-1)
    got = ev.retrieval_metrics(x, x, torch.arange(12))
    assert got == {f"{d}_R@{k}": 100.0 for d in ("i2t", "t2i") for k in (1, 5, 10)}


def test_reversed_ranking_scores_0_until_k_reaches_the_gallery():
    # scores |i - j|: every right pair scores 0 and every wrong one > 0, so each answer ranks last (rank 11 of 12)
    n = 12
    idx = torch.arange(n)
    images, texts = scores_as_features((idx[:, None] - idx[None, :]).abs())
    got = ev.retrieval_metrics(images, texts, idx, ks=(1, 5, 10, 11, 12))
    for d in ("i2t", "t2i"):
        assert [got[f"{d}_R@{k}"] for k in (1, 5, 10, 11, 12)] == [0.0, 0.0, 0.0, 0.0, 100.0]


def test_several_captions_per_image_any_caption_counts():
    # 2 images, captions 0, 1 of image 0 and 2, 3 of image 1; scores[image, caption]:
    scores = [[0.1, 0.9, 0.5, 0.2],   # image 0: its best caption (1, 0.9) is first -> hit@1
              [0.8, 0.3, 0.1, 0.7]]   # image 1: its best (3, 0.7) is behind caption 0 (0.8) -> rank 1
    images, texts = scores_as_features(scores)
    got = ev.retrieval_metrics(images, texts, torch.tensor([0, 0, 1, 1]), ks=(1, 2))
    assert got["i2t_R@1"] == 50.0 and got["i2t_R@2"] == 100.0
    # captions: 0 -> images [0.1, 0.8] (miss), 1 -> [0.9, 0.3] (hit), 2 -> [0.5, 0.1] (miss), 3 -> [0.2, 0.7] (hit)
    assert got["t2i_R@1"] == 50.0 and got["t2i_R@2"] == 100.0


def test_an_images_other_captions_never_count_against_it():
    # image 0's three captions take the three best scores; the weakest right one is irrelevant
    scores = [[0.9, 0.8, 0.7, 0.1],
              [0.0, 0.0, 0.0, 0.5]]
    images, texts = scores_as_features(scores)
    got = ev.retrieval_metrics(images, texts, torch.tensor([0, 0, 0, 1]), ks=(1,))
    assert got["i2t_R@1"] == 100.0


def test_ties_count_against_the_model():
    # constant features: every candidate ties, so each answer has (gallery - 1) wrong candidates at >= its score
    x = torch.ones(3, 4) / 2
    got = ev.retrieval_metrics(x, x, torch.arange(3), ks=(1, 2, 3))
    for d in ("i2t", "t2i"):
        assert [got[f"{d}_R@{k}"] for k in (1, 2, 3)] == [0.0, 0.0, 100.0]
    # a single tie at the top: rank 1, a miss at k=1 and a hit at k=2
    scores = [[0.5, 0.5, 0.1],
              [0.2, 0.9, 0.3],
              [0.0, 0.1, 0.8]]
    images, texts = scores_as_features(scores)
    got = ev.retrieval_metrics(images, texts, torch.arange(3), ks=(1, 2))
    assert got["i2t_R@1"] == pytest.approx(200 / 3) and got["i2t_R@2"] == 100.0
    # caption 0's scores over images: [0.5, 0.2, 0.0] (hit); caption 1's: [0.5, 0.9, 0.1] (hit); caption 2's (hit)
    assert got["t2i_R@1"] == 100.0


def test_identical_captions_of_different_images_tie():
    images = torch.eye(3)
    texts = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # captions 0 and 1: the same text
    got = ev.retrieval_metrics(images, texts, torch.arange(3), ks=(1, 2))
    assert got["i2t_R@1"] == pytest.approx(100 / 3) and got["i2t_R@2"] == 100.0
    assert got["t2i_R@1"] == pytest.approx(100 / 3)  # captions 0 and 1 score images 0 and 1 equally


def test_nan_scores_count_against_the_model():
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[float("nan"), 0.0], [0.0, 1.0]])
    got = ev.retrieval_metrics(images, texts, torch.arange(2), ks=(1, 2))
    assert got["i2t_R@1"] == 0.0  # image 0: its caption's score is NaN (miss); image 1: a NaN competitor ties
    assert got["t2i_R@1"] == 50.0 and got["t2i_R@2"] == 50.0  # caption 0 can never be a hit


@pytest.mark.parametrize("num_captions", [1, 3])
def test_one_image(num_captions):
    images = F.normalize(torch.randn(1, 8), dim=-1)
    texts = F.normalize(torch.randn(num_captions, 8), dim=-1)
    got = ev.retrieval_metrics(images, texts, torch.zeros(num_captions, dtype=torch.long))
    assert set(got.values()) == {100.0}


def test_matches_an_argsort_reference_on_random_features(monkeypatch):
    """No ties: the rank is the position of the first right candidate in the sorted list (the usual code)."""
    torch.manual_seed(1)
    num_images, per_image = 37, 3
    images = F.normalize(torch.randn(num_images, 8), dim=-1)
    t2i = torch.arange(num_images).repeat_interleave(per_image)[torch.randperm(num_images * per_image)]
    texts = F.normalize(torch.randn(t2i.numel(), 8) + 0.8 * images[t2i], dim=-1)
    scores = images @ texts.T
    i2t_rank = torch.tensor([(t2i[scores[i].argsort(descending=True)] == i).nonzero()[0].item()
                             for i in range(num_images)])
    t2i_rank = torch.tensor([(scores[:, j].argsort(descending=True) == t2i[j]).nonzero()[0].item()
                             for j in range(t2i.numel())])
    want = {f"i2t_R@{k}": (i2t_rank < k).double().mean().item() * 100 for k in (1, 5, 10)}
    want.update({f"t2i_R@{k}": (t2i_rank < k).double().mean().item() * 100 for k in (1, 5, 10)})
    assert ev.retrieval_metrics(images, texts, t2i) == pytest.approx(want)
    monkeypatch.setattr(ev.metrics, "SCORE_CHUNK_ELEMENTS", 50)  # several score chunks, and a final partial one
    assert ev.retrieval_metrics(images, texts, t2i) == pytest.approx(want)
    assert 0 < want["i2t_R@1"] < 100 and 0 < want["t2i_R@1"] < 100  # the case is not trivial


def test_retrieval_input_errors():
    x = torch.eye(3)
    with pytest.raises(ValueError, match="no caption"):
        ev.retrieval_metrics(x, x, torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="outside"):
        ev.retrieval_metrics(x, x, torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match="shape"):
        ev.retrieval_metrics(x, x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="widths"):
        ev.retrieval_metrics(x, torch.eye(3, 4), torch.arange(3))
    with pytest.raises(ValueError, match="ks"):
        ev.retrieval_metrics(x, x, torch.arange(3), ks=(0,))


# ---------------------------------------------------------------------------------------------- zero-shot metrics
def test_zero_shot_hand_case_with_fewer_classes_than_k():
    classes = torch.eye(3)
    images = torch.tensor([[0.9, 0.1, 0.0],   # label 0: best (hit@1)
                           [0.6, 0.3, 0.1],   # label 1: second (hit@2)
                           [0.5, 0.5, 0.0],   # label 1: tied with class 0, counts against -> rank 1
                           [0.1, 0.2, 0.7]])  # label 0: last (rank 2)
    labels = torch.tensor([0, 1, 1, 0])
    got = ev.zero_shot_metrics(images, classes, labels, ks=(1, 2, 5))
    assert got == {"top1": 25.0, "top2": 75.0, "top5": 100.0}  # top-5 over 3 classes: capped, every image a hit


def test_zero_shot_perfect_and_reversed():
    classes = torch.eye(4)
    labels = torch.tensor([0, 1, 2, 3])
    assert ev.zero_shot_metrics(classes, classes, labels) == {"top1": 100.0, "top5": 100.0}
    reversed_images = 1 - torch.eye(4)  # the right class scores lowest
    assert ev.zero_shot_metrics(reversed_images, classes, labels, ks=(1, 3, 4)) == {"top1": 0.0, "top3": 0.0,
                                                                                   "top4": 100.0}
    with pytest.raises(ValueError, match="labels"):
        ev.zero_shot_metrics(classes, classes, torch.tensor([0, 1, 2, 4]))


class LookupText(nn.Module):
    """encode_text returns table[first token]: a text tower whose outputs the test chooses."""

    def __init__(self, table):
        super().__init__()
        self.table = nn.Parameter(torch.as_tensor(table, dtype=torch.float32))

    def encode_text(self, tokens):
        return self.table[tokens[:, 0]]


def test_class_embeddings_normalise_each_prompt_then_average():
    model = LookupText([[3.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    tokenizer = lambda prompts: torch.tensor([[int(p)] for p in prompts])  # noqa: E731 - prompt "i" -> vector i
    got = ev.class_embeddings(model, tokenizer, [["0", "1"], ["2"], ["0", "0", "1"]], batch_size=2)
    s = 2 ** -0.5
    # class 0: mean([1, 0], [0, 1]) -> [s, s] (the unnormalised mean [1.5, 0.5] would point elsewhere)
    # class 2: mean of [1, 0], [1, 0], [0, 1] = [2/3, 1/3] -> [2, 1] / sqrt(5)
    want = torch.tensor([[s, s], [s, s], [2 / 5 ** 0.5, 1 / 5 ** 0.5]])
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="non-empty list"):
        ev.class_embeddings(model, tokenizer, ["0", "1"])


# -------------------------------------------------------------------------------------------------- tiny CLIP-MoE
@pytest.fixture(scope="module")
def tiny():
    """(clipmoe-tiny upcycled to 4 experts, top-2, in eval mode; its eval transform; its tokenizer)."""
    torch.manual_seed(0)
    model, _, preprocess, tokenizer = create_model("clipmoe-tiny")
    clipmoe.upcycle(model, 4, 2)
    return model.eval(), preprocess, tokenizer


def test_routing_statistics_shares_and_balance_loss(tiny):
    model, _, _ = tiny
    images = [torch.randn(5, 3, 32, 32), torch.randn(3, 3, 32, 32)]
    texts = [torch.randint(1, 1000, (4, 32)), torch.randint(1, 1000, (6, 32))]
    seen = {}  # layer name -> concatenated (router_probs, topk_ids) of both forwards
    moes = {name: m for name, m in model.named_modules() if isinstance(m, clipmoe.MoEFFN)}
    with ev.collect_routing(model) as routing, torch.no_grad():
        for image, text in zip(images, texts, strict=True):
            model.encode_image(image), model.encode_text(text)
            for name, m in moes.items():
                probs, ids = seen.get(name, (m.aux.router_probs[:0], m.aux.topk_ids[:0]))
                seen[name] = (torch.cat([probs, m.aux.router_probs]), torch.cat([ids, m.aux.topk_ids]))
    stats = ev.routing_statistics(model, routing)
    json.dumps(stats)  # JSON-serialisable
    assert stats["source"] == "collected" and list(stats["towers"]) == ["visual", "text"]
    for tower, data in stats["towers"].items():
        assert data["num_layers"] == 2 and all(ev.routing.tower_of(n) == tower for n in data["layers"])
        for name, layer in data["layers"].items():
            probs, ids = seen[name]
            assert layer["num_tokens"] == ids.shape[0] and layer["num_forwards"] == 2
            assert layer["num_tokens"] == (8 * 17 if tower == "visual" else 10 * 32)  # 16 patches + CLS; 32 tokens
            for j in range(2):
                assert sum(layer["choice_share"][j]) == pytest.approx(1.0)
                want = torch.bincount(ids[:, j], minlength=4).double() / ids.shape[0]
                assert layer["choice_share"][j] == pytest.approx(want.tolist())
            assert layer["second_choice_share"] == layer["choice_share"][1]
            assert layer["balance_loss"] == pytest.approx(balance_loss(probs, ids, "paper").item(), rel=1e-5)
            assert layer["balance_loss_topk"] == pytest.approx(balance_loss(probs, ids, "topk").item(), rel=1e-5)
    # hooks are gone: a later forward changes nothing in the collector
    with torch.no_grad():
        model.encode_image(images[0])
    assert ev.routing_statistics(model, routing) == stats
    # without a collector: each layer's last forward (the image forward just run; the texts of the loop)
    last = ev.routing_statistics(model)
    assert last["source"] == "last_forward"
    for name, layer in last["towers"]["visual"]["layers"].items():
        assert layer["num_tokens"] == 5 * 17
        assert layer["balance_loss"] == pytest.approx(moes[name].aux.balance_loss.item(), rel=1e-5)


def test_routing_statistics_errors():
    dense = create_model("clipmoe-tiny")[0]
    with pytest.raises(ValueError, match="no MoEFFN"):
        ev.routing_statistics(dense)
    with ev.collect_routing(dense) as routing:
        pass
    with pytest.raises(ValueError, match="no MoEFFN forward"):
        ev.routing_statistics(dense, routing)


def test_routing_heatmap_is_written(tiny, tmp_path):
    model, _, _ = tiny
    with ev.collect_routing(model) as routing, torch.no_grad():
        model.encode_image(torch.randn(2, 3, 32, 32)), model.encode_text(torch.randint(1, 1000, (2, 32)))
    path = ev.plot_routing_heatmap(ev.routing_statistics(model, routing), tmp_path / "plots" / "routing.png")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(path) > 5000
    with pytest.raises(ValueError, match="towers"):
        ev.plot_routing_heatmap({}, tmp_path / "x.png")


def test_evaluate_synthetic_on_a_tiny_model(tiny):
    model, preprocess, tokenizer = tiny
    model.train()
    data = SyntheticShapes(64, split="test", preprocess=preprocess, tokenizer=tokenizer)
    got = ev.evaluate_synthetic(model, data, tokenizer, batch_size=32)
    assert model.training  # the model's mode is restored
    assert set(got) >= {"retrieval", "zero_shot", "zero_shot_mean_top1"} and got["num_samples"] == 64
    counts = {c: data.captions.count(c) for c in data.captions}
    assert got["num_shared_captions"] == sum(counts[c] > 1 for c in data.captions)
    assert set(got["retrieval"]) == {f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
    assert set(got["zero_shot"]) == set(data.attributes)
    assert all(set(z) == {"top1", "top5"} for z in got["zero_shot"].values())
    assert got["zero_shot"]["size"]["top5"] == 100.0  # 2 classes: top-5 is capped
    assert got["zero_shot_mean_top1"] == pytest.approx(sum(z["top1"] for z in got["zero_shot"].values()) / 6)
    assert all(0 <= v <= 100 for v in got["retrieval"].values())
    # the same features through the public pieces give the same numbers
    images = ev.embed_images(model, data, batch_size=64)
    texts = ev.embed_texts(model, torch.stack([data[i][1] for i in range(64)]), batch_size=64)
    torch.testing.assert_close(images.norm(dim=-1), torch.ones(64))
    assert ev.retrieval_metrics(images, texts, torch.arange(64)) == pytest.approx(got["retrieval"])


def test_model_on_another_device_is_refused():
    with pytest.raises(ValueError, match="model.to"):
        ev.embed_texts(LookupText([[1.0]]), torch.zeros(1, 1, dtype=torch.long), device="meta")


# ------------------------------------------------------------------------------------------------ datasets and CLI
def write_pngs(folder, n):
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (20, 24), (60 * i, 100, 200 - 50 * i)).save(folder / f"img{i}.png")


def test_karpathy_json(tiny, tmp_path):
    model, preprocess, tokenizer = tiny
    write_pngs(tmp_path / "images" / "val", 3)
    entries = [
        {"filepath": "val", "filename": "img0.png", "split": "test", "sentences": [{"raw": "a red square. "},
                                                                                   {"raw": "a square"}]},
        {"filepath": "val", "filename": "img1.png", "split": "train", "sentences": [{"raw": "a train image"}]},
        {"filepath": "val", "filename": "img2.png", "split": "test",
         "sentences": [{"tokens": ["a", "blue", "thing"]}, {"raw": ""}]},  # tokens only; an empty caption
    ]
    ann = tmp_path / "dataset_tiny.json"
    ann.write_text(json.dumps({"images": entries, "dataset": "coco"}))
    data = eval_sets.KarpathyRetrieval(ann, tmp_path / "images", split="test", preprocess=preprocess)
    assert len(data) == 2 and data.captions == ["a red square.", "a square", "a blue thing"]
    assert data.text_to_image.tolist() == [0, 0, 1]
    assert data[1][0].shape == (3, 32, 32) and data[1][1] == 1
    assert len(eval_sets.KarpathyRetrieval(ann, tmp_path / "images", split="all")) == 3
    assert eval_sets.KarpathyRetrieval(ann, tmp_path / "images", max_captions=1).captions == ["a red square.",
                                                                                         "a blue thing"]
    with pytest.raises(ValueError, match="splits"):
        eval_sets.KarpathyRetrieval(ann, tmp_path / "images", split="val")
    got = ev.evaluate_retrieval(model, data, data.captions, data.text_to_image, tokenizer)
    assert set(got) == {f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
    assert got["i2t_R@5"] == 100.0  # 3 captions: everything is in the top 5

    out = tmp_path / "karpathy.json"
    ckpt = tmp_path / "ckpt"
    clipmoe.save_checkpoint(model, ckpt, architecture="clipmoe-tiny")
    assert cli_main(["eval", "--checkpoint", str(ckpt), "--data", str(ann), "--image-root", str(tmp_path / "images"),
                     "--device", "cpu", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["num_images"] == 2 and result["num_texts"] == 3
    assert result["retrieval"] == pytest.approx(got, abs=1e-6)
    (tmp_path / "images" / "val" / "img2.png").unlink()
    with pytest.raises(FileNotFoundError, match="img2.png"):
        eval_sets.KarpathyRetrieval(ann, tmp_path / "images")


def test_eval_cli_csv_with_shared_images_and_labels(tiny, tmp_path, capsys):
    write_pngs(tmp_path / "imgs", 3)
    rows = ["filepath\ttitle\tkind", "imgs/img0.png\ta red thing\tred", "imgs/img1.png\ta green thing\tgreen",
            "imgs/img0.png\tsomething red\tred", "imgs/img2.png\t\tblue"]  # img2: a label but no caption
    (tmp_path / "data.tsv").write_text("\n".join(rows) + "\n")
    from clipmoe.cli.eval import read_csv_eval
    table = read_csv_eval(tmp_path / "data.tsv", "filepath", "title", "kind")
    assert [os.path.basename(p) for p in table["paths"]] == ["img0.png", "img1.png", "img2.png"]
    assert table["text_to_image"].tolist() == [0, 1, 0] and table["labels"] == ["red", "green", "blue"]
    out = tmp_path / "r.json"
    assert cli_main(["eval", "--model", "clipmoe-tiny", "--data", str(tmp_path / "data.tsv"), "--csv-label-key",
                     "kind", "--device", "cpu", "--output", str(out), "--template", "a {} picture"]) == 0
    result = json.loads(out.read_text())
    assert result["num_images"] == 3 and result["num_texts"] == 3 and "routing" not in result  # a dense model
    assert set(result["retrieval"]) == {f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
    assert result["zero_shot"]["kind"]["num_classes"] == 3 and result["zero_shot"]["kind"]["top5"] == 100.0
    bad = tmp_path / "bad.tsv"
    bad.write_text("filepath\ttitle\tkind\nimgs/img0.png\ta\tred\nimgs/img0.png\tb\tgreen\n")
    assert cli_main(["eval", "--model", "clipmoe-tiny", "--data", str(bad), "--csv-label-key", "kind"]) == 2
    assert "earlier row 'red'" in capsys.readouterr().err


def test_eval_cli_webdataset_merges_identical_images(tmp_path):
    data = SyntheticShapes(4, split="test")
    pattern = data.write_webdataset(tmp_path / "shards", samples_per_shard=2)
    images = [data._encoded(i, "PNG") for i in (0, 1, 0, 2)]
    unique, t2i = eval_sets.dedup_images(images, ["a", "b", "c", "d"])
    assert len(unique) == 3 and t2i.tolist() == [0, 1, 0, 2]
    out = tmp_path / "wds.json"
    assert cli_main(["eval", "--model", "clipmoe-tiny", "--data", pattern, "--device", "cpu", "--output",
                     str(out)]) == 0
    assert json.loads(out.read_text())["num_texts"] == 4


def test_eval_cli_end_to_end_on_synthetic(tiny, tmp_path):
    """The installed command, in a fresh process, on a saved CLIP-MoE checkpoint (routing JSON and heatmap)."""
    model, _, _ = tiny
    ckpt = tmp_path / "ckpt"
    clipmoe.save_checkpoint(model, ckpt, architecture="clipmoe-tiny")
    out, plot = tmp_path / "eval.json", tmp_path / "routing.png"
    cmd = [sys.executable, "-c", "import sys; from clipmoe.cli import main; sys.exit(main())", "eval",
           "--checkpoint", str(ckpt), "--data", "synthetic:64", "--device", "cpu", "--batch-size", "32",
           "--output", str(out), "--routing-plot", str(plot)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "image->text" in proc.stdout and "zero-shot mean top-1" in proc.stdout
    result = json.loads(out.read_text())
    assert result["model"]["moe_layers"] == 4 and result["num_images"] == 64
    assert set(result["zero_shot"]) == set(ATTRIBUTES)
    for data in result["routing"]["towers"].values():
        for layer in data["layers"].values():
            assert sum(layer["first_choice_share"]) == pytest.approx(1.0)
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_eval_cli_errors(capsys):
    assert cli_main(["eval", "--data", "synthetic:8"]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    assert cli_main(["eval", "--model", "clipmoe-tiny", "--data", "nope.tsv", "--device", "cpu"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert cli_main(["eval", "--model", "clipmoe-tiny", "--data", "synthetic:8", "--routing-plot", "x.png",
                     "--device", "cpu"]) == 2
    assert "no MoE layer" in capsys.readouterr().err


# ------------------------------------------------------------------------------- tie rules and clip_benchmark output
def clip_benchmark_reference(images, texts, text_to_image, ks):
    """clip_benchmark's zeroshot_retrieval metrics, written from its description: scores = texts @ images.T, a
    boolean positive-pair matrix, torch.topk per k, a query is a hit when a positive is among its top k."""
    scores = texts @ images.T
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(text_to_image)), text_to_image] = True

    def recall(scores, positive, k):
        onehot = F.one_hot(scores.topk(k, dim=1).indices, num_classes=scores.shape[1])
        return (onehot * positive[:, None, :]).sum(dim=(1, 2)) / positive.sum(dim=1)

    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = (recall(scores, positive, k) > 0).float().mean().item()
        out[f"text_retrieval_recall@{k}"] = (recall(scores.T, positive.T, k) > 0).float().mean().item()
    return out


def test_both_tie_rules_on_tied_data():
    # images 0 and 1 are duplicates; captions 0 and 1 are the same text (of images 0 and 1); 5 images, 7 captions
    torch.manual_seed(2)
    base = F.normalize(torch.randn(4, 8), dim=-1)
    images = torch.stack([base[0], base[0], base[1], base[2], base[3]])
    text_to_image = torch.tensor([0, 1, 2, 2, 3, 4, 4])
    texts = F.normalize(torch.stack([base[0], base[0], base[1], base[1] + 0.3 * base[2], base[2], base[3],
                                     base[3] + 0.5 * base[1]]), dim=-1)
    strict = ev.retrieval_metrics(images, texts, text_to_image, ks=(1, 2, 5))
    ties_broken = ev.retrieval_metrics(images, texts, text_to_image, ks=(1, 2, 5), ties="sort")
    # strict: images 0 and 1 tie with each other's caption at the top -> i2t misses at 1; captions 0 and 1 score
    # images 0 and 1 equally -> t2i misses at 1
    assert strict["i2t_R@1"] == pytest.approx(300 / 5) and strict["t2i_R@1"] == pytest.approx(500 / 7)
    assert strict["i2t_R@2"] == 100.0 and strict["t2i_R@2"] == 100.0
    # sort: each tie goes to one side, so exactly one of images 0, 1 (and one of captions 0, 1) is a hit at 1
    assert ties_broken["i2t_R@1"] == pytest.approx(400 / 5) and ties_broken["t2i_R@1"] == pytest.approx(600 / 7)
    assert {k: v for k, v in ties_broken.items() if not k.endswith("@1")} == {
        k: v for k, v in strict.items() if not k.endswith("@1")}
    # clip_benchmark's names and fractions, equal to its algorithm on the same embeddings
    got = ev.clip_benchmark_retrieval(images, texts, text_to_image, ks=(1, 2, 5))
    want = clip_benchmark_reference(images, texts, text_to_image, ks=(1, 2, 5))
    assert got == pytest.approx(want, abs=1e-7)
    assert got["text_retrieval_recall@1"] == pytest.approx(ties_broken["i2t_R@1"] / 100)
    # without ties the two rules agree to the last digit
    images, texts = F.normalize(torch.randn(20, 8), dim=-1), F.normalize(torch.randn(40, 8), dim=-1)
    t2i = torch.arange(20).repeat(2)
    assert ev.retrieval_metrics(images, texts, t2i) == ev.retrieval_metrics(images, texts, t2i, ties="sort")
    assert ev.clip_benchmark_retrieval(images, texts, t2i) == pytest.approx(clip_benchmark_reference(
        images, texts, t2i, (1, 5, 10)), abs=1e-7)
    with pytest.raises(ValueError, match="ties"):
        ev.retrieval_metrics(images, texts, t2i, ties="random")


def test_zero_shot_tie_rules_and_mean_per_class_recall():
    classes = torch.eye(3)
    images = torch.tensor([[0.9, 0.1, 0.0],   # label 0: right
                           [0.5, 0.5, 0.0],   # label 1: tied with class 0 (argmax and topk: see below)
                           [0.1, 0.8, 0.1],   # label 1: right
                           [0.2, 0.7, 0.1],   # label 2: wrong (class 1)
                           [0.0, 0.0, 1.0]])  # label 2: right
    labels = torch.tensor([0, 1, 1, 2, 2])
    assert ev.zero_shot_metrics(images, classes, labels, ks=(1,)) == {"top1": 60.0}  # the tie is a miss
    top1 = (images @ classes.T).topk(1, dim=1).indices[:, 0]  # whichever side torch.topk puts the tie on
    want = 100 * (top1 == labels).double().mean().item()
    assert ev.zero_shot_metrics(images, classes, labels, ks=(1,), ties="sort") == {"top1": pytest.approx(want)}
    # argmax takes the first maximal class (0) for the tie: recalls 1 (class 0), 1/2 (class 1), 1/2 (class 2)
    assert ev.mean_per_class_recall(images, classes, labels) == pytest.approx(100 * (1 + 0.5 + 0.5) / 3)
    got = ev.clip_benchmark_zero_shot(images, classes, labels)
    assert set(got) == {"acc1", "acc5", "mean_per_class_recall"} and got["acc5"] == 1.0
    assert got["acc1"] == pytest.approx(want / 100) and got["mean_per_class_recall"] == pytest.approx(2 / 3)


def test_coco_captions_file_and_clip_benchmark_protocol(tiny, tmp_path, capsys):
    write_pngs(tmp_path / "val2017", 3)
    document = {"images": [{"id": 30, "file_name": "img2.png"}, {"id": 10, "file_name": "img0.png"},
                           {"id": 20, "file_name": "img1.png"}],
                "annotations": [{"image_id": 10, "id": i, "caption": f"zero {i}"} for i in range(7)]
                + [{"image_id": 30, "id": 7, "caption": "two"}, {"image_id": 20, "id": 8, "caption": "one "}]}
    ann = tmp_path / "captions_val2017.json"
    ann.write_text(json.dumps(document))
    data = eval_sets.retrieval_json(ann, tmp_path / "val2017")
    assert isinstance(data, eval_sets.CocoCaptions)
    assert [os.path.basename(p) for p in data.paths] == ["img0.png", "img1.png", "img2.png"]  # by image id
    assert data.captions == [f"zero {i}" for i in range(5)] + ["one", "two"]  # the first 5, in file order
    assert data.text_to_image.tolist() == [0, 0, 0, 0, 0, 1, 2]
    assert len(eval_sets.retrieval_json(ann, tmp_path / "val2017", max_captions=10).captions) == 9
    out = tmp_path / "cb.json"
    assert cli_main(["eval", "--model", "clipmoe-tiny", "--data", str(ann), "--image-root", str(tmp_path / "val2017"),
                     "--device", "cpu", "--protocol", "clip_benchmark", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["protocol"] == "clip_benchmark" and result["num_texts"] == 7
    assert set(result["retrieval"]) == {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)}
    assert all(0.0 <= v <= 1.0 for v in result["retrieval"].values())
    assert result["retrieval"]["text_retrieval_recall@5"] == 1.0
    assert "image->text" in capsys.readouterr().out
