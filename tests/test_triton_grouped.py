"""The grouped-GEMM custom ops one by one under the Triton interpreter (CPU), each against its plain-torch reference:
clipmoe::grouped_up, grouped_down (+ slot combine), grouped_down_bwd, grouped_up_bwd_dx, grouped_wgrad.

fp32 vs the reference in fp64 with the fp32 table; fp16 by the 2x rule against the reference run in fp16 (plain
torch) and in fp64. The end-to-end op (all of them chained, with autograd) is in test_triton_expert_ffn.py.
"""
import pytest
import torch

pytest.importorskip("triton")

from clipmoe_kernels._triton_utils import block_m_for  # noqa: E402
from clipmoe_kernels.activation import get_activation  # noqa: E402
from clipmoe_kernels.grouped_down import grouped_down_bwd_ref, grouped_down_dw2_input_ref, grouped_down_ref  # noqa: E402
from clipmoe_kernels.grouped_gemm import grouped_wgrad_ref, slot_combine, slot_combine_ref  # noqa: E402
from clipmoe_kernels.grouped_up import grouped_up_bwd_dx_ref, grouped_up_ref  # noqa: E402
from clipmoe_kernels.routing import moe_align  # noqa: E402
from tests.tolerances import assert_close, assert_close_lowp  # noqa: E402

ops = torch.ops.clipmoe


pytestmark = pytest.mark.usefixtures("triton_interpreter")


CASES = [
    # (T, D, F, E, k, activation)
    (7, 16, 24, 3, 2, "quick_gelu"),  # 14 rows: under one tile
    (27, 33, 21, 4, 2, "gelu"),       # odd D and F, partial tiles
    (20, 16, 16, 4, 1, "gelu_tanh"),  # k = 1: the GEMMs write token rows directly (no slot buffer)
    (27, 72, 40, 4, 2, "gelu"),       # D > BLOCK_K: two K steps, the second partial; 16-byte-aligned strides
]
# The odd case's weight strides (33 and 21 elements) are not 16-byte aligned: on the "tma" path (fixture
# weight_loads) it checks the fallback to pointer loads, the others the descriptor loads.


def problem(T, D, F, E, k, dtype):
    ids = torch.rand(T, E).argsort(dim=1)[:, :k]
    w = torch.rand(T, k) + 0.1
    w = w / w.sum(-1, keepdim=True)
    meta = moe_align(ids, E, block_m_for(ids.device, ids.numel(), E))
    x = (torch.randn(T, D) * 0.5).to(dtype)
    w1 = (torch.randn(E, F, D) / D**0.5).to(dtype)
    b1 = (torch.randn(E, F) * 0.1).to(dtype)
    w2 = (torch.randn(E, D, F) / F**0.5).to(dtype)
    b2 = (torch.randn(E, D) * 0.1).to(dtype)
    return ids, w, meta, x, w1, b1, w2, b2


def table(meta):
    return meta.sorted_to_flat, meta.expert_offsets, meta.tile_expert, meta.tile_row_start


