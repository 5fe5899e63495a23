"""The Triton kernels compiled on a CUDA device (all tests marked `gpu`, skipped without one).

What only a GPU can check: bf16 (the interpreter's bf16 math is wrong), CLIP-size shapes, the autotuned path,
bitwise repeatability of compiled kernels, torch.compile(fullgraph=True) with inductor, CUDA-graph capture (no host
synchronisation anywhere), a shape past the int32 offset bound, and zero-token experts on a poisoned allocator.
fp32 runs with TF32 off (conftest) and is judged by the fp32 table against fp64; fp16/bf16 by the 2x rule.
Most tests pin one tile config (one compile per kernel variant instead of autotuning every shape); the autotuned
path has its own test.
"""
import math

import pytest
import torch

pytest.importorskip("triton")

from bench.utils import capture_cuda_graph  # noqa: E402
from clipmoe import collect_aux_losses  # noqa: E402
from clipmoe_kernels._triton_utils import ENV_TRITON_CONFIG  # noqa: E402
from clipmoe_kernels.expert_ffn import expert_ffn_torch  # noqa: E402
from clipmoe_kernels.expert_ffn_triton import expert_ffn_triton  # noqa: E402
from clipmoe_kernels.router import router_ref, topk_routing_triton  # noqa: E402
from clipmoe_kernels.routing import topk_routing_ref  # noqa: E402
from tests.tolerances import assert_close, assert_close_lowp  # noqa: E402

pytestmark = pytest.mark.gpu
DEV = "cuda"
NAMES = ["x", "topk_weights", "w1", "b1", "w2", "b2"]
PINNED = "BLOCK_N=64,BLOCK_K=32,num_warps=4,num_stages=3"


