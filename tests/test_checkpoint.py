"""Checkpoints: the released CLIP-MoE format against an independent re-implementation of its forward, export round
trips, clipmoe's own safetensors + JSON format, error messages, and `clipmoe convert`."""
import json
import math
import os
import pickle

import pytest
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip("open_clip")  # the bare GPU machine has none: the file must still collect there

from clipmoe import MoEConfig, MoEFFN, upcycle  # noqa: E402
from clipmoe.checkpoint import CheckpointError, load_checkpoint, save_checkpoint  # noqa: E402
from clipmoe.cli import main as cli_main  # noqa: E402
from clipmoe.released import export_clip_moe_checkpoint, load_clip_moe_checkpoint  # noqa: E402
from tests.tolerances import assert_close, relative_error  # noqa: E402

EMBED_DIM, VOCAB, CONTEXT, SHORT = 32, 100, 248, 20
VISION_WIDTH, TEXT_WIDTH, LAYERS, PATCH, IMAGE = 128, 64, 2, 8, 32   # 2 vision heads, 1 text head (width // 64)


# ---------------------------------------------------------------------------------------------------------------------
# A random checkpoint in the released key format, and the released model's forward written from its description
# (OpenAI CLIP ViT + text transformer; MoE blocks: router on the ln_2 output, fp32 softmax over experts, top-2,
# renormalise, QuickGELU experts with biases; Long-CLIP positions). Plain torch only, no open_clip or clipmoe.
# ---------------------------------------------------------------------------------------------------------------------