def check(dtype, name, got, ref_fn, *tensors):
    """Compare `got` with ref_fn(*tensors) evaluated in fp64 (fp32 case) or by the 2x rule (fp16 case)."""
    hi = ref_fn(*[t.double() if t.is_floating_point() else t for t in tensors])
    if dtype == torch.float32:
        assert_close(got, hi, torch.float32, name)
    else:
        lo = ref_fn(*tensors)
        low = got if got.dtype == torch.float16 else got.to(torch.float16)  # fp32 outputs judged with the fp16 floor
        assert_close_lowp(low, hi, lo, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,D,F,E,k,activation", CASES)
def test_grouped_up(T, D, F, E, k, activation, dtype, weight_loads):
    ids, w, meta, x, w1, b1, w2, b2 = problem(T, D, F, E, k, dtype)
    a, h = ops.grouped_up(x, w1, b1, *table(meta), k, activation, True)
    assert a.dtype == h.dtype == dtype and a.shape == h.shape == (T * k, F)
    stf, off = meta.sorted_to_flat, meta.expert_offsets
    check(dtype, "h", h, lambda *t: grouped_up_ref(*t, stf, off, k, activation)[1], x, w1, b1)
    check(dtype, "a", a, lambda *t: grouped_up_ref(*t, stf, off, k, activation)[0], x, w1, b1)
    a2, h2 = ops.grouped_up(x, w1, b1, *table(meta), k, activation, False)
    assert h2.shape == (0, F) and torch.equal(a2, a)
    weight_loads.expect((w1, {"nk"}))  # tiles of W1[e] [F, D]: [BLOCK_N, BLOCK_K] boxes, transposed


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,D,F,E,k,activation", CASES)
def test_grouped_down(T, D, F, E, k, activation, dtype, weight_loads):
    ids, w, meta, x, w1, b1, w2, b2 = problem(T, D, F, E, k, dtype)
    a = torch.randn(T * k, F).to(dtype)
    y = ops.grouped_down(a, w2, b2, w, *table(meta))
    assert y.dtype == dtype and y.shape == (T, D)
    stf, off = meta.sorted_to_flat, meta.expert_offsets
    check(dtype, "y", y, lambda a_, w2_, b2_, w_: grouped_down_ref(a_, w2_, b2_, w_, stf, off), a, w2, b2, w)
    weight_loads.expect((w2, {"nk"}))  # W2[e]ᵀ: [BLOCK_N, BLOCK_K] boxes of W2[e] [D, F], transposed


def test_grouped_down_fp16_does_not_overflow_before_the_weight():
    """Expert outputs past the fp16 range are scaled by a small routing weight on the fp32 accumulator."""
    T, D, F, E, k = 9, 16, 16, 2, 2
    ids, w, meta, *_ = problem(T, D, F, E, k, torch.float16)
    a = torch.full((T * k, F), 8.0, dtype=torch.float16)
    w2 = torch.full((E, D, F), 1000.0, dtype=torch.float16)  # z = 16 * 8 * 1000 = 128000 > 65504
    b2 = torch.zeros(E, D, dtype=torch.float16)
    w = torch.full((T, k), 0.25)
    y = ops.grouped_down(a, w2, b2, w, *table(meta))
    assert torch.isfinite(y).all()
    assert torch.all(y == 64000.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,D,F,E,k,activation", CASES)
def test_grouped_down_bwd(T, D, F, E, k, activation, dtype, weight_loads):
    ids, w, meta, x, w1, b1, w2, b2 = problem(T, D, F, E, k, dtype)
    h = torch.randn(T * k, F).to(dtype)
    dy = (torch.randn(T, D) * 0.5).to(dtype)
    dh, ds, u = ops.grouped_down_bwd(dy, h, w2, b2, w, *table(meta), activation, True, True, True)
    assert dh.dtype == dtype and ds.dtype == torch.float32 and ds.shape == (T, k) and u.shape == h.shape
    stf, off = meta.sorted_to_flat, meta.expert_offsets

    def ref(i):
        return lambda dy_, h_, w2_, b2_, w_: grouped_down_bwd_ref(dy_, h_, w2_, b2_, w_, stf, off, activation)[i]
    check(dtype, "dh", dh, ref(0), dy, h, w2, b2, w)
    check(dtype, "ds", ds, ref(1), dy, h, w2, b2, w)
    check(dtype, "u", u, lambda h_, w_: grouped_down_dw2_input_ref(h_, w_, stf, activation), h, w)
    # each output alone is the same bits (the flags only skip work)
    dh_only, ds_none, u_none = ops.grouped_down_bwd(dy, h, w2, b2, w, *table(meta), activation, True, False)
    dh_none, ds_only, _ = ops.grouped_down_bwd(dy, h, w2, b2, w, *table(meta), activation, False, True)
    _, _, u_only = ops.grouped_down_bwd(dy, h, w2, b2, w, *table(meta), activation, False, False, True)
    assert torch.equal(dh_only, dh) and torch.equal(ds_only, ds) and torch.equal(u_only, u)
    assert ds_none.numel() == 0 and dh_none.numel() == 0 and u_none.numel() == 0
    weight_loads.expect((w2, {"kn"}))  # W2[e] [D, F] as stored: [BLOCK_K, BLOCK_N] boxes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,D,F,E,k,activation", CASES)
def test_grouped_up_bwd_dx(T, D, F, E, k, activation, dtype, weight_loads):
    ids, w, meta, x, w1, b1, w2, b2 = problem(T, D, F, E, k, dtype)
    dh = (torch.randn(T * k, F) * 0.5).to(dtype)
    dx = ops.grouped_up_bwd_dx(dh, w1, *table(meta), T, k)
    assert dx.dtype == dtype and dx.shape == (T, D)
    stf, off = meta.sorted_to_flat, meta.expert_offsets
    check(dtype, "dx", dx, lambda dh_, w1_: grouped_up_bwd_dx_ref(dh_, w1_, stf, off, T, k), dh, w1)
    weight_loads.expect((w1, {"kn"}))  # W1[e] [F, D] as stored: [BLOCK_K, BLOCK_N] boxes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,D,F,E,k,activation", CASES)
def test_grouped_wgrad_both_projections(T, D, F, E, k, activation, dtype):
    ids, w, meta, x, w1, b1, w2, b2 = problem(T, D, F, E, k, dtype)
    stf, off = meta.sorted_to_flat, meta.expert_offsets
    dh = (torch.randn(T * k, F) * 0.25).to(dtype)
    # up-projection: dW1 = Σ dhᵀ x[t(r)], db1 = Σ dh
    dw1, db1 = ops.grouped_wgrad(dh, x, w, stf, off, k, False, True)
    for i, (name, got) in enumerate((("dw1", dw1), ("db1", db1))):
        check(dtype, name, got,
              lambda g_, x_, w_, i=i: grouped_wgrad_ref(g_, x_, w_, stf, off, k, False, True)[i], dh, x, w)
    # down-projection: dW2 = Σ dy[t(r)]ᵀ u (u = s·act(h), expert-sorted), db2 = Σ s·dy[t(r)]
    dy = (torch.randn(T, D) * 0.25).to(dtype)
    u = torch.randn(T * k, F).to(dtype)
    dw2, db2 = ops.grouped_wgrad(dy, u, w, stf, off, k, True, False)
    assert dw2.shape == (E, D, F) and db2.shape == (E, D) and dw2.dtype == dtype
    for i, (name, got) in enumerate((("dw2", dw2), ("db2", db2))):
        check(dtype, name, got,
              lambda g_, u_, w_, i=i: grouped_wgrad_ref(g_, u_, w_, stf, off, k, True, False)[i], dy, u, w)


def test_grouped_wgrad_empty_experts_are_exact_zeros():
    T, D, F, E, k = 12, 16, 24, 5, 1
    ids = torch.tensor([[1], [3]]).repeat(T // 2, 1)  # experts 0, 2, 4 empty
    w = torch.ones(T, k)
    meta = moe_align(ids, E, block_m_for(ids.device, ids.numel(), E))
    dh, x = torch.randn(T, F), torch.randn(T, D)
    dw, db = ops.grouped_wgrad(dh, x, w, meta.sorted_to_flat, meta.expert_offsets, k, False, True)
    assert torch.all(dw[[0, 2, 4]] == 0) and torch.all(db[[0, 2, 4]] == 0)
    assert (dw[[1, 3]] != 0).any()


def test_slot_combine_in_slot_order():
    slots = torch.randn(13, 3, 150)
    out = torch.empty(13, 150, dtype=torch.float16)
    slot_combine(slots, out)
    assert torch.equal(out, slot_combine_ref(slots, torch.float16))


def test_activation_derivatives_match_autograd():
    """The kernels' act' (in grouped_down_bwd's dh) against autograd of the torch activations, fp64 oracle."""
    T, D, F, E, k = 6, 16, 32, 1, 1
    ids, w, meta, x, w1, b1, w2, b2 = problem(T, D, F, E, k, torch.float32)
    h = torch.linspace(-6, 6, T * F).reshape(T, F)
    dy = torch.randn(T, D)
    for activation in ("quick_gelu", "gelu", "gelu_tanh"):
        dh, _, _ = ops.grouped_down_bwd(dy, h, w2, b2, w, *table(meta), activation, True, False)
        hd = h.double().requires_grad_()
        a = get_activation(activation)(hd)
        (dref,) = torch.autograd.grad(a, hd, (dy.double() @ w2[0].double()) * w[:, :1].double())
        assert_close(dh, dref, torch.float32, activation)