@pytest.fixture(autouse=True)
def _compiled(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv(ENV_TRITON_CONFIG, PINNED)


def routing(T, E, k, device=None, case="random"):
    device = device or DEV
    if case == "random":
        ids = torch.rand(T, E).argsort(dim=1)[:, :k]
    elif case == "two_experts":  # only experts 0 and 2 receive tokens (k <= 2)
        ids = torch.tensor([[0, 2]]).repeat(T, 1)[:, :k]
    else:
        raise ValueError(case)
    w = torch.rand(T, k) + 0.1
    return ids.to(device), (w / w.sum(-1, keepdim=True)).to(device)


def problem(T, D, F, E, k, dtype, device=None, case="random"):
    device = device or DEV
    ids, w = routing(T, E, k, device, case)
    tensors = [torch.randn(T, D) * 0.5, torch.randn(E, F, D) / D**0.5, torch.randn(E, F) * 0.1,
               torch.randn(E, D, F) / F**0.5, torch.randn(E, D) * 0.1]
    x, w1, b1, w2, b2 = [t.to(device=device, dtype=dtype) for t in tensors]
    # Upstream gradient ~ 1/sqrt(rows per expert): weight gradients (sums over an expert's rows) stay O(1), where
    # the 2x rule's floor is about one ulp (kernel and torch round the same fp32 sums to 16 bits).
    g = torch.randn(T, D, device=device) / math.sqrt(max(1.0, T * k / E))
    return ids, w, (x, w1, b1, w2, b2), g


def run(fn, x, ids, w, params, activation, g):
    leaves = [t.detach().clone().requires_grad_() for t in [x, w] + list(params)]
    xl, wl, w1, b1, w2, b2 = leaves
    y = fn(xl, ids, wl, w1, b1, w2, b2, activation=activation)
    grads = torch.autograd.grad(y, leaves, g.to(y.dtype))
    return y, list(grads)


def check_against_reference(dtype, ids, w, tensors, g, activation):
    x, *params = tensors
    y, grads = run(expert_ffn_triton, x, ids, w, params, activation, g)
    y_hi, grads_hi = run(expert_ffn_torch, x.double(), ids, w.double(), [p.double() for p in params], activation,
                         g.double())
    assert y.dtype == dtype
    if dtype == torch.float32:
        assert_close(y, y_hi, torch.float32, "y")
        for name, got, want in zip(NAMES, grads, grads_hi, strict=True):
            assert_close(got, want, torch.float32, f"d{name}")
        return
    y_lo, grads_lo = run(expert_ffn_torch, x, ids, w, params, activation, g)
    assert_close_lowp(y, y_hi, y_lo, "y")
    for name, got, hi, lo in zip(NAMES, grads, grads_hi, grads_lo, strict=True):
        assert_close_lowp(got.to(dtype), hi, lo, f"d{name}")  # d topk_weights (fp32) with the 16-bit floor


SHAPES = [
    # (T, D, F, E, k, activation)
    (1, 64, 128, 4, 2, "quick_gelu"),      # one token
    (37, 97, 47, 4, 2, "gelu"),            # odd D and F (unaligned strides), partial tiles
    (200, 768, 3072, 4, 2, "quick_gelu"),  # ViT-B/32 MLP width, ~100 rows per expert
    (300, 512, 2048, 8, 2, "gelu"),        # E = 8
    (100, 128, 256, 1, 1, "gelu_tanh"),    # E = k = 1: a dense MLP
    (64, 128, 256, 8, 8, "quick_gelu"),    # k = E = 8
]


@pytest.mark.parametrize("T,D,F,E,k,activation", SHAPES)
def test_bf16_matches_reference(T, D, F, E, k, activation):
    ids, w, tensors, g = problem(T, D, F, E, k, torch.bfloat16)
    check_against_reference(torch.bfloat16, ids, w, tensors, g, activation)


# fp32 and fp16 are covered shape by shape in the interpreter (tests/test_triton_expert_ffn.py); compiled, two shapes
# each keep the check run short (every dtype x activation x k is another kernel compile).
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,D,F,E,k,activation", [SHAPES[1], SHAPES[2]])
def test_fp32_fp16_match_reference(T, D, F, E, k, activation, dtype):
    ids, w, tensors, g = problem(T, D, F, E, k, dtype)
    check_against_reference(dtype, ids, w, tensors, g, activation)


# 128-row tiles (4,224 rows per expert: the tiles where the default choice takes TMA on sm_90; 64-row tiles never do),
# pinned to a config autotune can pick there for every row-tile GEMM. "odd": W2's rows of 500 bf16 (1,000 bytes)
# are not 16-byte aligned, so W2 stays on pointer loads while W1 [E, 500, 200] takes TMA.
TMA_CONFIG = "BLOCK_N=64,BLOCK_K=64,num_warps=8,num_stages=3"
TMA_SHAPES = [pytest.param((8448, 256, 512, 4, 2, "gelu"), TMA_CONFIG, id="aligned"),
              pytest.param((8448, 200, 500, 4, 2, "quick_gelu"), TMA_CONFIG, id="odd")]


@pytest.mark.parametrize("shape,config", TMA_SHAPES)
def test_weight_loads_by_pointers_and_by_tma_match_reference(shape, config, weight_loads, monkeypatch):
    """bf16 forward and every gradient with the weight tiles loaded by pointers and by TMA descriptors (sm_90+)."""
    if weight_loads.path != "pointer" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA tensor descriptors need sm_90 or newer")
    monkeypatch.setenv(ENV_TRITON_CONFIG, config)
    T, D, F, E, k, activation = shape
    ids, w, tensors, g = problem(T, D, F, E, k, torch.bfloat16)
    check_against_reference(torch.bfloat16, ids, w, tensors, g, activation)
    weight_loads.expect((tensors[1], {"nk", "kn"}), (tensors[3], {"nk", "kn"}))


@pytest.mark.parametrize("weight_loads", ["auto"], indirect=True)
def test_training_size_segments_take_tma_by_default(weight_loads, monkeypatch):
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA tensor descriptors need sm_90 or newer")
    test_weight_loads_by_pointers_and_by_tma_match_reference(*TMA_SHAPES[0].values, weight_loads, monkeypatch)


def test_autotuned_path(monkeypatch):
    """Without CLIPMOE_TRITON_CONFIG the kernels autotune (bf16, CLIP-like shape); results are repeatable after."""
    monkeypatch.delenv(ENV_TRITON_CONFIG)
    from clipmoe_kernels import grouped_down, grouped_gemm, grouped_up
    T, D, F, E, k = 256, 256, 1024, 4, 2
    ids, w, tensors, g = problem(T, D, F, E, k, torch.bfloat16)
    check_against_reference(torch.bfloat16, ids, w, tensors, g, "quick_gelu")
    for tuned in (grouped_up._grouped_up_fwd, grouped_gemm._rows_to_slots, grouped_gemm._rows_to_slots_dx,
                  grouped_down._grouped_down_bwd, grouped_gemm._grouped_wgrad):
        assert tuned._tuned and all(t.best_config is not None for t in tuned._tuned.values())  # per BLOCK_M
    x, *params = tensors
    first = run(expert_ffn_triton, x, ids, w, params, "quick_gelu", g)
    second = run(expert_ffn_triton, x, ids, w, params, "quick_gelu", g)
    assert torch.equal(first[0], second[0])
    for a, b in zip(first[1], second[1], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_two_runs_are_bitwise_equal(dtype):
    ids, w, (x, *params), g = problem(300, 512, 2048, 8, 2, dtype)
    y1, grads1 = run(expert_ffn_triton, x, ids, w, params, "gelu", g)
    y2, grads2 = run(expert_ffn_triton, x, ids, w, params, "gelu", g)
    assert torch.equal(y1, y2)
    for name, a, b in zip(NAMES, grads1, grads2, strict=True):
        assert torch.equal(a, b), name


def test_zero_token_experts_on_a_poisoned_allocator():
    """Weight gradients of experts without tokens are exact zeros even when the allocator hands out NaN-filled
    memory (docs/kernels.md, "Numerics")."""
    junk = torch.full((64 << 20,), float("nan"), device=DEV)  # 256 MiB of NaN left in the caching allocator
    del junk
    E = 6
    ids, w, (x, *params), g = problem(50, 128, 256, E, 2, torch.bfloat16, case="two_experts")
    y, grads = run(expert_ffn_triton, x, ids, w, params, "gelu", g)
    empty = [1, 3, 4, 5]
    for name, grad in zip(NAMES[2:], grads[2:], strict=True):
        assert torch.isfinite(grad).all(), name
        assert torch.all(grad[empty] == 0), f"d{name} of an expert without tokens must be exactly zero"


def layer(x, router_w, w1, b1, w2, b2, k=2):
    probs, w, ids, counts, prob_sums = topk_routing_triton(x @ router_w.T, k)[:5]
    E = router_w.shape[0]
    balance = E * ((counts.float() / x.shape[0]) * (prob_sums / x.shape[0])).sum()
    return expert_ffn_triton(x, ids, w, w1, b1, w2, b2, activation="quick_gelu"), balance


def layer_inputs(T=128, D=256, F=512, E=4, dtype=torch.float32):
    x = torch.randn(T, D, device=DEV, dtype=dtype)
    router_w = torch.randn(E, D, device=DEV, dtype=dtype) / D**0.5 * 4
    _, _, (_, *params), _ = problem(T, D, F, E, 2, dtype)
    return [x, router_w] + params


def test_compile_fullgraph_inductor():
    leaves = [t.requires_grad_() for t in layer_inputs()]
    g = torch.randn(leaves[0].shape, device=DEV)
    compiled = torch.compile(layer, fullgraph=True)
    results = []
    for fn in (compiled, layer):
        y, balance = fn(*leaves)
        results.append((y, balance, torch.autograd.grad((y * g).sum() + balance, leaves)))
    (y_c, bal_c, grads_c), (y_e, bal_e, grads_e) = results
    assert_close(y_c, y_e, torch.float32, "y")
    assert_close(bal_c, bal_e, torch.float32, "balance")
    for a, b in zip(grads_c, grads_e, strict=True):
        assert_close(a, b, torch.float32)


def test_cuda_graph_capture_forward_and_backward():
    """Router + moe_align + grouped GEMMs + backward captured in one CUDA graph (fails on any host sync), replayed on
    new inputs: same results as eager (fp32 table; cuBLAS may pick another GEMM algorithm under capture)."""
    static = [t.requires_grad_() for t in layer_inputs()]
    g = torch.randn(static[0].shape, device=DEV)

    def step():
        y, balance = layer(*static)
        return (y, balance) + torch.autograd.grad((y * g).sum() + balance, static)

    graph, out_static = capture_cuda_graph(step, warmups=3)  # warm-up: compile kernels outside the capture
    fresh = layer_inputs()
    with torch.no_grad():
        for s, f in zip(static, fresh, strict=True):
            s.copy_(f)
    graph.replay()
    torch.cuda.synchronize()
    out_eager = step()
    for a, b in zip(out_static, out_eager, strict=True):
        assert_close(a, b, torch.float32)


def _moe_forward(moe):
    """MoEFFN forward plus its aux losses (what a training step adds to the loss), as one function to compile."""
    def forward(x):
        y = moe(x)
        losses = collect_aux_losses(moe)
        return y, losses.balance, losses.z_loss
    return forward


def _moe_module(dropout=0.0):
    from clipmoe import MoEFFN
    moe = MoEFFN(256, 512, num_experts=4, top_k=2, dropout=dropout, backend="triton", device=DEV)
    with torch.no_grad():
        moe.router.weight.mul_(4)
    return moe.train()


def test_moe_ffn_compile_fullgraph_inductor_with_aux_losses():
    """The module itself (router kernel, aux losses from its statistics, moe_align, grouped GEMMs) under
    torch.compile(fullgraph=True, inductor): same outputs, losses and gradients as eager."""
    moe = _moe_module()
    x = torch.randn(96, 2, 256, device=DEV, requires_grad=True)
    g = torch.randn(x.shape, device=DEV)
    params = [x] + list(moe.parameters())
    results = []
    for fn in (torch.compile(_moe_forward(moe), fullgraph=True), _moe_forward(moe)):
        y, balance, z = fn(x)
        results.append((y, balance, z, torch.autograd.grad((y * g).sum() + 0.01 * balance + 1e-3 * z, params)))
    for got, want in zip(results[0][:3], results[1][:3], strict=True):
        assert_close(got, want, torch.float32)
    for got, want in zip(results[0][3], results[1][3], strict=True):
        assert_close(got, want, torch.float32)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_moe_ffn_cuda_graph_with_autotune_and_dropout(monkeypatch, dropout):
    """A training step of the module (autotuned configs, fused dropout, aux losses) captured in one CUDA graph: no
    host synchronisation anywhere. Without dropout a replay on new inputs matches eager; with dropout the replay's
    mask is a fresh draw, so only finiteness is checked there."""
    monkeypatch.delenv(ENV_TRITON_CONFIG)  # the autotuned path (tuned during the warm-up, outside the capture)
    moe = _moe_module(dropout)
    static_x = torch.randn(64, 2, 256, device=DEV, requires_grad=True)
    g = torch.randn(static_x.shape, device=DEV)
    params = [static_x] + list(moe.parameters())

    def step():
        y, balance, z = _moe_forward(moe)(static_x)
        return (y,) + torch.autograd.grad((y * g).sum() + 0.01 * balance + 1e-3 * z, params)

    graph, out_static = capture_cuda_graph(step, warmups=3)
    with torch.no_grad():
        static_x.copy_(torch.randn_like(static_x))
    graph.replay()
    torch.cuda.synchronize()
    if dropout == 0:
        for a, b in zip(out_static, step(), strict=True):
            assert_close(a, b, torch.float32)
    else:
        assert all(torch.isfinite(t).all() for t in out_static)


def test_offsets_past_int32():
    """Routed rows x F > 2^31 (ViT-L/14 at batch 1024: TK·F = 526,336 x 4096 = 2.156e9): row offsets into the
    [TK, F] intermediates must be 64-bit. fp32 (TF32 off) so that a corrupted offset cannot hide under a 16-bit
    tolerance; oracle: expert_ffn_torch in fp32 (fp64 would need ~70 GB at this size)."""
    T, D, F, E, k = 2**18 + 1024, 64, 4096, 2, 2
    assert T * k * F > 2**31
    ids, w, (x, *params), g = problem(T, D, F, E, k, torch.float32)
    y, grads = run(expert_ffn_triton, x, ids, w, params, "quick_gelu", g)
    torch.cuda.synchronize()
    y_ref, grads_ref = run(expert_ffn_torch, x, ids, w, params, "quick_gelu", g)
    assert_close(y, y_ref, torch.float32, "y")
    for name, got, want in zip(NAMES, grads, grads_ref, strict=True):
        assert_close(got, want, torch.float32, f"d{name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_router(dtype):
    T, E, k = 5000, 8, 2
    spaced = torch.rand(T, E).argsort(dim=1).float() * 0.5  # no ties, also after rounding to bf16
    logits = (spaced + torch.randn(T, 1)).to(device=DEV, dtype=dtype)
    out = topk_routing_triton(logits, k)
    ref = router_ref(logits, k)
    assert torch.equal(out.topk_ids, ref.topk_ids) and torch.equal(out.expert_counts, ref.expert_counts)
    for name in ("probs", "topk_weights", "prob_sums"):
        assert_close(getattr(out, name), getattr(ref, name), torch.float32, name)
    leaf = logits.float().requires_grad_()
    c = torch.randn(E, device=DEV)
    o = topk_routing_triton(leaf, k)
    (grad,) = torch.autograd.grad(o.topk_weights.square().sum() + (o.prob_sums * c).sum(), leaf)
    leaf_ref = logits.double().requires_grad_()
    probs, weights, _ = topk_routing_ref(leaf_ref, k)
    (grad_ref,) = torch.autograd.grad(weights.square().sum() + (probs.sum(0) * c.double()).sum(), leaf_ref)
    assert_close(grad, grad_ref, torch.float32, "d logits")