def released_state(num_experts=4, dense_blocks=(), seed=0):
    """{key: tensor} with every key family of the released files; blocks in `dense_blocks` (e.g. "transformer.0")
    keep a dense `mlp` instead of gate + experts."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.02):
        return torch.randn(*shape, generator=g) * scale

    sd = {}

    def layer_norm(name, width):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = 1 + rnd(width, scale=0.1), rnd(width, scale=0.1)

    def tower_blocks(prefix, width):
        for i in range(LAYERS):
            p = f"{prefix}.resblocks.{i}"
            layer_norm(f"{p}.ln_1", width)
            sd[f"{p}.attn.in_proj_weight"] = rnd(3 * width, width, scale=width ** -0.5)
            sd[f"{p}.attn.in_proj_bias"] = rnd(3 * width)
            sd[f"{p}.attn.out_proj.weight"] = rnd(width, width, scale=width ** -0.5)
            sd[f"{p}.attn.out_proj.bias"] = rnd(width)
            layer_norm(f"{p}.ln_2", width)
            ffns = ["mlp"] if f"{prefix.split('.')[0]}.{i}" in dense_blocks else \
                [f"experts.{j}" for j in range(num_experts)]
            if ffns != ["mlp"]:
                sd[f"{p}.gate.weight"] = rnd(num_experts, width, scale=0.3)
            for ffn in ffns:
                sd[f"{p}.{ffn}.c_fc.weight"] = rnd(4 * width, width, scale=width ** -0.5)
                sd[f"{p}.{ffn}.c_fc.bias"] = rnd(4 * width, scale=0.1)
                sd[f"{p}.{ffn}.c_proj.weight"] = rnd(width, 4 * width, scale=(4 * width) ** -0.5)
                sd[f"{p}.{ffn}.c_proj.bias"] = rnd(width, scale=0.1)

    grid = IMAGE // PATCH
    sd["visual.class_embedding"] = rnd(VISION_WIDTH, scale=0.5)
    sd["visual.positional_embedding"] = rnd(grid * grid + 1, VISION_WIDTH, scale=0.5)
    sd["visual.proj"] = rnd(VISION_WIDTH, EMBED_DIM, scale=VISION_WIDTH ** -0.5)
    sd["visual.conv1.weight"] = rnd(VISION_WIDTH, 3, PATCH, PATCH, scale=0.1)
    layer_norm("visual.ln_pre", VISION_WIDTH)
    tower_blocks("visual.transformer", VISION_WIDTH)
    layer_norm("visual.ln_post", VISION_WIDTH)
    sd["positional_embedding"] = rnd(CONTEXT, TEXT_WIDTH, scale=0.5)
    sd["positional_embedding_res"] = rnd(CONTEXT, TEXT_WIDTH, scale=0.5)  # different tables: the split is visible
    sd["text_projection"] = rnd(TEXT_WIDTH, EMBED_DIM, scale=TEXT_WIDTH ** -0.5)
    sd["logit_scale"] = torch.tensor(math.log(100.0))
    sd["token_embedding.weight"] = rnd(VOCAB, TEXT_WIDTH, scale=0.5)
    tower_blocks("transformer", TEXT_WIDTH)
    layer_norm("ln_final", TEXT_WIDTH)
    return sd


def _ln(x, sd, name):
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-5)


def _attention(x, sd, p, mask=None):
    n, length, width = x.shape
    heads = width // 64
    q, k, v = (x @ sd[f"{p}.in_proj_weight"].T + sd[f"{p}.in_proj_bias"]).chunk(3, dim=-1)
    q, k, v = (t.reshape(n, length, heads, width // heads).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(width // heads)
    if mask is not None:
        scores = scores + mask
    out = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(n, length, width)
    return out @ sd[f"{p}.out_proj.weight"].T + sd[f"{p}.out_proj.bias"]


def _expert(h, sd, p):
    a = h @ sd[f"{p}.c_fc.weight"].T + sd[f"{p}.c_fc.bias"]
    a = a * torch.sigmoid(1.702 * a)  # QuickGELU
    return a @ sd[f"{p}.c_proj.weight"].T + sd[f"{p}.c_proj.bias"]


def _ffn(h, sd, p, top_k=2):
    if f"{p}.mlp.c_fc.weight" in sd:
        return _expert(h, sd, f"{p}.mlp")
    gate = sd[f"{p}.gate.weight"]
    probs = (h @ gate.T).float().softmax(dim=-1)  # over all experts, fp32
    weights, chosen = probs.topk(top_k, dim=-1)
    weights = (weights / weights.sum(dim=-1, keepdim=True)).to(h.dtype)
    out = torch.zeros_like(h)
    for e in range(gate.shape[0]):  # every expert on every token, weighted 0 where not chosen
        out = out + (weights * (chosen == e)).sum(dim=-1, keepdim=True) * _expert(h, sd, f"{p}.experts.{e}")
    return out


def _blocks(x, sd, prefix, mask=None):
    for i in range(LAYERS):
        p = f"{prefix}.resblocks.{i}"
        x = x + _attention(_ln(x, sd, f"{p}.ln_1"), sd, f"{p}.attn", mask)
        x = x + _ffn(_ln(x, sd, f"{p}.ln_2"), sd, p)
    return x


def reference_encode_image(sd, images):
    conv = sd["visual.conv1.weight"]
    x = F.conv2d(images, conv, stride=conv.shape[-1]).flatten(2).transpose(1, 2)  # no conv bias
    x = torch.cat([sd["visual.class_embedding"].expand(x.shape[0], 1, -1), x], dim=1)
    x = _ln(x + sd["visual.positional_embedding"], sd, "visual.ln_pre")
    x = _blocks(x, sd, "visual.transformer")
    return _ln(x[:, 0], sd, "visual.ln_post") @ sd["visual.proj"]


def reference_encode_text(sd, text, long_positions=True):
    length = text.shape[1]
    mask1 = (torch.arange(length) < SHORT).float()[:, None] if long_positions else torch.ones(length, 1)
    x = sd["token_embedding.weight"][text]
    x = x + sd["positional_embedding"][:length] * mask1 + sd["positional_embedding_res"][:length] * (1 - mask1)
    causal = torch.full((length, length), float("-inf")).triu(1)
    x = _ln(_blocks(x, sd, "transformer", causal), sd, "ln_final")
    return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ sd["text_projection"]  # EOT = highest token id


def _inputs(length=CONTEXT):
    images = torch.randn(2, 3, IMAGE, IMAGE)
    text = torch.randint(1, VOCAB - 1, (3, length))
    for row, eot in enumerate((5, 40, length - 1)):  # short caption, long caption (positions >= 20), full context
        text[row, eot], text[row, eot + 1:] = VOCAB - 1, 0
    return images, text


def _embed(model, images, text):
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(text)


@pytest.fixture
def released_file(tmp_path):
    sd = released_state()
    path = tmp_path / "clip_moe.pt"
    torch.save(sd, path)
    return sd, path


# ---------------------------------------------------------------------------------------------------------------------
# Released format
# ---------------------------------------------------------------------------------------------------------------------

def test_released_checkpoint_matches_reference_forward(released_file):
    sd, path = released_file
    model = load_clip_moe_checkpoint(path)
    moes = [m for m in model.modules() if isinstance(m, MoEFFN)]
    assert len(moes) == 2 * LAYERS and all((m.num_experts, m.top_k, m.activation) == (4, 2, "quick_gelu")
                                           for m in moes)
    assert model.context_length == CONTEXT and not model.training
    images, text = _inputs()
    image_features, text_features = _embed(model, images, text)
    with torch.no_grad():
        assert_close(image_features, reference_encode_image(sd, images), msg="image embeddings")
        assert_close(text_features, reference_encode_text(sd, text), msg="text embeddings")
        # The comparison sees the Long-CLIP split: with one table the long captions' embeddings differ.
        one_table = reference_encode_text(sd, text, long_positions=False)
    assert relative_error(text_features[0], one_table[0]) < 1e-5
    assert relative_error(text_features[1], one_table[1]) > 1e-3
    # Routing is not trivial: both towers send tokens to more than two experts.
    for moe in (model.visual.transformer.resblocks[1].mlp, model.transformer.resblocks[1].mlp):
        assert moe.aux.topk_ids.unique().numel() > 2


def test_shorter_text_and_in_memory_state_dict(released_file):
    sd, _ = released_file
    model = load_clip_moe_checkpoint(dict(sd), top_k=1)
    assert model.transformer.resblocks[0].mlp.top_k == 1
    _, text = _inputs(length=77)
    with torch.no_grad():
        got = model.encode_text(text)
        model_k2 = load_clip_moe_checkpoint(sd)
        assert_close(model_k2.encode_text(text), reference_encode_text(sd, text), msg="77-token texts")
    assert got.shape == (3, EMBED_DIM)
    with pytest.raises(ValueError, match="context_length=248"):
        model.encode_text(torch.zeros(1, CONTEXT + 1, dtype=torch.long))


def test_dense_blocks_stay_dense(tmp_path):
    sd = released_state(num_experts=3, dense_blocks=("visual.0", "transformer.0"))
    model = load_clip_moe_checkpoint(sd)
    assert isinstance(model.visual.transformer.resblocks[0].mlp, torch.nn.Sequential)
    moe = model.transformer.resblocks[1].mlp
    assert isinstance(moe, MoEFFN) and moe.num_experts == 3
    images, text = _inputs()
    with torch.no_grad():
        assert_close(model.encode_image(images), reference_encode_image(sd, images), msg="image embeddings")
        assert_close(model.encode_text(text), reference_encode_text(sd, text), msg="text embeddings")
    export_clip_moe_checkpoint(model, tmp_path / "out.pt")
    _assert_same_state(torch.load(tmp_path / "out.pt", weights_only=True), sd)


def _assert_same_state(got, want):
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key


def test_export_round_trip_is_bit_exact(released_file, tmp_path):
    sd, path = released_file
    model = load_clip_moe_checkpoint(path)
    out = export_clip_moe_checkpoint(model, tmp_path / "exported.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip_moe.pt", "exported.pt"]  # no temporary file left
    exported = torch.load(out, weights_only=True)
    _assert_same_state(exported, sd)
    assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in exported.values())
    images, text = _inputs()
    for got, want in zip(_embed(load_clip_moe_checkpoint(out), images, text), _embed(model, images, text),
                         strict=True):
        assert torch.equal(got, want)


def test_long_clip_model_pickles(released_file):
    model = load_clip_moe_checkpoint(released_file[1])
    clone = pickle.loads(pickle.dumps(model))
    _, text = _inputs()
    with torch.no_grad():
        assert torch.equal(clone.encode_text(text), model.encode_text(text))


def test_loaded_model_trains_with_long_clip_gradients(released_file):
    model = load_clip_moe_checkpoint(released_file[1]).train()
    images, text = _inputs()
    image_features, text_features = model(images, text[:2])[:2]
    (-(image_features * text_features).sum()).backward()
    assert all(m.router.weight.grad.abs().sum() > 0 for m in model.modules() if isinstance(m, MoEFFN))
    # Like the official masked sum: rows < 20 train positional_embedding, the others positional_embedding_res.
    short_grad, long_grad = model.positional_embedding.grad, model.positional_embedding_res.grad
    assert short_grad[SHORT:].abs().sum() == 0 < short_grad[:SHORT].abs().sum()
    assert long_grad[:SHORT].abs().sum() == 0 < long_grad[SHORT:].abs().sum()


def _save(tmp_path, sd, name="bad.pt"):
    path = tmp_path / name
    torch.save(sd, path)
    return path


def test_released_format_errors(released_file, tmp_path):
    sd, path = released_file
    dense = {k.replace("experts.0.", "mlp."): v for k, v in sd.items() if ".gate." not in k and
             not any(f"experts.{j}." in k for j in (1, 2, 3))}
    bad = _save(tmp_path, dense, "dense.pt")
    with pytest.raises(CheckpointError, match=r"dense\.pt.*no '…resblocks\.\{i\}\.gate\.weight' keys"):
        load_clip_moe_checkpoint(bad)

    wrong = dict(sd)
    wrong["transformer.resblocks.1.experts.2.c_fc.weight"] = torch.zeros(4 * TEXT_WIDTH, TEXT_WIDTH - 1)
    with pytest.raises(CheckpointError, match=r"wrong_expert\.pt.*experts\.2\.c_fc\.weight has shape"):
        load_clip_moe_checkpoint(_save(tmp_path, wrong, "wrong_expert.pt"))

    wrong = dict(sd)
    wrong["transformer.resblocks.1.attn.out_proj.weight"] = torch.zeros(TEXT_WIDTH, TEXT_WIDTH + 1)
    with pytest.raises(CheckpointError, match=r"wrong shapes: transformer\.resblocks\.1\.attn\.out_proj\.weight: "
                                              r"\(64, 65\) in the file, \(64, 64\) expected"):
        load_clip_moe_checkpoint(_save(tmp_path, wrong))

    wrong = dict(sd)
    wrong["visual.transformer.resblocks.0.gate.weight"] = torch.zeros(3, VISION_WIDTH)
    with pytest.raises(CheckpointError, match=r"resblocks\.0\.gate\.weight has shape \(3, 128\)"):
        load_clip_moe_checkpoint(_save(tmp_path, wrong))

    expert_bias = "visual.transformer.resblocks.1.experts.3.c_proj.bias"
    missing = {k: v for k, v in sd.items() if k not in ("visual.ln_post.bias", expert_bias)}
    with pytest.raises(CheckpointError, match=r"missing key visual\.transformer\.resblocks\.1\.experts\.3\.c_proj"):
        load_clip_moe_checkpoint(_save(tmp_path, missing))
    missing[expert_bias] = sd[expert_bias]
    with pytest.raises(CheckpointError, match=r"missing keys: visual\.ln_post\.bias"):
        load_clip_moe_checkpoint(_save(tmp_path, missing))

    data = path.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.pt: cannot read it as a torch state dict"):
        load_clip_moe_checkpoint(truncated)
    with pytest.raises(CheckpointError, match=r"list\.pt: expected a state dict"):
        load_clip_moe_checkpoint(_save(tmp_path, [1, 2], "list.pt"))
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_clip_moe_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(ValueError, match=r"top_k must be an int in \[1, 4\]"):
        load_clip_moe_checkpoint(sd, top_k=5)


# ---------------------------------------------------------------------------------------------------------------------
# Own format
# ---------------------------------------------------------------------------------------------------------------------

def test_own_format_round_trip(released_file, tmp_path):
    model = load_clip_moe_checkpoint(released_file[1])
    out = tmp_path / "ckpt"
    save_checkpoint(model, out, MoEConfig(num_experts=4, top_k=2))
    # nothing temporary left
    assert sorted(p.name for p in out.iterdir()) == ["clipmoe_config.json", "clipmoe_model.safetensors"]
    document = json.loads((out / "clipmoe_config.json").read_text())
    assert document["moe_cfg"]["num_experts"] == 4 and document["moe_cfg"]["top_k"] == 2
    assert document["moe_cfg"]["activation"] == "quick_gelu" and document["text_context_length"] == CONTEXT
    assert document["architecture"]["model_class"] == "LongCLIP"
    assert len(document["moe_modules"]) == 2 * LAYERS
    loaded = load_checkpoint(out)
    images, text = _inputs()
    for got, want in zip(_embed(loaded, images, text), _embed(model, images, text), strict=True):
        assert torch.equal(got, want)
    # The loaded model exports the same released file.
    _assert_same_state(torch.load(export_clip_moe_checkpoint(loaded, tmp_path / "back.pt"), weights_only=True),
                       released_file[0])
    # A single-file path: X.safetensors + X.json.
    save_checkpoint(loaded, tmp_path / "single.safetensors")
    assert (tmp_path / "single.json").is_file()
    assert torch.equal(_embed(load_checkpoint(tmp_path / "single.json"), images, text)[0],
                       _embed(model, images, text)[0])


def test_failed_write_keeps_the_old_checkpoint(released_file, tmp_path, monkeypatch):
    import safetensors.torch

    model = load_clip_moe_checkpoint(released_file[1])
    out = tmp_path / "ckpt"
    save_checkpoint(model, out)
    before = (out / "clipmoe_model.safetensors").read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, out)
    assert sorted(p.name for p in out.iterdir()) == ["clipmoe_config.json", "clipmoe_model.safetensors"]
    assert (out / "clipmoe_model.safetensors").read_bytes() == before
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "clipmoe_config.json").stat().st_mode & 0o777 == 0o666 & ~umask  # not a private temp-file mode


def test_own_format_upcycled_open_clip(tmp_path):
    arch = {"embed_dim": 32, "quick_gelu": False,
            "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
            "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 64, "heads": 2, "layers": 2}}
    model = upcycle(open_clip.CLIP(**arch), 3, 1).eval()
    with pytest.raises(ValueError, match="pass architecture="):
        save_checkpoint(model, tmp_path / "a")
    with pytest.raises(ValueError, match=r"MoEFFN .* has .* \(3, 1, 'gelu', True\), but config says \(4, 2"):
        save_checkpoint(model, tmp_path / "a", MoEConfig(), architecture=arch)
    save_checkpoint(model, tmp_path / "a", architecture=arch)
    loaded = load_checkpoint(tmp_path / "a")
    images = torch.randn(2, 3, 32, 32)
    text = torch.randint(1, 100, (2, 16))
    for got, want in zip(_embed(loaded, images, text), _embed(model, images, text), strict=True):
        assert torch.equal(got, want)
    # An architecture by open_clip model name (clipmoe's registered tiny config).
    from clipmoe.models import create_model
    tiny = upcycle(create_model("clipmoe-tiny")[0], 2, 1).eval()
    save_checkpoint(tiny, tmp_path / "tiny.safetensors", architecture="clipmoe-tiny")
    text = torch.randint(1, tiny.vocab_size, (2, tiny.context_length))
    for got, want in zip(_embed(load_checkpoint(tmp_path / "tiny.safetensors"), images, text),
                         _embed(tiny, images, text), strict=True):
        assert torch.equal(got, want)


def test_own_format_errors(released_file, tmp_path):
    out = tmp_path / "ckpt"
    save_checkpoint(load_clip_moe_checkpoint(released_file[1]), out)
    config_path = out / "clipmoe_config.json"
    document = json.loads(config_path.read_text())

    def edited(change):
        d = json.loads(json.dumps(document))
        change(d)
        config_path.write_text(json.dumps(d))

    edited(lambda d: d["moe_cfg"].update(num_experts=3))
    with pytest.raises(CheckpointError, match=r"model\.safetensors .*does not match its config: wrong shapes: "
                                              r".*mlp\.router\.weight: \(4, 64\) in the file, \(3, 64\) expected"):
        load_checkpoint(out)
    edited(lambda d: d["architecture"]["text_cfg"].update(width=128, heads=2))
    with pytest.raises(CheckpointError, match=r"does not match its config: wrong shapes: .*64\) in the file, "
                                              r"\(.*128\) expected"):
        load_checkpoint(out)
    edited(lambda d: d["architecture"]["text_cfg"].update(layers=3))
    with pytest.raises(CheckpointError, match=r"missing keys: transformer\.resblocks\.2\."):
        load_checkpoint(out)
    edited(lambda d: d["moe_modules"].append("transformer.resblocks.0.attn"))
    with pytest.raises(CheckpointError, match=r"'transformer\.resblocks\.0\.attn' is not a dense MLP"):
        load_checkpoint(out)
    edited(lambda d: d.update(text_context_length=77))
    with pytest.raises(CheckpointError, match="text_context_length 77 disagrees"):
        load_checkpoint(out)
    config_path.write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not readable JSON"):
        load_checkpoint(out)
    edited(lambda d: None)
    weights = out / "clipmoe_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read them \(truncated or corrupt"):
        load_checkpoint(out)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_checkpoint(out)


def test_cli_convert_round_trip(released_file, tmp_path, capsys):
    sd, path = released_file
    assert cli_main(["convert", str(path), str(tmp_path / "ours")]) == 0
    assert (tmp_path / "ours" / "clipmoe_config.json").is_file()
    assert cli_main(["convert", "--to-released", str(tmp_path / "ours"), str(tmp_path / "back.pt")]) == 0
    _assert_same_state(torch.load(tmp_path / "back.pt", weights_only=True), sd)
    assert "back.pt" in capsys.readouterr().out


def test_own_file_names_share_a_folder_with_a_hugging_face_model(tmp_path):
    """clipmoe_model.safetensors + clipmoe_config.json beside HF's model.safetensors + config.json: each loads."""
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=100, max_position_embeddings=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8), projection_dim=16)
    dense = transformers.CLIPModel(config).eval()
    dense.save_pretrained(tmp_path)
    moe = upcycle(transformers.CLIPModel(config), 2, 1).eval()
    save_checkpoint(moe, tmp_path)
    assert {"config.json", "model.safetensors", "clipmoe_config.json", "clipmoe_model.safetensors"} <= \
        {p.name for p in tmp_path.iterdir()}
    pixels = torch.randn(1, 3, 32, 32)

    def features(model):
        with torch.no_grad():
            return model.vision_model(pixel_values=pixels).pooler_output

    assert torch.equal(features(load_checkpoint(tmp_path)), features(moe))
    assert torch.equal(features(transformers.CLIPModel.from_pretrained(tmp_path).eval()), features(dense))


