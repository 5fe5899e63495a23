"""expert_ffn_triton under the Triton interpreter (CPU): forward and every gradient vs the plain-torch reference.

fp32: assert_close (fp32 table) against the fp64 reference. fp16: the 2x rule of assert_close_lowp against the fp64
reference, with expert_ffn_torch run in fp16 as the low-precision baseline. bf16 only on GPU (tests/test_triton_gpu.py):
the interpreter's bf16 math is wrong. Shapes are tiny: interpreted GEMMs cost ~0.1 s per launch.
"""
import pytest
import torch

pytest.importorskip("triton")

from clipmoe_kernels._triton_utils import ENV_TRITON_CONFIG, block_m_for  # noqa: E402
from clipmoe_kernels.expert_ffn import expert_ffn_torch  # noqa: E402
from clipmoe_kernels.expert_ffn_triton import expert_ffn_triton  # noqa: E402
from clipmoe_kernels.router import topk_routing_triton  # noqa: E402
from tests.moe_cases import GRAD_NAMES as NAMES  # noqa: E402
from tests.moe_cases import expert_weights, routing, run_with_grads  # noqa: E402
from tests.tolerances import assert_close, assert_close_lowp  # noqa: E402

pytestmark = pytest.mark.usefixtures("triton_interpreter")
weights = expert_weights
run = run_with_grads


SHAPES = [
    # (T, D, F, E, k, activation)
    (5, 16, 32, 4, 2, "quick_gelu"),   # T*k = 10 rows: fewer than one tile (BLOCK_M = 16)
    (37, 97, 47, 4, 2, "gelu"),        # T not a multiple of the tile, odd D and F
    (24, 32, 16, 1, 1, "gelu_tanh"),   # E = 1, k = 1: a dense MLP (k = 1 writes y without the combine)
    (29, 24, 40, 3, 3, "quick_gelu"),  # k = E = 3
    (40, 16, 24, 8, 2, "gelu"),        # E = 8: several experts with a partial tile
    (33, 20, 28, 8, 1, "gelu_tanh"),   # E = 8, k = 1
    (18, 16, 16, 8, 8, "quick_gelu"),  # k = E = 8
]


@pytest.mark.parametrize("T,D,F,E,k,activation", SHAPES)
def test_fp32_matches_reference(T, D, F, E, k, activation, weight_loads):
    ids, w = routing(T, E, k)
    x = torch.randn(T, D)
    params = weights(D, F, E)
    g = torch.randn(T, D)
    y, grads = run(expert_ffn_triton, x, ids, w, params, activation, g)
    y_ref, grads_ref = run(expert_ffn_torch, x.double(), ids, w.double(), [p.double() for p in params], activation,
                           g.double())
    assert y.dtype == torch.float32
    assert_close(y, y_ref, torch.float32, "y")
    for name, got, want in zip(NAMES, grads, grads_ref, strict=True):
        assert got.dtype == (torch.float32), name
        assert_close(got, want, torch.float32, f"d{name}")
    weight_loads.expect((params[0], {"nk", "kn"}), (params[2], {"nk", "kn"}))


@pytest.mark.parametrize("T,D,F,E,k,activation", SHAPES)
def test_fp16_within_twice_torch_error(T, D, F, E, k, activation, weight_loads):
    ids, w = routing(T, E, k)
    x = (torch.randn(T, D) * 0.5).half()
    params = weights(D, F, E, torch.float16)
    # Upstream gradient scaled so that the weight gradients (sums over an expert's rows) stay O(1): the 2x rule's
    # floor (1e-3) is about one fp16 ulp at 1.
    g = torch.randn(T, D) * 0.25
    y, grads = run(expert_ffn_triton, x, ids, w, params, activation, g)
    y_hi, grads_hi = run(expert_ffn_torch, x.double(), ids, w.double(), [p.double() for p in params], activation,
                         g.double())
    y_lo, grads_lo = run(expert_ffn_torch, x, ids, w, params, activation, g)
    assert y.dtype == torch.float16
    assert_close_lowp(y, y_hi, y_lo, "y")
    for name, got, hi, lo in zip(NAMES, grads, grads_hi, grads_lo, strict=True):
        # d topk_weights is fp32 (like the weights) but computed from fp16 data: judged with the fp16 floor.
        assert_close_lowp(got.to(torch.float16), hi, lo, f"d{name}")
    weight_loads.expect((params[0], {"nk", "kn"}), (params[2], {"nk", "kn"}))


