"""Fused expert dropout under the Triton interpreter: the kernels' Philox mask is exactly the plain-torch one of
clipmoe_kernels.dropout, forward and every gradient match the per-slot reference with that mask, the keep rate is
binomial, runs repeat under torch.manual_seed, and the training path never reads a value back to the host."""
import math

import pytest
import torch

pytest.importorskip("triton")

from clipmoe_kernels import has_ext_op  # noqa: E402
from clipmoe_kernels._triton_utils import block_m_for  # noqa: E402
from clipmoe_kernels.activation import get_activation  # noqa: E402
from clipmoe_kernels.dropout import dropout_keep_ref, dropout_seed, dropout_threshold  # noqa: E402
from clipmoe_kernels.expert_ffn_triton import expert_ffn_triton  # noqa: E402
from clipmoe_kernels.routing import moe_align  # noqa: E402
from tests.moe_cases import GRAD_NAMES, expert_reference, expert_weights, routing, run_with_grads  # noqa: E402
from tests.tolerances import assert_close, assert_close_lowp  # noqa: E402

pytestmark = pytest.mark.usefixtures("triton_interpreter")


def test_grouped_up_applies_exactly_the_reference_mask():
    """a = act(h) ⊙ keep / (1 - p) with keep = dropout_keep_ref bit for bit (rows in expert order, mask by slot)."""
    T, D, F, E, k, p = 19, 16, 40, 3, 2, 0.3
    ids, _ = routing(T, E, k)
    x = torch.randn(T, D)
    w1, b1, _, _ = expert_weights(D, F, E)
    meta = moe_align(ids, E, block_m_for(ids.device, ids.numel(), E))
    table = (meta.sorted_to_flat, meta.expert_offsets, meta.tile_expert, meta.tile_row_start)
    seed = torch.tensor([123456789012345], dtype=torch.int64)
    a, h = torch.ops.clipmoe.grouped_up(x, w1, b1, *table, k, "gelu", True, seed, p)
    keep = dropout_keep_ref(seed, T * k, F, p)[meta.sorted_to_flat.long()]  # sorted row r is flat slot f(r)
    act = get_activation("gelu")(h)
    assert torch.equal(a == 0, ~keep | (act == 0))
    assert_close(a, torch.where(keep, act / (1 - p), 0.0), torch.float32, "a")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,D,F,E,k,p,activation", [
    (23, 16, 40, 4, 2, 0.1, "quick_gelu"),  # CLIP-MoE's expert dropout
    (17, 24, 33, 3, 1, 0.5, "gelu"),        # k = 1 (no slot combine), odd F
    (12, 16, 24, 3, 3, 0.25, "gelu_tanh"),  # k = E
])
def test_forward_and_gradients_match_the_reference_with_the_same_mask(T, D, F, E, k, p, activation, dtype,
                                                                     weight_loads):
    ids, w = routing(T, E, k)
    x = torch.randn(T, D) * 0.5
    params = expert_weights(D, F, E)
    g = torch.randn(T, D) * 0.25
    torch.manual_seed(7)
    keep = dropout_keep_ref(dropout_seed(x.device), T * k, F, p).view(T, k, F)  # the kernel's first random draw
    torch.manual_seed(7)
    y, grads = run_with_grads(expert_ffn_triton, x.to(dtype), ids, w, [t.to(dtype) for t in params], activation, g,
                              dropout_p=p, training=True)

    def reference(dt):
        def fn(x_, ids_, w_, w1, b1, w2, b2, activation):
            return expert_reference(x_, ids_, w_, w1, b1, w2, b2, activation, keep=keep / (1 - p))
        return run_with_grads(fn, x.to(dt), ids, w.to(torch.float64 if dt == torch.float64 else torch.float32),
                              [t.to(dt) for t in params], activation, g.to(dt))

    weight_loads.expect((params[0], {"nk", "kn"}), (params[2], {"nk", "kn"}))  # odd F: W2 by pointers
    y_hi, grads_hi = reference(torch.float64)
    if dtype == torch.float32:
        assert_close(y, y_hi, torch.float32, "y")
        for name, got, want in zip(GRAD_NAMES, grads, grads_hi, strict=True):
            assert_close(got, want, torch.float32, f"d{name}")
        return
    y_lo, grads_lo = reference(dtype)
    assert_close_lowp(y, y_hi, y_lo, "y")
    for name, got, hi, lo in zip(GRAD_NAMES, grads, grads_hi, grads_lo, strict=True):
        assert_close_lowp(got.to(dtype), hi, lo.to(dtype), f"d{name}")


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_is_binomial(p):
    """Over 2^20 bits (slots at offsets past 2^31, where the counter's high word is used), the kept count is within
    5 standard deviations of n·(1 - p); so is each half, and the two halves' masks differ (no repetition)."""
    num_slots, hidden = 1 << 10, 1 << 10
    keep = dropout_keep_ref(987654321, num_slots, hidden, p, first_slot=2048 * num_slots)  # offsets beyond 2^31
    n = keep.numel()
    assert abs(int(keep.sum()) - n * (1 - p)) <= 5 * math.sqrt(n * p * (1 - p))
    top, bottom = keep[: num_slots // 2], keep[num_slots // 2:]
    for half in (top, bottom):
        assert abs(int(half.sum()) - half.numel() * (1 - p)) <= 5 * math.sqrt(half.numel() * p * (1 - p))
    assert not torch.equal(top, bottom)
    assert dropout_threshold(p) == round(p * 2**31)


def test_runs_repeat_under_the_torch_seed_and_differ_across_seeds():
    T, D, F, E, k = 21, 16, 32, 4, 2
    ids, w = routing(T, E, k)
    x = torch.randn(T, D)
    params = expert_weights(D, F, E)
    g = torch.randn(T, D)
    outs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        outs.append(run_with_grads(expert_ffn_triton, x, ids, w, params, "gelu", g, dropout_p=0.2, training=True))
    (y1, g1), (y2, g2), (y3, _) = outs
    assert torch.equal(y1, y2) and all(torch.equal(a, b) for a, b in zip(g1, g2, strict=True))
    assert not torch.equal(y1, y3)
    # outside training dropout is the identity
    y_eval = expert_ffn_triton(x, ids, w, *params, dropout_p=0.2, training=False)
    assert torch.equal(y_eval, expert_ffn_triton(x, ids, w, *params))


def test_bad_dropout_p_is_named():
    ids, w = routing(4, 2, 1)
    with pytest.raises(ValueError, match="dropout_p"):
        expert_ffn_triton(torch.randn(4, 16), ids, w, *expert_weights(16, 16, 2), dropout_p=1.0, training=True)


@pytest.mark.skipif(not has_ext_op("cpu"), reason="needs the compiled extension (moe_align without host checks)")
def test_training_step_with_dropout_never_reads_a_tensor_on_the_host(monkeypatch):
    """MoEFFN(dropout=0.1, backend="triton").train(): forward and backward without .item()/.tolist()/int(tensor)."""
    from clipmoe import MoEFFN, collect_aux_losses
    moe = MoEFFN(16, 32, num_experts=4, top_k=2, dropout=0.1, backend="triton").train()
    x = torch.randn(3, 7, 16, requires_grad=True)
    moe(x)  # warm-up outside the check (first-call caches)

    def host_read(*args, **kwargs):
        raise AssertionError("a tensor value was read on the host")
    for name in ("item", "tolist", "__int__", "__float__", "__bool__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    y = moe(x)
    loss = y.square().sum() + 0.01 * collect_aux_losses(moe).balance
    loss.backward()
    monkeypatch.undo()
    assert x.grad is not None and moe.w2.grad.abs().sum() > 0