def test_legacy_file_names_still_load(released_file, tmp_path):
    """Folders written by clipmoe <= 0.2: model.safetensors + config.json (format_version 1, no stored config)."""
    from safetensors.torch import load_file, save_file
    model = load_clip_moe_checkpoint(released_file[1])
    save_checkpoint(model, tmp_path / "new")
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    document = json.loads((tmp_path / "new" / "clipmoe_config.json").read_text())
    del document["save_id"]
    document["format_version"] = 1
    (legacy / "config.json").write_text(json.dumps(document))
    save_file(load_file(tmp_path / "new" / "clipmoe_model.safetensors"), legacy / "model.safetensors",
              metadata={"format": "pt"})
    images, text = _inputs()
    want = _embed(model, images, text)
    for got, expected in zip(_embed(load_checkpoint(legacy), images, text), want, strict=True):
        assert torch.equal(got, expected)
    save_checkpoint(load_checkpoint(legacy), legacy)  # a re-save replaces the legacy pair by the new names
    assert sorted(p.name for p in legacy.iterdir()) == ["clipmoe_config.json", "clipmoe_model.safetensors"]
    assert torch.equal(_embed(load_checkpoint(legacy), images, text)[0], want[0])


def test_released_tensors_of_16_bit_are_widened_and_integers_refused(tmp_path):
    sd = released_state()
    half = {k: v.half() for k, v in sd.items()}
    model = load_clip_moe_checkpoint(_save(tmp_path, half, "half.pt"))
    assert {t.dtype for t in model.state_dict().values()} == {torch.float32}
    assert torch.equal(model.visual.transformer.resblocks[0].mlp.w1[1],
                       half["visual.transformer.resblocks.0.experts.1.c_fc.weight"].float())
    ints = dict(sd, **{"visual.ln_pre.bias": sd["visual.ln_pre.bias"].to(torch.int64)})
    with pytest.raises(CheckpointError, match=r"ints\.pt: tensors of a dtype the model cannot take: "
                                              r"visual\.ln_pre\.bias is torch\.int64"):
        load_clip_moe_checkpoint(_save(tmp_path, ints, "ints.pt"))
