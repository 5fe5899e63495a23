"""Where the row-tile GEMMs load their weight tiles through TMA tensor descriptors (`uses_weight_descriptor`,
`weight_operand`) and how a descriptor gets each config's box (fixed configs and autotune's pre_hook). Checked on
the CPU: the choice is asked about a GPU by its compute capability. The descriptor path's numerics are in the
interpreter tests (fixture `weight_loads`), its sm_90 code in tests/test_triton_compile.py."""
import json

import pytest
import torch

pytest.importorskip("triton")

from clipmoe_kernels import _triton_utils, grouped_up, tuned_configs  # noqa: E402
from clipmoe_kernels._triton_utils import (  # noqa: E402
    BLOCK_M_GPU,
    BLOCK_M_GPU_LARGE,
    ENV_TRITON_TMA,
    GEMM_CONFIGS_LARGE,
    TensorDescriptor,
    block_m_for,
    rows_bucket,
    uses_weight_descriptor,
    weight_operand,
)
from clipmoe_kernels.expert_ffn import expert_ffn_torch  # noqa: E402
from clipmoe_kernels.expert_ffn_triton import expert_ffn_triton  # noqa: E402
from tests.moe_cases import expert_weights, routing  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402

HOPPER, AMPERE = (9, 0), (8, 0)
E, D, F = 4, 1024, 4096  # ViT-L/14


@pytest.fixture(autouse=True)
def _auto(monkeypatch):
    monkeypatch.delenv(ENV_TRITON_TMA, raising=False)


def w1_strides(w):
    """(stride_k, stride_n) of the up-projection's B[kk, n] = W1[e, n, kk] (as grouped_up passes them)."""
    return w.stride(2), w.stride(1)


def w1_like(dtype=torch.bfloat16, storage_offset=0, row_pad=0):
    """[E, F, D] weights, optionally starting `storage_offset` elements into their storage or with rows of D + row_pad
    elements (odd row strides)."""
    base = torch.empty(E * F * (D + row_pad) + storage_offset, dtype=dtype)
    return base[storage_offset:].view(E, F, D + row_pad)[..., :D]


TRAINING_BLOCK_M = block_m_for(torch.device("cuda"), 65_792 * 2, E)  # ViT-L/14 batch 256, top-2
BATCH1_BLOCK_M = block_m_for(torch.device("cuda"), 197 * 2, E)      # ViT-B/16 batch 1
INTERPRET_BLOCK_M = block_m_for(torch.device("cpu"), 10, E)         # CPU tensors (tests)


def test_the_training_shape_takes_tma_on_hopper():
    w = w1_like()
    assert TRAINING_BLOCK_M == BLOCK_M_GPU_LARGE
    assert uses_weight_descriptor(w, *w1_strides(w), TRAINING_BLOCK_M, capability=HOPPER)
    w2 = torch.empty(E, D, F, dtype=torch.bfloat16)  # the down-projection's two orientations
    assert uses_weight_descriptor(w2, w2.stride(2), w2.stride(1), TRAINING_BLOCK_M, capability=HOPPER)
    assert uses_weight_descriptor(w2, w2.stride(1), w2.stride(2), TRAINING_BLOCK_M, capability=HOPPER)


@pytest.mark.parametrize("why,weight,block_m,capability", [
    ("batch 1: 64-row tiles", lambda: w1_like(), BATCH1_BLOCK_M, HOPPER),
    ("no TMA unit before sm_90", lambda: w1_like(), TRAINING_BLOCK_M, AMPERE),
    ("a CPU tensor (no GPU)", lambda: w1_like(), TRAINING_BLOCK_M, None),
    ("base not 16-byte aligned", lambda: w1_like(storage_offset=1), TRAINING_BLOCK_M, HOPPER),
    ("row stride of 1025 elements", lambda: w1_like(row_pad=1), TRAINING_BLOCK_M, HOPPER),
    ("no contiguous dimension", lambda: w1_like()[:, :, ::2], TRAINING_BLOCK_M, HOPPER),
])
def test_the_pointer_path_is_kept(why, weight, block_m, capability):
    w = weight()
    assert not uses_weight_descriptor(w, *w1_strides(w), block_m, capability=capability), why


def test_column_major_experts_take_the_other_layout():
    """W1 stored as [E, D, F] (a transposed view [E, F, D]): its contiguous dimension is N, so the descriptor is over
    the [E, K, N] view ("kn") and the tiles are loaded as stored."""
    w = torch.empty(E, D, F, dtype=torch.bfloat16).transpose(1, 2)
    assert uses_weight_descriptor(w, *w1_strides(w), TRAINING_BLOCK_M, capability=HOPPER)


def test_the_environment_forces_either_path(monkeypatch):
    w = w1_like()
    monkeypatch.setenv(ENV_TRITON_TMA, "0")
    assert not uses_weight_descriptor(w, *w1_strides(w), TRAINING_BLOCK_M, capability=HOPPER)
    monkeypatch.setenv(ENV_TRITON_TMA, "1")
    assert uses_weight_descriptor(w, *w1_strides(w), INTERPRET_BLOCK_M)  # the interpreter (CPU tensors), any tiles
    assert not uses_weight_descriptor(w, *w1_strides(w), BATCH1_BLOCK_M, capability=HOPPER)  # never at batch 1
    assert not uses_weight_descriptor(w, *w1_strides(w), TRAINING_BLOCK_M, capability=AMPERE)  # still only valid
    odd = w1_like(row_pad=1)
    assert not uses_weight_descriptor(odd, *w1_strides(odd), TRAINING_BLOCK_M, capability=HOPPER)
    monkeypatch.setenv(ENV_TRITON_TMA, "yes")
    with pytest.raises(ValueError, match=ENV_TRITON_TMA):
        uses_weight_descriptor(w, *w1_strides(w), TRAINING_BLOCK_M, capability=HOPPER)


