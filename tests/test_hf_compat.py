"""Upcycling Hugging Face transformers CLIP models (random init, small configs): the copied-experts invariant,
activations, a training step, and clipmoe's own checkpoint format."""
import subprocess
import sys

import pytest
import torch

from clipmoe import MoEFFN, collect_aux_losses, dense_mlps, load_checkpoint, save_checkpoint, upcycle
from tests.tolerances import UPCYCLE_RTOL, relative_error

transformers = pytest.importorskip("transformers")

VOCAB, CONTEXT = 100, 16
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=VOCAB,
            max_position_embeddings=CONTEXT, bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1, pad_token_id=0)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
              patch_size=8)


def _config(hidden_act="quick_gelu"):
    return transformers.CLIPConfig(text_config={**TEXT, "hidden_act": hidden_act},
                                   vision_config={**VISION, "hidden_act": hidden_act}, projection_dim=16)


def _inputs(batch=3):
    pixel_values = torch.randn(batch, 3, 32, 32)
    input_ids = torch.randint(1, VOCAB - 2, (batch, CONTEXT))
    input_ids[:, 0] = VOCAB - 2
    for row in range(batch):  # EOS at different positions, padding after it
        eos = 4 + 3 * row
        input_ids[row, eos], input_ids[row, eos + 1:] = VOCAB - 1, 0
    return pixel_values, input_ids


def _tensor(output):
    """get_*_features return a tensor (transformers 4) or an output whose pooler_output is it (transformers 5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _clip_features(model, pixel_values, input_ids):
    with torch.no_grad():
        return (_tensor(model.get_image_features(pixel_values=pixel_values)),
                _tensor(model.get_text_features(input_ids=input_ids)))


@pytest.mark.parametrize("hidden_act,activation", [("quick_gelu", "quick_gelu"), ("gelu", "gelu"),
                                                   ("gelu_new", "gelu_tanh"), ("gelu_pytorch_tanh", "gelu_tanh")])
def test_clip_model_copied_experts_keep_features(hidden_act, activation):
    model = transformers.CLIPModel(_config(hidden_act)).eval()
    pixel_values, input_ids = _inputs()
    dense = _clip_features(model, pixel_values, input_ids)
    names = list(dense_mlps(model))
    assert len(names) == 4 and "vision_model.encoder.layers.1.mlp" in names
    upcycle(model, num_experts=4, top_k=2)
    moes = [model.get_submodule(name) for name in names]
    assert all(isinstance(m, MoEFFN) and m.activation == activation and m.dropout == 0.0 for m in moes)
    assert not dense_mlps(model)
    for got, want in zip(_clip_features(model, pixel_values, input_ids), dense, strict=True):
        assert relative_error(got, want) <= UPCYCLE_RTOL


@pytest.mark.parametrize("cls_name", ["CLIPVisionModel", "CLIPTextModel"])
def test_single_tower_models_keep_outputs(cls_name):
    cls = getattr(transformers, cls_name)
    config = cls.config_class(**(VISION if cls_name == "CLIPVisionModel" else TEXT))
    model = cls(config).eval()
    pixel_values, input_ids = _inputs()
    inputs = {"pixel_values": pixel_values} if cls_name == "CLIPVisionModel" else {"input_ids": input_ids}
    with torch.no_grad():
        dense = model(**inputs)
    upcycle(model, num_experts=3, top_k=2)
    assert len([m for m in model.modules() if isinstance(m, MoEFFN)]) == 2
    with torch.no_grad():
        moe = model(**inputs)
    assert relative_error(moe.pooler_output, dense.pooler_output) <= UPCYCLE_RTOL
    assert relative_error(moe.last_hidden_state, dense.last_hidden_state) <= UPCYCLE_RTOL


def test_clip_model_trains_a_step():
    model = upcycle(transformers.CLIPModel(_config()), num_experts=4, top_k=2).train()
    pixel_values, input_ids = _inputs(batch=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    router = model.vision_model.encoder.layers[0].mlp.router.weight
    before = router.detach().clone()
    output = model(input_ids=input_ids, pixel_values=pixel_values, return_loss=True)
    loss = output.loss + 0.01 * collect_aux_losses(model).balance
    loss.backward()
    for name in ("vision_model.encoder.layers.0.mlp", "text_model.encoder.layers.1.mlp"):  # both towers
        moe = model.get_submodule(name)
        assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0, name
        assert moe.w1.grad.abs().sum() > 0, name
    optimizer.step()
    assert not torch.equal(router.detach(), before)


def test_experts_from_hf_state_dicts_and_errors():
    model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT))
    name = next(iter(dense_mlps(model)))  # "encoder.layers.0.mlp" (transformers 5), "text_model.…" (4)
    base = model.get_submodule(name).state_dict()
    assert sorted(base) == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]
    upcycle(model, 2, 1, experts={name: [base, {k: 2 * v for k, v in base.items()}]})
    moe = model.get_submodule(name)
    assert torch.equal(moe.w1[1], 2 * base["fc1.weight"]) and torch.equal(moe.b2[0], base["fc2.bias"])
    relu = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT, hidden_act="relu"))
    with pytest.raises(ValueError, match=r"encoder\.layers\.0\.mlp: unsupported MLP activation ReLU"):
        upcycle(relu, 2, 1)


def test_own_checkpoint_format_for_hf_model(tmp_path):
    model = upcycle(transformers.CLIPModel(_config("gelu")), num_experts=3, top_k=1).eval()
    save_checkpoint(model, tmp_path / "hf")
    loaded = load_checkpoint(tmp_path / "hf")
    assert isinstance(loaded, transformers.CLIPModel) and type(loaded).__name__ == "CLIPMoEModel"
    assert loaded.vision_model.encoder.layers[1].mlp.activation == "gelu"
    pixel_values, input_ids = _inputs()
    for got, want in zip(_clip_features(loaded, pixel_values, input_ids), _clip_features(model, pixel_values,
                                                                                         input_ids), strict=True):
        assert torch.equal(got, want)


def test_importing_clipmoe_does_not_import_transformers():
    code = "import sys, clipmoe; assert 'transformers' not in sys.modules, 'transformers imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
