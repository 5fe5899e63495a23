"""Upcycling real open_clip architectures (random init): the copied-experts invariant, state dicts, training."""
import pytest
import torch

open_clip = pytest.importorskip("open_clip")  # the bare GPU machine has none: the file must still collect there

import clipmoe  # noqa: E402
from clipmoe import MoEFFN, collect_aux_losses, dense_mlps, upcycle  # noqa: E402
from tests.tolerances import UPCYCLE_RTOL, relative_error  # noqa: E402


def _inputs(model, batch=2):
    size = model.visual.image_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    images = torch.randn(batch, 3, *size)
    texts = torch.randint(1, model.vocab_size, (batch + 1, model.context_length))
    return images, texts


def _embeddings(model, images, texts):
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(texts)


def _tiny_clip(timm_trunk=False, quick_gelu=False):
    vision = (dict(timm_model_name="vit_tiny_patch16_224", timm_model_pretrained=False, image_size=224, patch_size=16,
                   timm_pool="token", timm_proj="linear") if timm_trunk
              else dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32))
    text = dict(context_length=16, vocab_size=100, width=64, heads=2, layers=2)
    return open_clip.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text, quick_gelu=quick_gelu)


@pytest.mark.slow
@pytest.mark.parametrize("num_experts,top_k", [(4, 2), (1, 1)])
def test_vit_b32_copied_experts_keep_embeddings(num_experts, top_k):
    model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    images, texts = _inputs(model)
    dense = _embeddings(model, images, texts)
    n_mlps = len(dense_mlps(model))
    assert n_mlps == 24  # 12 vision + 12 text blocks
    upcycle(model, num_experts=num_experts, top_k=top_k)
    moes = [m for m in model.modules() if isinstance(m, MoEFFN)]
    assert len(moes) == n_mlps and not dense_mlps(model)
    assert all(m.num_experts == num_experts and m.activation == "gelu" for m in moes)
    for got, want in zip(_embeddings(model, images, texts), dense, strict=True):
        assert relative_error(got, want) <= UPCYCLE_RTOL


def test_tiny_native_and_timm_towers_keep_embeddings():
    for timm_trunk, quick_gelu in ((False, True), (True, False)):
        model = _tiny_clip(timm_trunk, quick_gelu).eval()
        images, texts = _inputs(model)
        dense = _embeddings(model, images, texts)
        upcycle(model, 3, 2)
        moe = model.transformer.resblocks[0].mlp
        assert moe.activation == ("quick_gelu" if quick_gelu else "gelu")
        if timm_trunk:
            assert isinstance(model.visual.trunk.blocks[0].mlp, MoEFFN)
        for got, want in zip(_embeddings(model, images, texts), dense, strict=True):
            assert relative_error(got, want) <= UPCYCLE_RTOL


def test_forward_train_step_and_state_dict_round_trip():
    model = upcycle(_tiny_clip(), 4, 2)
    images, texts = _inputs(model, batch=4)
    image_features, text_features, logit_scale = model(images, texts[:4])[:3]  # open_clip's tuple output
    loss = -(image_features * text_features).sum() + 0.01 * collect_aux_losses(model).balance
    loss.backward()
    moe = model.visual.transformer.resblocks[0].mlp
    assert moe.router.weight.grad.abs().sum() > 0 and moe.w1.grad.abs().sum() > 0

    other = upcycle(_tiny_clip(), 4, 2)  # other random weights and routers
    other.load_state_dict(model.state_dict())
    model.eval(), other.eval()
    for got, want in zip(_embeddings(other, images, texts), _embeddings(model, images, texts), strict=True):
        assert torch.equal(got, want)


def test_experts_from_state_dicts():
    model = _tiny_clip().eval()
    name = "visual.transformer.resblocks.1.mlp"
    base = model.get_submodule(name).state_dict()
    scaled = [{k: v * (j + 1) for k, v in base.items()} for j in range(3)]
    upcycle(model, 3, 2, experts={name: scaled})
    moe = model.get_submodule(name)
    for j in range(3):
        assert torch.equal(moe.w1[j], base["c_fc.weight"] * (j + 1))
        assert torch.equal(moe.b2[j], base["c_proj.bias"] * (j + 1))
    untouched = model.get_submodule("transformer.resblocks.0.mlp")
    assert torch.equal(untouched.w1[0], untouched.w1[2])


def test_bad_upcycle_input():
    model = _tiny_clip()
    name = "visual.transformer.resblocks.0.mlp"
    state = model.get_submodule(name).state_dict()
    with pytest.raises(ValueError, match="not dense MLPs"):
        upcycle(_tiny_clip(), 2, 1, experts={"visual.nope": [state, state]})
    with pytest.raises(ValueError, match="expected num_experts=2"):
        upcycle(_tiny_clip(), 2, 1, experts={name: [state]})
    with pytest.raises(ValueError, match="mlp_state lacks 'c_proj.bias'"):
        upcycle(_tiny_clip(), 1, 1, experts={name: [{k: v for k, v in state.items() if k != "c_proj.bias"}]})
    with pytest.raises(ValueError, match="has shape"):
        upcycle(_tiny_clip(), 1, 1, experts={name: [{**state, "c_fc.weight": state["c_fc.weight"][:, :3]}]})
    with pytest.raises(ValueError, match="top_k"):
        upcycle(_tiny_clip(), 2, 3)
    upcycle(model, 2, 1)
    with pytest.raises(ValueError, match="already upcycled"):
        upcycle(model, 2, 1)


def test_available_ops_reported():
    ops = clipmoe.available_ops()
    assert set(ops) >= {"extension", "cpu", "cuda"}
