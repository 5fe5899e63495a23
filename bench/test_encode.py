"""`clipmoe encode` throughput: images/s of clipmoe.eval.encode.encode_dataset (image files -> DataLoader ->
preprocess -> encode_image -> normalised float16 shards) for a dense open_clip ViT-B/32 and its upcycled CLIP-MoE
(E=4, top-2, experts copied) on each backend (run: pytest bench/test_encode.py --benchmark -s).

Each variant's embeddings are first checked against the dense model's. extra_info holds items_per_s and, for the
MoE variants, slowdown_vs_dense = variant median time / dense median time (the goal on CPU: at most 2, since an
upcycled block runs 2x the FFN FLOPs at top-2).
"""
import copy

import numpy as np
import pytest
import torch

import clipmoe
import clipmoe_kernels
from bench import configs
from bench.utils import relative_error, time_provider

VARIANTS = ("dense", "moe_naive", "moe_torch", "moe_triton")
ITEMS = {"cpu": 32, "cuda": 2048}
BATCH = {"cpu": 16, "cuda": 256}
WORKERS = {"cpu": 0, "cuda": 8}  # CPU: the 2 cores go to the model; CUDA: decoding must keep up
CHECK_RTOL = {"cpu": 1e-4, "cuda": 2e-2}
_MEDIANS = {}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import open_clip
    from PIL import Image

    from clipmoe.eval.encode import model_transforms, read_items
    device = "cuda" if torch.cuda.is_available() else "cpu"
    folder = tmp_path_factory.mktemp("encode_images")
    rng = np.random.default_rng(0)
    for i in range(ITEMS[device]):
        Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
    torch.manual_seed(0)
    dense = open_clip.create_model(configs.E2E_MODEL, pretrained=None, device=device).eval()
    moe = clipmoe.upcycle(copy.deepcopy(dense), num_experts=configs.E2E_EXPERTS, top_k=configs.TOP_K).eval()
    preprocess, tokenizer = model_transforms(dense, configs.E2E_MODEL)
    return {"dense": dense, "moe": moe, "items": read_items(str(folder)), "preprocess": preprocess,
            "tokenizer": tokenizer, "device": device, "out": tmp_path_factory.mktemp("encode_out")}


def _model(setup, variant):
    if variant == "dense":
        return setup["dense"]
    for m in setup["moe"].modules():
        if isinstance(m, clipmoe.MoEFFN):
            m.backend = variant.removeprefix("moe_")
    return setup["moe"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_encode_throughput(benchmark, setup, variant):
    from clipmoe.eval.encode import encode_dataset, read_shards
    device = setup["device"]
    if variant == "moe_triton" and (device != "cuda" or "triton" not in clipmoe_kernels.BACKENDS):
        pytest.skip("the triton backend runs on CUDA only")
    model = _model(setup, variant)
    runs = iter(range(1000))

    def run():
        out = setup["out"] / f"{variant}-{next(runs)}"  # a fresh folder: nothing to resume
        encode_dataset(model, setup["items"], setup["preprocess"], setup["tokenizer"], out,
                       settings={"model": variant}, shard_size=len(setup["items"]), batch_size=BATCH[device],
                       num_workers=WORKERS[device], device=device, dtype="float32")
        return out

    first = read_shards(run())["image"]
    if variant == "dense":
        _MEDIANS["dense_embeddings"] = first
    elif "dense_embeddings" in _MEDIANS:
        err = relative_error(torch.from_numpy(first), torch.from_numpy(_MEDIANS["dense_embeddings"]))
        if not err <= CHECK_RTOL[device]:
            pytest.fail(f"{variant}: encode output differs from the dense model's by {err:.2e} (relative)")
    benchmark.group = f"encode {configs.E2E_MODEL} {len(setup['items'])} images b{BATCH[device]}"
    benchmark.extra_info.update(kind="encode", provider=variant, items=len(setup["items"]), device=device)
    time_provider(benchmark, run, device, heavy=True)
    median = benchmark.stats.stats.median
    _MEDIANS[variant] = median
    benchmark.extra_info["items_per_s"] = len(setup["items"]) / median
    line = f"encode {variant}: {len(setup['items']) / median:.1f} images/s"
    if variant != "dense" and "dense" in _MEDIANS:
        benchmark.extra_info["slowdown_vs_dense"] = median / _MEDIANS["dense"]
        line += f", {median / _MEDIANS['dense']:.2f}x the dense time"
    print(line)
