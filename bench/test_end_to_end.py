"""A whole CLIP: images/s and texts/s of a dense open_clip ViT-B/32 and of its upcycled CLIP-MoE (E=4, top-2) on
each backend, for inference and for one training step (run: pytest bench/ --benchmark).

Before timing, each MoE variant (experts copied from the dense MLPs) is checked to give the dense embeddings.
"""
import copy

import pytest
import torch

import clipmoe
import clipmoe_kernels
from bench import configs
from bench.utils import clip_train_step, relative_error, time_provider
from clipmoe.runtime import autocast

VARIANTS = ("dense", "moe_naive", "moe_torch", "moe_triton")
TASKS = ("infer_image", "infer_text", "train_step")
PRECISION = {"cpu": "fp32", "cuda": "amp_bf16"}
CHECK_RTOL = {"cpu": 1e-4, "cuda": 2e-2}  # fp32 on CPU; bf16 autocast on CUDA


@pytest.fixture(scope="module")
def models():
    import open_clip
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    dense = open_clip.create_model(configs.E2E_MODEL, pretrained=None, device=device)
    moe = clipmoe.upcycle(copy.deepcopy(dense), num_experts=configs.E2E_EXPERTS, top_k=configs.TOP_K)
    batch = configs.E2E_BATCH[device]
    size = dense.visual.image_size
    images = torch.randn(batch, 3, *size, device=device)
    texts = torch.randint(1, dense.vocab_size, (batch, dense.context_length), device=device)
    dense.eval()
    with torch.no_grad(), _autocast(device):
        dense_embeddings = (dense.encode_image(images), dense.encode_text(texts))
    return {"dense": dense, "moe": moe, "images": images, "texts": texts, "device": device, "batch": batch,
            "dense_embeddings": dense_embeddings}


def _autocast(device):
    return autocast(PRECISION[device], device)


def _select(models, variant):
    if variant == "dense":
        return models["dense"]
    model = models["moe"]
    for m in model.modules():
        if isinstance(m, clipmoe.MoEFFN):
            m.backend = variant.removeprefix("moe_")
    return model


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_end_to_end(benchmark, models, variant, task):
    import open_clip
    device, batch = models["device"], models["batch"]
    if variant == "moe_triton" and device != "cuda":
        pytest.skip("the triton backend runs on CUDA only")
    if variant == "moe_triton" and "triton" not in clipmoe_kernels.BACKENDS:
        pytest.fail("backend triton is not available in this install")
    model = _select(models, variant)
    images, texts = models["images"], models["texts"]

    model.eval()
    with torch.no_grad(), _autocast(device):
        got = (model.encode_image(images), model.encode_text(texts))
    err = max(relative_error(g.float(), w.float()) for g, w in zip(got, models["dense_embeddings"], strict=True))
    if not err <= CHECK_RTOL[device]:
        pytest.fail(f"{variant}: embeddings differ from the dense model's by {err:.2e} (relative)")

    if task == "train_step":
        model.train()
        loss_fn = open_clip.ClipLoss()
        # lr 0: the weights stay as checked above for the next variant.
        run = clip_train_step(model, images, texts, loss_fn, lambda: _autocast(device), moe=variant != "dense")
    else:
        encode = model.encode_image if task == "infer_image" else model.encode_text
        data = images if task == "infer_image" else texts

        def run():
            with torch.no_grad(), _autocast(device):
                encode(data)
    benchmark.group = f"e2e {configs.E2E_MODEL} b{batch} {task}"
    benchmark.extra_info.update(kind="e2e", provider=variant, task=task, items=batch, device=device,
                                check_rel_err=err)
    time_provider(benchmark, run, device, heavy=True)