EDGE_ROUTINGS = [
    # (T, D, F, E, k, case)
    (21, 16, 24, 4, 2, "empty_expert"),  # expert 1 receives no token
    (20, 16, 24, 4, 1, "all_to_one"),    # every token on expert 3, experts 0-2 empty
    (19, 24, 16, 3, 2, "top1_to_one"),   # slot 0 on expert 0, slot 1 on expert 2, expert 1 empty
]


@pytest.mark.parametrize("T,D,F,E,k,case", EDGE_ROUTINGS)
def test_edge_routings_and_zero_grads_of_empty_experts(T, D, F, E, k, case, weight_loads):
    ids, w = routing(T, E, k, case)
    x = torch.randn(T, D)
    params = weights(D, F, E)
    g = torch.randn(T, D)
    y, grads = run(expert_ffn_triton, x, ids, w, params, "gelu", g)
    y_ref, grads_ref = run(expert_ffn_torch, x.double(), ids, w.double(), [p.double() for p in params], "gelu",
                           g.double())
    assert_close(y, y_ref, torch.float32, "y")
    for name, got, want in zip(NAMES, grads, grads_ref, strict=True):
        assert_close(got, want, torch.float32, f"d{name}")
    unused = torch.ones(E, dtype=torch.bool)
    unused[ids.unique()] = False
    assert unused.any()
    for name, grad in zip(NAMES[2:], grads[2:], strict=True):
        assert torch.all(grad[unused] == 0), f"d{name} of an expert without tokens must be exactly zero"
    weight_loads.expect((params[0], {"nk", "kn"}), (params[2], {"nk", "kn"}))


def test_non_contiguous_inputs():
    """Strided x, transposed-storage weights and a non-contiguous routing: read through strides, no copies needed."""
    T, D, F, E, k = 23, 20, 36, 4, 2
    ids, w = routing(T, E, k)
    x_base = torch.randn(D, 2 * T)
    x = x_base.t()[::2]  # [T, D], both strides != (D, 1)
    w1, b1, w2, b2 = weights(D, F, E)
    w1_t = w1.transpose(1, 2).contiguous().transpose(1, 2)  # [E, F, D] with column-major experts
    w2_t = w2.transpose(1, 2).contiguous().transpose(1, 2)
    b1_s = torch.stack([b1, b1], dim=-1)[..., 0]  # [E, F] with stride (2F, 2)
    ids_nc = torch.stack([ids, ids], dim=-1)[..., 0]
    w_nc = torch.stack([w, w], dim=-1)[..., 0]
    for t in (x, w1_t, w2_t, b1_s, ids_nc, w_nc):
        assert not t.is_contiguous()
    g = torch.randn(T, D)

    def fn(x_, ids_, w_, w1_, b1_, w2_, b2_, activation):
        return expert_ffn_triton(x_, ids_, w_, w1_, b1_, w2_, b2_, activation)
    y, grads = run(fn, x, ids_nc, w_nc, [w1_t, b1_s, w2_t, b2], "quick_gelu", g)
    # run() clones (contiguous); call directly on the strided views too
    y_view = expert_ffn_triton(x, ids_nc, w_nc, w1_t, b1_s, w2_t, b2)
    y_ref, grads_ref = run(expert_ffn_torch, x.double(), ids, w.double(), [p.double() for p in (w1, b1, w2, b2)],
                           "quick_gelu", g.double())
    assert_close(y_view, y_ref, torch.float32, "y (strided views)")
    assert_close(y, y_ref, torch.float32, "y")
    for name, got, want in zip(NAMES, grads, grads_ref, strict=True):
        assert_close(got, want, torch.float32, f"d{name}")


