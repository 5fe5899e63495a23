"""clipmoe.hf_model: CLIPMoE transformers classes round-trip through save_pretrained / from_pretrained (offline,
safetensors), an upcycled model's plain save_pretrained keeps its experts, and open_clip <-> transformers conversion
(the released format bit-exact through transformers, `clipmoe convert --to-hf` and back)."""
import json

import pytest
import torch

import clipmoe
from clipmoe import MoEFFN, load_checkpoint, save_checkpoint, upcycle
from clipmoe.cli import main as cli_main
from clipmoe.released import load_clip_moe_checkpoint, released_state_dict
from tests.test_checkpoint import _assert_same_state, released_state
from tests.test_checkpoint import _inputs as released_inputs
from tests.test_hf_compat import TEXT, VISION, _clip_features, _config, _inputs
from tests.tolerances import assert_close

transformers = pytest.importorskip("transformers")
hf_model = pytest.importorskip("clipmoe.hf_model")
ROUND_TRIP_TOL = 1e-6  # the bound; a reload computes the same graph on the same tensors, so it is exact


def _max_diff(got, want):
    return max((a - b).abs().max().item() for a, b in zip(got, want, strict=True))


def _perturb_experts(model):
    """Make the experts differ, so that a dense reload (or experts loaded into the wrong slots) shows."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MoEFFN):
                m.w1.add_(0.05 * torch.randn(m.w1.shape, generator=g))
                m.b2.add_(0.05 * torch.randn(m.b2.shape, generator=g))


def test_upcycled_clip_model_save_pretrained_round_trip(tmp_path):
    model = upcycle(transformers.CLIPModel(_config("gelu")), num_experts=4, top_k=2).eval()
    _perturb_experts(model)
    assert isinstance(model, transformers.CLIPModel) and type(model) is hf_model.CLIPMoEModel
    assert model.config.model_type == "clipmoe" and len(model.config.moe_layers) == 4
    pixel_values, input_ids = _inputs()
    want = _clip_features(model, pixel_values, input_ids)
    model.save_pretrained(tmp_path / "moe")  # the plain transformers call
    assert (tmp_path / "moe" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "moe" / "config.json").read_text())["model_type"] == "clipmoe"
    for loader in (transformers.AutoModel, hf_model.CLIPMoEModel):
        loaded = loader.from_pretrained(tmp_path / "moe", local_files_only=True).eval()
        assert type(loaded) is hf_model.CLIPMoEModel
        assert sum(isinstance(m, MoEFFN) for m in loaded.modules()) == 4
        assert loaded.vision_model.encoder.layers[0].mlp.activation == "gelu"
        assert _max_diff(_clip_features(loaded, pixel_values, input_ids), want) <= ROUND_TRIP_TOL
    torch.testing.assert_close(loaded.encode_image(pixel_values), want[0], rtol=0, atol=0)
    # the README's warning: transformers' plain class only warns and builds dense, newly initialised MLPs
    dense = transformers.CLIPModel.from_pretrained(tmp_path / "moe", local_files_only=True)
    assert type(dense) is transformers.CLIPModel and not any(isinstance(m, MoEFFN) for m in dense.modules())


@pytest.mark.parametrize("cls_name", ["CLIPVisionModel", "CLIPTextModel"])
def test_one_tower_models_round_trip(cls_name, tmp_path):
    cls = getattr(transformers, cls_name)
    model = upcycle(cls(cls.config_class(**(VISION if cls_name == "CLIPVisionModel" else TEXT))), 3, 2).eval()
    _perturb_experts(model)
    assert type(model).__name__ == cls_name.replace("CLIP", "CLIPMoE")
    pixel_values, input_ids = _inputs()
    inputs = {"pixel_values": pixel_values} if cls_name == "CLIPVisionModel" else {"input_ids": input_ids}
    with torch.no_grad():
        want = model(**inputs)
    model.save_pretrained(tmp_path / "tower")
    loaded = transformers.AutoModel.from_pretrained(tmp_path / "tower", local_files_only=True).eval()
    assert type(loaded) is type(model) and sum(isinstance(m, MoEFFN) for m in loaded.modules()) == 2
    with torch.no_grad():
        got = loaded(**inputs)
    assert _max_diff((got.pooler_output, got.last_hidden_state),
                     (want.pooler_output, want.last_hidden_state)) <= ROUND_TRIP_TOL


def test_plain_save_pretrained_never_gives_a_dense_model(tmp_path):
    # the supported classes save as CLIPMoE (above); another transformers class holding MoEFFN layers refuses
    model = upcycle(transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**VISION)), 2, 1)
    assert isinstance(model, transformers.CLIPVisionModelWithProjection)
    with pytest.raises(ValueError, match="CLIPMoEModel"):
        model.save_pretrained(tmp_path / "refused")
    assert not (tmp_path / "refused" / "model.safetensors").exists()


def test_own_format_of_a_clipmoe_model_keeps_its_class(tmp_path):
    model = upcycle(transformers.CLIPModel(_config()), 2, 1).eval()
    _perturb_experts(model)
    save_checkpoint(model, tmp_path / "own")
    loaded = load_checkpoint(tmp_path / "own")
    assert type(loaded) is hf_model.CLIPMoEModel and loaded.config.moe_layers == model.config.moe_layers
    pixel_values, input_ids = _inputs()
    assert _max_diff(_clip_features(loaded, pixel_values, input_ids),
                     _clip_features(model, pixel_values, input_ids)) == 0.0


def test_released_format_through_transformers_is_bit_exact(tmp_path):
    sd = released_state()
    oc = load_clip_moe_checkpoint(dict(sd))
    hf = hf_model.open_clip_to_hf(oc)
    assert type(hf) is hf_model.CLIPMoEModel and hf.config.long_clip_short_positions == 20
    # the one transformers table: rows < 20 from positional_embedding, the rest from positional_embedding_res
    table = hf.text_model.embeddings.position_embedding.weight
    assert torch.equal(table[:20], sd["positional_embedding"][:20]) and torch.equal(
        table[20:], sd["positional_embedding_res"][20:])
    images, text = released_inputs()  # captions ending before and after position 20
    with torch.no_grad():
        for got, want in ((hf.encode_image(images), oc.encode_image(images)),
                          (hf.encode_text(text), oc.encode_text(text))):
            assert_close(got, want)
    hf.save_pretrained(tmp_path / "hf")
    reloaded = transformers.AutoModel.from_pretrained(tmp_path / "hf", local_files_only=True)
    back = released_state_dict(hf_model.hf_to_open_clip(reloaded))
    _assert_same_state(back, sd)  # the unused rows of both tables survive too


def test_upcycled_open_clip_to_hf_matches(tmp_path):
    from clipmoe.models import create_model
    model = create_model("clipmoe-tiny")[0].eval()
    upcycle(model, 4, 2)
    _perturb_experts(model)
    hf = hf_model.open_clip_to_hf(model)
    assert hf.config.moe["activation"] is None and hf.config.vision_config.hidden_act == "quick_gelu"
    images, text = torch.randn(3, 3, 32, 32), torch.randint(1, 1000, (3, 32))
    text[:, 7] = 49407
    with torch.no_grad():
        assert_close(hf.encode_image(images), model.encode_image(images))
        assert_close(hf.encode_text(text), model.encode_text(text))
    back = hf_model.hf_to_open_clip(hf)
    assert type(back) is type(model)
    _assert_same_state(back.state_dict(), model.state_dict())


def test_cli_convert_to_hf_and_back(tmp_path, capsys):
    sd = released_state()
    torch.save(sd, tmp_path / "released.pt")
    assert cli_main(["convert", "--to-hf", str(tmp_path / "released.pt"), str(tmp_path / "hf")]) == 0
    assert "CLIPMoEModel, 4 MoE layers, 4 experts, top-2" in capsys.readouterr().out
    assert cli_main(["convert", str(tmp_path / "hf"), str(tmp_path / "own")]) == 0  # transformers -> own format
    assert cli_main(["convert", "--to-hf", str(tmp_path / "own"), str(tmp_path / "hf2")]) == 0
    assert cli_main(["convert", "--to-released", str(tmp_path / "hf2"), str(tmp_path / "back.pt")]) == 0
    _assert_same_state(torch.load(tmp_path / "back.pt", weights_only=True), sd)
    assert cli_main(["convert", "--to-hf", "--to-released", str(tmp_path / "released.pt"), str(tmp_path / "x")]) == 2
    assert "not both" in capsys.readouterr().err


def test_conversion_errors():
    model = transformers.CLIPModel(_config("gelu_new"))
    with pytest.raises(ValueError, match="hidden_act"):
        hf_model.hf_to_open_clip(model)
    with pytest.raises(ValueError, match="only a CLIPModel"):
        hf_model.hf_to_open_clip(transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT)))
    with pytest.raises(ValueError, match="not a CLIPMLP"):
        hf_model.CLIPMoEModel(hf_model.CLIPMoEConfig(**_config().to_dict(), moe_layers=["text_model.nope"]))
    assert clipmoe.upcycle  # the package API is unchanged


def test_cli_eval_reads_a_transformers_folder(tmp_path):
    from clipmoe.models import create_model
    model = upcycle(create_model("clipmoe-tiny")[0], 4, 2)
    save_checkpoint(model, tmp_path / "own", architecture="clipmoe-tiny")
    assert cli_main(["convert", "--to-hf", str(tmp_path / "own"), str(tmp_path / "hf")]) == 0
    results = []
    for source in ("own", "hf"):
        out = tmp_path / f"{source}.json"
        assert cli_main(["eval", "--checkpoint", str(tmp_path / source), "--data", "synthetic:32", "--device", "cpu",
                         "--output", str(out)]) == 0
        results.append(json.loads(out.read_text()))
    assert results[1]["model"]["moe_layers"] == 4
    assert results[1]["retrieval"] == pytest.approx(results[0]["retrieval"])
    assert results[1]["zero_shot_mean_top1"] == pytest.approx(results[0]["zero_shot_mean_top1"])
