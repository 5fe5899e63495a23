"""An upcycled (tiny) open_clip model gives the same embeddings and gradients with backend="triton" (Triton
interpreter, CPU) as with backend="torch", within the fp32 tolerance."""
import pytest
import torch

pytest.importorskip("triton")
open_clip = pytest.importorskip("open_clip")

import clipmoe  # noqa: E402
from clipmoe import MoEFFN  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402

pytestmark = pytest.mark.usefixtures("triton_interpreter")


def perturb_experts(model, noise_std, router_gain=8.0):
    """Experts as perturbed copies and sharper routers, so that routing matters and has no near-ties: with exact
    copies the output would not depend on the routing weights, and the router gradients would be rounding noise."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MoEFFN):
                for p in (m.w1, m.b1, m.w2, m.b2):
                    p.add_(noise_std * torch.randn_like(p))
                m.router.weight.mul_(router_gain)
    return model


def tiny_upcycled_clip():
    """Both towers 2 blocks of width 64 (interpreted GEMMs are slow), 4 experts, top-2, perturbed experts."""
    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg={"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},  # 2 heads
        text_cfg={"context_length": 16, "vocab_size": 100, "width": 64, "heads": 2, "layers": 2},
    )
    return perturb_experts(clipmoe.upcycle(model, 4, 2), 0.05)


def embeddings_and_grads(model, backend, images, text, g_img, g_txt, num_moe_layers=4):
    moes = [m for m in model.modules() if isinstance(m, MoEFFN)]
    assert len(moes) == num_moe_layers
    for m in moes:
        m.backend = backend
    model.zero_grad(set_to_none=True)
    img = model.encode_image(images, normalize=True)
    txt = model.encode_text(text, normalize=True)
    ((img * g_img).sum() + (txt * g_txt).sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return img.detach(), txt.detach(), grads


def test_upcycled_open_clip_triton_matches_torch():
    model = tiny_upcycled_clip().train()  # dropout is 0 in open_clip's native MLP: the kernels run in training
    images = torch.randn(2, 3, 32, 32)
    text = torch.randint(1, 100, (2, 16))
    g_img, g_txt = torch.randn(2, 32), torch.randn(2, 32)
    img_t, txt_t, grads_t = embeddings_and_grads(model, "torch", images, text, g_img, g_txt)
    img_k, txt_k, grads_k = embeddings_and_grads(model, "triton", images, text, g_img, g_txt)
    assert_close(img_k, img_t, torch.float32, "image embeddings")
    assert_close(txt_k, txt_t, torch.float32, "text embeddings")
    assert grads_k.keys() == grads_t.keys()
    moe_params = [n for n in grads_t if ".mlp." in n]
    assert len(moe_params) == 4 * 5  # router, w1, b1, w2, b2 of every MoE layer
    for name in grads_t:
        assert_close(grads_k[name], grads_t[name], torch.float32, f"d {name}")


@pytest.mark.slow
def test_upcycled_vit_b32_triton_matches_torch(monkeypatch):
    """The real ViT-B/32 (24 MoE layers, D 768/512, F 3072/2048), one image and one caption. The interpreter runs a
    program per tile: large pinned tiles keep it to about two minutes on 2 cores (64x64 tiles take over ten)."""
    monkeypatch.setenv("CLIPMOE_TRITON_CONFIG", "BLOCK_N=256,BLOCK_K=256,num_warps=4,num_stages=1")
    model = open_clip.create_model("ViT-B-32", pretrained=None).train()
    perturb_experts(clipmoe.upcycle(model, 4, 2), 0.005)
    images, text = torch.randn(1, 3, 224, 224), torch.randint(1, 49407, (1, 77))
    g_img, g_txt = torch.randn(1, 512), torch.randn(1, 512)
    img_t, txt_t, grads_t = embeddings_and_grads(model, "torch", images, text, g_img, g_txt, 24)
    img_k, txt_k, grads_k = embeddings_and_grads(model, "triton", images, text, g_img, g_txt, 24)
    assert_close(img_k, img_t, torch.float32, "image embeddings")
    assert_close(txt_k, txt_t, torch.float32, "text embeddings")
    assert grads_k.keys() == grads_t.keys()
    assert sum(".mlp.router" in n for n in grads_t) == 24
    for name in grads_t:
        assert_close(grads_k[name], grads_t[name], torch.float32, f"d {name}")