def test_strided_views_reach_the_kernels_with_grad():
    """Gradients with respect to leaves used through non-contiguous views (the kernels read the views' strides)."""
    T, D, F, E, k = 17, 16, 24, 3, 2
    ids, w = routing(T, E, k)
    x_leaf = torch.randn(D, T, requires_grad=True)
    w1_leaf = torch.randn(E, D, F, requires_grad=True)
    b1, w2, b2 = weights(D, F, E)[1:]
    y = expert_ffn_triton(x_leaf.t(), ids, w, w1_leaf.transpose(1, 2) / D**0.5, b1, w2, b2, activation="gelu")
    g = torch.randn(T, D)
    gx, gw1 = torch.autograd.grad(y, [x_leaf, w1_leaf], g)
    xr = x_leaf.detach().double().requires_grad_()
    w1r = w1_leaf.detach().double().requires_grad_()
    yr = expert_ffn_torch(xr.t(), ids, w.double(), w1r.transpose(1, 2) / D**0.5, b1.double(), w2.double(),
                          b2.double(), activation="gelu")
    gxr, gw1r = torch.autograd.grad(yr, [xr, w1r], g.double())
    assert_close(y, yr, torch.float32, "y")
    assert_close(gx, gxr, torch.float32, "dx")
    assert_close(gw1, gw1r, torch.float32, "dw1")


def test_two_runs_are_bitwise_equal():
    T, D, F, E, k = 41, 24, 40, 4, 2
    ids, w = routing(T, E, k)
    x = torch.randn(T, D)
    params = weights(D, F, E)
    g = torch.randn(T, D)
    y1, grads1 = run(expert_ffn_triton, x, ids, w, params, "gelu", g)
    y2, grads2 = run(expert_ffn_triton, x, ids, w, params, "gelu", g)
    assert torch.equal(y1, y2)
    for name, a, b in zip(NAMES, grads1, grads2, strict=True):
        assert torch.equal(a, b), name


def test_pinned_small_tile_config(monkeypatch):
    """CLIPMOE_TRITON_CONFIG: 16x16 tiles give several N tiles and K steps (with masked tails) on a small shape."""
    monkeypatch.setenv(ENV_TRITON_CONFIG, "BLOCK_N=16,BLOCK_K=16")
    T, D, F, E, k = 22, 37, 45, 3, 2
    ids, w = routing(T, E, k)
    x = torch.randn(T, D)
    params = weights(D, F, E)
    g = torch.randn(T, D)
    y, grads = run(expert_ffn_triton, x, ids, w, params, "gelu_tanh", g)
    y_ref, grads_ref = run(expert_ffn_torch, x.double(), ids, w.double(), [p.double() for p in params], "gelu_tanh",
                           g.double())
    assert_close(y, y_ref, torch.float32, "y")
    for name, got, want in zip(NAMES, grads, grads_ref, strict=True):
        assert_close(got, want, torch.float32, f"d{name}")


@pytest.mark.parametrize("value", ["BLOCK_N=48", "BLOCK_M=32", "BLOCK_N", "BLOCK_K=abc"])
def test_bad_pinned_config_raises(monkeypatch, value):
    monkeypatch.setenv(ENV_TRITON_CONFIG, value)
    ids, w = routing(4, 2, 1)
    with pytest.raises(ValueError, match=ENV_TRITON_CONFIG):
        expert_ffn_triton(torch.randn(4, 16), ids, w, *weights(16, 16, 2))


@pytest.mark.parametrize("needs", [("x",), ("topk_weights",), ("w1", "b2"), ("w2",)])
def test_partial_gradients(needs):
    """Only the requested gradients are computed (the backward skips kernels); they match the full run."""
    T, D, F, E, k = 19, 16, 24, 4, 2
    ids, w = routing(T, E, k)
    tensors = dict(zip(NAMES, [torch.randn(T, D), w] + weights(D, F, E), strict=True))
    g = torch.randn(T, D)
    leaves = {n: t.clone().requires_grad_(n in needs) for n, t in tensors.items()}
    y = expert_ffn_triton(leaves["x"], ids, leaves["topk_weights"], leaves["w1"], leaves["b1"], leaves["w2"],
                          leaves["b2"], activation="gelu")
    got = torch.autograd.grad(y, [leaves[n] for n in needs], g)
    _, full = run(expert_ffn_triton, tensors["x"], ids, w, [tensors[n] for n in NAMES[2:]], "gelu", g)
    for name, gr in zip(needs, got, strict=True):
        assert torch.equal(gr, full[NAMES.index(name)]), name