def test_batch_1_launches_get_the_weight_itself(monkeypatch):
    """The pointer path at batch 1 decides from the tile size alone (not even the environment is read) and builds
    nothing: the kernel argument is the weight tensor."""
    w = w1_like(torch.float32)
    def no_environment(*args):
        raise AssertionError("the batch-1 pointer path read the environment")
    monkeypatch.setattr(_triton_utils, "env_value", no_environment)
    arg, layout = weight_operand(w, D, F, *w1_strides(w), BLOCK_M_GPU)
    assert arg is w and layout == ""


def test_descriptors_view_each_expert_with_its_contiguous_dimension_last(monkeypatch):
    monkeypatch.setenv(ENV_TRITON_TMA, "1")
    w = torch.empty(E, 64, 32)  # [E, F, D]
    up, up_layout = weight_operand(w, 32, 64, w.stride(2), w.stride(1), INTERPRET_BLOCK_M)  # K = D, N = F: x W1ᵀ
    dx, dx_layout = weight_operand(w, 64, 32, w.stride(1), w.stride(2), INTERPRET_BLOCK_M)  # K = F, N = D: dh W1
    assert isinstance(up, TensorDescriptor) and up.base is w and up_layout == "nk"
    assert list(up.shape) == [E, 64, 32] and list(up.strides) == [64 * 32, 32, 1]
    assert dx_layout == "kn" and list(dx.shape) == [E, 64, 32] and list(dx.strides) == [64 * 32, 32, 1]
    _triton_utils.set_weight_block(up, up_layout, 128, 64)
    _triton_utils.set_weight_block(dx, dx_layout, 128, 64)
    assert up.block_shape == [1, 128, 64] and dx.block_shape == [1, 64, 128]  # one expert's tile, as N x K or K x N


@pytest.mark.parametrize("layout", ["nk", "kn"])
def test_autotune_sets_every_configs_box_before_it_runs(layout):
    """The autotuner of the descriptor path: each candidate's pre_hook gives the weight descriptor that config's box
    (Triton's Autotuner calls it with the launch's arguments and the config's meta before benchmarking the config
    and before the final launch); the pointer path's autotuner has no hook."""
    tuned = grouped_up._grouped_up_fwd
    tuner = tuned.autotuner(BLOCK_M_GPU_LARGE, layout)
    assert len(tuner.configs) == len(tuned.candidates(BLOCK_M_GPU_LARGE))
    assert all(c.pre_hook is None for c in tuned.autotuner(BLOCK_M_GPU_LARGE, "").configs)
    w = torch.empty(E, 256, 128)
    desc = TensorDescriptor(w, list(w.shape), list(w.stride()), [1, 16, 16])
    for config in tuner.configs:
        config.pre_hook({"w1": desc, "WEIGHT_DESC": layout, **config.all_kwargs()})
        n, k = config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"]
        assert desc.block_shape == ([1, n, k] if layout == "nk" else [1, k, n])


def test_a_cached_config_of_the_descriptor_path_is_keyed_apart_and_sets_the_box(monkeypatch, tmp_path,
                                                                                  triton_interpreter):
    """The tuned-config key of a descriptor launch carries its layout (the pointer path's choice is another
    variant's), and the launch gives the descriptor that config's box; the result matches the reference."""
    monkeypatch.setenv(ENV_TRITON_TMA, "1")
    path = tmp_path / "tuned.json"
    monkeypatch.setenv(tuned_configs.ENV_TUNED_CONFIGS, str(path))
    tuned_configs.forget_tuned_configs()
    T, d, f, k = 19, 16, 48, 2
    bucket = rows_bucket(T * k, E)
    cached = GEMM_CONFIGS_LARGE[2]  # 128 x 32: neither the pointer variant's choice nor INTERPRET_CONFIG (64 x 64)
    pointer_choice = GEMM_CONFIGS_LARGE[0]
    keys = {tuned_configs.key_string(["D", "F", "ROWS_BUCKET"], [d, f, bucket], torch.float32) + suffix: cfg._asdict()
            for suffix, cfg in ((",WEIGHT_DESC=nk", cached), ("", pointer_choice))}
    path.write_text(json.dumps({"cpu-interpreter": {"_grouped_up_fwd_kernel": keys}}))
    boxes = []
    set_block = _triton_utils.set_weight_block

    def recording(desc, layout, block_n, block_k):
        set_block(desc, layout, block_n, block_k)
        boxes.append((layout, list(desc.block_shape)))
    monkeypatch.setattr(_triton_utils, "set_weight_block", recording)
    monkeypatch.setattr(grouped_up._grouped_up_fwd, "candidates", lambda block_m: GEMM_CONFIGS_LARGE)
    ids, w = routing(T, E, k)
    x, params = torch.randn(T, d), expert_weights(d, f, E)
    try:
        y = expert_ffn_triton(x, ids, w, *params)
    finally:
        tuned_configs.forget_tuned_configs()
    assert ("nk", [1, cached.BLOCK_N, cached.BLOCK_K]) in boxes
    assert_close(y, expert_ffn_torch(x.double(), ids, w.double(), *[p.double() for p in params]), torch.float32)