def test_no_grad_matches_grad_path():
    T, D, F, E, k = 21, 16, 24, 4, 2
    ids, w = routing(T, E, k)
    x = torch.randn(T, D)
    params = weights(D, F, E)
    with torch.no_grad():
        y_ng = expert_ffn_triton(x, ids, w, *params)
    y, _ = run(expert_ffn_triton, x, ids, w, params, "quick_gelu", torch.randn(T, D))
    assert torch.equal(y_ng, y)


def test_zero_tokens():
    E, D, F = 4, 16, 24
    ids = torch.empty(0, 2, dtype=torch.long)
    w = torch.empty(0, 2)
    x = torch.randn(0, D, requires_grad=True)
    params = [p.requires_grad_() for p in weights(D, F, E)]
    y = expert_ffn_triton(x, ids, w, *params)
    assert y.shape == (0, D)
    grads = torch.autograd.grad(y.sum(), [x] + params)
    for p, gr in zip([x] + params, grads, strict=True):
        assert gr.shape == p.shape and torch.all(gr == 0)


def test_fp64_falls_back_to_torch():
    T, D, F, E, k = 9, 8, 12, 3, 2
    ids, w = routing(T, E, k)
    x = torch.randn(T, D, dtype=torch.float64)
    params = weights(D, F, E, torch.float64)
    assert torch.equal(expert_ffn_triton(x, ids, w, *params), expert_ffn_torch(x, ids, w, *params))


def test_autocast_fp16():
    T, D, F, E, k = 15, 16, 24, 4, 2
    ids, w = routing(T, E, k)
    x = torch.randn(T, D)
    params = weights(D, F, E)
    with torch.autocast("cpu", dtype=torch.float16):
        y = expert_ffn_triton(x, ids, w, *params)
        y_lo = expert_ffn_torch(x, ids, w, *params)
    assert y.dtype == torch.float16 == y_lo.dtype
    y_hi = expert_ffn_torch(x.half().double(), ids, w.double(), *[p.half().double() for p in params])
    assert_close_lowp(y, y_hi, y_lo, "y under autocast")


def test_bf16_on_the_interpreter_raises():
    ids, w = routing(4, 2, 1)
    with pytest.raises(TypeError, match="bf16"):
        expert_ffn_triton(torch.randn(4, 16).bfloat16(), ids, w, *weights(16, 16, 2, torch.bfloat16))


def test_mixed_dtypes_without_autocast_raise():
    ids, w = routing(4, 2, 1)
    params = weights(16, 16, 2)
    with pytest.raises(TypeError, match="share one dtype"):
        expert_ffn_triton(torch.randn(4, 16).half(), ids, w, *params)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    ids, w = routing(4, 2, 1)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        expert_ffn_triton(torch.randn(4, 16), ids, w, *weights(16, 16, 2))
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        topk_routing_triton(torch.randn(4, 3), 2)


def test_bad_arguments_are_named():
    ids, w = routing(4, 2, 1)
    w1, b1, w2, b2 = weights(16, 16, 2)
    with pytest.raises(ValueError, match="b1"):
        expert_ffn_triton(torch.randn(4, 16), ids, w, w1, b1[:, :3], w2, b2)
    with pytest.raises(ValueError, match="activation"):
        expert_ffn_triton(torch.randn(4, 16), ids, w, w1, b1, w2, b2, activation="relu")


def test_compile_fullgraph_router_and_experts():
    """torch.compile(fullgraph=True) traces router + moe_align + the custom ops + both autograd Functions without a
    graph break (aot_eager: the CPU interpreter cannot run inductor-compiled Triton); same values as eager."""
    T, D, F, E, k = 20, 16, 32, 4, 2
    x = torch.randn(T, D, requires_grad=True)
    router_w = torch.randn(E, D, requires_grad=True)
    params = [p.requires_grad_() for p in weights(D, F, E)]
    leaves = [x, router_w] + params

    def layer(x, router_w, w1, b1, w2, b2):
        probs, w, ids, counts, prob_sums = topk_routing_triton(x @ router_w.T, k)[:5]
        balance = E * ((counts.float() / T) * (prob_sums / T)).sum()
        return expert_ffn_triton(x, ids, w, w1, b1, w2, b2, activation="gelu"), balance

    g = torch.randn(T, D)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (compiled, layer):
        y, balance = fn(*leaves)
        results.append((y, balance, torch.autograd.grad((y * g).sum() + balance, leaves)))
    (y_c, bal_c, grads_c), (y_e, bal_e, grads_e) = results
    assert torch.equal(y_c, y_e) and torch.equal(bal_c, bal_e)
    for a, b in zip(grads_c, grads_e, strict=True):
        assert_close(a, b)


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) impls and autograd registration of the grouped-GEMM custom ops."""
    from clipmoe_kernels.routing import moe_align
    T, D, F, E, k = 6, 16, 16, 3, 2
    ids, w = routing(T, E, k)
    x = torch.randn(T, D)
    w1, b1, w2, b2 = weights(D, F, E)
    meta = moe_align(ids, E, block_m_for(ids.device, ids.numel(), E))
    table = (meta.sorted_to_flat, meta.expert_offsets, meta.tile_expert, meta.tile_row_start)
    a, h = torch.ops.clipmoe.grouped_up(x, w1, b1, *table, k, "gelu", True)
    dy = torch.randn(T, D)
    dh = torch.randn(T * k, F)
    cases = [
        (torch.ops.clipmoe.grouped_up, (x, w1, b1, *table, k, "gelu", True)),
        (torch.ops.clipmoe.grouped_up, (x, w1, b1, *table, k, "gelu", False)),
        (torch.ops.clipmoe.grouped_down, (a, w2, b2, w, *table)),
        (torch.ops.clipmoe.grouped_down_bwd, (dy, h, w2, b2, w, *table, "gelu", True, True, True)),
        (torch.ops.clipmoe.grouped_up_bwd_dx, (dh, w1, *table, T, k)),
        (torch.ops.clipmoe.grouped_wgrad, (dh, x, w, meta.sorted_to_flat, meta.expert_offsets, k, False, True)),
        (torch.ops.clipmoe.grouped_wgrad, (dy, h, w, meta.sorted_to_flat, meta.expert_offsets, k, True, False)),
        (torch.ops.clipmoe.route_topk, (torch.randn(T, E), k, True)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_moe_ffn_module_triton_backend_layouts():
    """MoEFFN(backend="triton") on an (L, N, D) input and its non-contiguous (N, L, D) view: same outputs and
    gradients as backend="torch"."""
    from clipmoe import MoEFFN
    moe = MoEFFN(16, 32, num_experts=4, top_k=2, activation="gelu")
    with torch.no_grad():
        moe.router.weight.mul_(4)  # well-separated probabilities: no routing near-ties
    x_lnd = torch.randn(5, 3, 16)
    for x in (x_lnd, x_lnd.transpose(0, 1)):
        results = {}
        for backend in ("triton", "torch"):
            moe.backend = backend
            leaf = x.clone().requires_grad_()
            y = moe(leaf)
            params = [moe.router.weight, moe.w1, moe.b1, moe.w2, moe.b2]
            results[backend] = (y, torch.autograd.grad(y, [leaf] + params, torch.ones_like(y)))
        (y_k, grads_k), (y_t, grads_t) = results["triton"], results["torch"]
        assert y_k.shape == x.shape
        assert_close(y_k, y_t, torch.float32, "y")
        for name, a, b in zip(["x", "router", "w1", "b1", "w2", "b2"], grads_k, grads_t, strict=True):
            assert_close(a, b, torch.float32, f"d{name}")


def test_backend_env_triton_on_cpu_needs_the_interpreter(monkeypatch):
    from clipmoe import MoEFFN
    from clipmoe_kernels import select_backend
    monkeypatch.setenv("CLIPMOE_BACKEND", "triton")
    assert select_backend("auto", torch.device("cpu")) == "triton"
    assert select_backend("auto", torch.device("cuda")) == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        MoEFFN(8, 16)(torch.randn(3, 8))
    monkeypatch.delenv("CLIPMOE_BACKEND")
    assert select_backend("auto", torch.device("cpu")) == "torch"
    assert select_backend("auto", torch.device("cuda")) == "triton"
