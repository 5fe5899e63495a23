"""topk_routing_triton (fused router kernel) under the Triton interpreter (CPU) vs topk_routing_ref.

Logits are read in their dtype and upcast to fp32 in the kernel, so bf16 logits are testable in the interpreter (its
bf16 loads are right; only bf16 arithmetic is not). Outputs are fp32: compared with the fp32 table against the same
reference run on the same logits; gradients against autograd through the fp64 reference.
"""
import pytest
import torch

pytest.importorskip("triton")

from clipmoe.losses import balance_loss  # noqa: E402
from clipmoe_kernels import router  # noqa: E402
from clipmoe_kernels.router import router_ref, topk_routing_triton  # noqa: E402
from clipmoe_kernels.routing import topk_routing_ref  # noqa: E402
from tests.tolerances import assert_close, assert_close_lowp  # noqa: E402

pytestmark = pytest.mark.usefixtures("triton_interpreter")


CASES = [
    # (T, E, k, renormalize, dtype)
    (1, 4, 2, True, torch.float32),       # one token
    (5, 3, 3, True, torch.float32),       # k = E = 3, fewer tokens than a program's block (64)
    (130, 8, 2, True, torch.float32),     # three programs, the last partial
    (64, 8, 1, False, torch.float32),     # k = 1, no renormalisation, exactly one full block
    (37, 1, 1, True, torch.float32),      # E = 1: every weight is 1
    (70, 4, 4, False, torch.float32),     # k = E = 4 without renormalisation
    (50, 8, 8, True, torch.float16),      # fp16 logits, k = E = 8
    (45, 4, 2, True, torch.bfloat16),     # bf16 logits (loads only; the math is fp32)
    (33, 5, 2, False, torch.float16),     # E not a power of two (padded columns)
]


def _logits(T, E, dtype):
    """Logits without ties within a row (so ids must match exactly), also after rounding to 16 bits: a random
    permutation of 0, 0.5, 1, ... per row (spacing survives fp16/bf16 rounding at these magnitudes) plus a row offset
    and a little noise."""
    spaced = torch.rand(T, E).argsort(dim=1).float() * 0.5
    return (spaced + torch.randn(T, 1) + 0.1 * torch.rand(T, E)).to(dtype)


@pytest.mark.parametrize("T,E,k,renormalize,dtype", CASES)
def test_forward_matches_reference(T, E, k, renormalize, dtype):
    logits = _logits(T, E, dtype)
    out = topk_routing_triton(logits, k, renormalize)
    ref = router_ref(logits, k, renormalize)
    assert out.topk_ids.dtype == torch.int32 and out.probs.dtype == torch.float32
    assert torch.equal(out.topk_ids, ref.topk_ids)
    assert_close(out.probs, ref.probs, torch.float32, "probs")
    assert_close(out.topk_weights, ref.topk_weights, torch.float32, "topk_weights")
    assert torch.equal(out.expert_counts, ref.expert_counts)
    assert torch.equal(out.topk_counts, ref.topk_counts)
    assert_close(out.prob_sums, ref.prob_sums, torch.float32, "prob_sums")
    assert_close(out.logsumexp, ref.logsumexp, torch.float32, "logsumexp")
    # the first three outputs are what topk_routing_ref returns
    probs, weights, ids = topk_routing_ref(logits, k, renormalize)
    assert torch.equal(out.topk_ids.long(), ids)
    assert_close(out.topk_weights, weights, torch.float32, "weights")


@pytest.mark.parametrize("T,E,k,renormalize,dtype", CASES[:3] + CASES[6:7])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_without_stats_the_routing_is_the_same(T, E, k, renormalize, dtype, requires_grad):
    """stats=False (the inference router: the kernel writes no statistics): the same probs, weights and ids, bit for
    bit, and None statistics, on the kernel-only path and on the differentiable one."""
    logits = _logits(T, E, dtype).requires_grad_(requires_grad)
    full = topk_routing_triton(logits, k, renormalize)
    out = topk_routing_triton(logits, k, renormalize, stats=False)
    for name in ("probs", "topk_weights", "topk_ids"):
        assert torch.equal(getattr(out, name), getattr(full, name)), name
    assert out[3:] == (None,) * 4


@pytest.mark.parametrize("T,E,k,renormalize,dtype", [c for c in CASES if c[4] == torch.float32])
def test_gradients_match_autograd_of_reference(T, E, k, renormalize, dtype):
    """d logits through probs, topk_weights, prob_sums and logsumexp at once (random upstream gradients for each)."""
    logits = _logits(T, E, dtype)
    g_probs, g_weights, g_sums, g_lse = torch.randn(T, E), torch.randn(T, k), torch.randn(E), torch.randn(T)
    leaf = logits.clone().requires_grad_()
    out = topk_routing_triton(leaf, k, renormalize)
    loss = ((out.probs * g_probs).sum() + (out.topk_weights * g_weights).sum() + (out.prob_sums * g_sums).sum()
            + (out.logsumexp * g_lse).sum())
    (grad,) = torch.autograd.grad(loss, leaf)
    leaf_ref = logits.double().requires_grad_()
    probs, weights, _ = topk_routing_ref(leaf_ref, k, renormalize)
    loss_ref = ((probs * g_probs.double()).sum() + (weights * g_weights.double()).sum()
                + (probs.sum(0) * g_sums.double()).sum() + (torch.logsumexp(leaf_ref, -1) * g_lse.double()).sum())
    (grad_ref,) = torch.autograd.grad(loss_ref, leaf_ref)
    assert grad.dtype == logits.dtype
    assert_close(grad, grad_ref, torch.float32, "d logits")


@pytest.mark.parametrize("which", ["probs", "topk_weights", "prob_sums", "logsumexp"])
def test_single_output_gradients(which):
    """Each differentiable output on its own (the others' gradients are None in backward)."""
    logits = _logits(20, 6, torch.float32)
    leaf = logits.clone().requires_grad_()
    out = topk_routing_triton(leaf, 2, True)
    (grad,) = torch.autograd.grad(getattr(out, which).square().sum(), leaf)
    leaf_ref = logits.double().requires_grad_()
    probs, weights, _ = topk_routing_ref(leaf_ref, 2, True)
    ref = {"probs": probs, "topk_weights": weights, "prob_sums": probs.sum(0),
           "logsumexp": torch.logsumexp(leaf_ref, -1)}[which]
    (grad_ref,) = torch.autograd.grad(ref.square().sum(), leaf_ref)
    assert_close(grad, grad_ref, torch.float32, f"d logits via {which}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_logits_gradients(dtype):
    """16-bit logits: the gradient comes back in the logits' dtype, within 2x the error of plain torch (which also
    computes the softmax in fp32 and casts the gradient once)."""
    T, E, k = 40, 6, 2
    logits = _logits(T, E, dtype)
    g_probs, g_weights = torch.randn(T, E), torch.randn(T, k)

    def grad_of(fn, leaf):
        probs, weights = fn(leaf)[:2]
        (grad,) = torch.autograd.grad((probs * g_probs.to(probs)).sum() + (weights * g_weights.to(weights)).sum(),
                                      leaf)
        return grad
    grad = grad_of(lambda t: topk_routing_triton(t, k), logits.clone().requires_grad_())
    assert grad.dtype == dtype
    grad_hi = grad_of(lambda t: topk_routing_ref(t, k), logits.double().requires_grad_())
    grad_lo = grad_of(lambda t: topk_routing_ref(t, k), logits.clone().requires_grad_())
    assert_close_lowp(grad, grad_hi, grad_lo, "d logits")


def test_ties_pick_lower_id_with_equal_weights():
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 2.0, 2.0, -1.0], [3.0, 0.0, 3.0, 3.0]])
    out = topk_routing_triton(logits, 2, False)
    assert out.topk_ids.tolist() == [[0, 1], [1, 2], [0, 2]]
    probs, weights, ids = topk_routing_ref(logits, 2, False)
    assert_close(out.topk_weights, weights, torch.float32, "tied weights")
    assert torch.equal(probs.gather(1, out.topk_ids.long()), out.topk_weights)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, on the NaN rows
def test_non_finite_logits_poison_only_their_token():
    logits = torch.randn(6, 4)
    logits[1, 2] = float("nan")
    logits[3, 0] = float("inf")
    logits[4] = float("-inf")
    out = topk_routing_triton(logits, 2)
    bad = torch.tensor([False, True, False, True, True, False])
    assert torch.isnan(out.probs[bad]).all() and torch.isnan(out.topk_weights[bad]).all()
    assert torch.isfinite(out.probs[~bad]).all() and torch.isfinite(out.topk_weights[~bad]).all()
    assert ((out.topk_ids >= 0) & (out.topk_ids < 4)).all()
    assert (out.topk_ids[:, 0] != out.topk_ids[:, 1]).all(), "k distinct ids even for NaN rows"
    ref = router_ref(logits, 2)
    assert torch.equal(out.topk_ids[~bad], ref.topk_ids[~bad])
    assert_close(out.topk_weights[~bad], ref.topk_weights[~bad], torch.float32)


def test_non_contiguous_logits():
    base = torch.randn(8, 40) * 3
    logits = base.t()[::2]  # [20, 8], strides (2, 40)
    assert not logits.is_contiguous()
    out = topk_routing_triton(logits, 3)
    ref = router_ref(logits.contiguous(), 3)
    assert torch.equal(out.topk_ids, ref.topk_ids)
    assert_close(out.topk_weights, ref.topk_weights, torch.float32)


def test_statistics_give_the_balance_loss():
    T, E = 90, 4
    logits = _logits(T, E, torch.float32)
    out = topk_routing_triton(logits, 2)
    loss = E * ((out.expert_counts.float() / T) * (out.prob_sums / T)).sum()
    probs, _, ids = topk_routing_ref(logits, 2)
    assert_close(loss, balance_loss(probs, ids, "paper"), torch.float32, "balance loss")
    assert int(out.expert_counts.sum()) == T


@pytest.mark.parametrize("T", [64, 65, 300])
def test_several_programs_sum_their_statistics(monkeypatch, T):
    """Past SINGLE_PROGRAM_TOKENS each program covers TOKENS_PER_PROGRAM tokens and writes partial statistics (made
    small here so that tiny shapes take that path: 1, 2 and 3 programs, the last one partial)."""
    monkeypatch.setattr(router, "SINGLE_PROGRAM_TOKENS", 64)
    monkeypatch.setattr(router, "TOKENS_PER_PROGRAM", 128)
    assert router.router_programs(T) == ((1, 1) if T == 64 else (router.cdiv(T, 128), 2))
    logits = _logits(T, 6, torch.float32)
    out = topk_routing_triton(logits, 2)
    ref = router_ref(logits, 2)
    assert torch.equal(out.topk_ids, ref.topk_ids)
    assert torch.equal(out.expert_counts, ref.expert_counts) and torch.equal(out.topk_counts, ref.topk_counts)
    assert_close(out.prob_sums, ref.prob_sums, torch.float32, "prob_sums")
    assert_close(out.probs, ref.probs, torch.float32, "probs")
    assert_close(out.logsumexp, ref.logsumexp, torch.float32, "logsumexp")


def test_two_runs_are_bitwise_equal():
    logits = _logits(200, 8, torch.float32)
    a, b = topk_routing_triton(logits, 2), topk_routing_triton(logits, 2)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def test_zero_tokens_and_fp64():
    out = topk_routing_triton(torch.empty(0, 4), 2)
    assert out.probs.shape == (0, 4) and out.topk_ids.shape == (0, 2)
    assert out.expert_counts.tolist() == [0, 0, 0, 0] and out.prob_sums.tolist() == [0, 0, 0, 0]
    logits = torch.randn(7, 4, dtype=torch.float64)
    out = topk_routing_triton(logits, 2)
    ref = router_ref(logits, 2)
    assert out.probs.dtype == torch.float64
    for x, y in zip(out, ref, strict=True):
        assert torch.equal(x, y)


def test_bad_arguments():
    with pytest.raises(ValueError, match="top_k"):
        topk_routing_triton(torch.randn(3, 4), 5)
    with pytest.raises(ValueError, match="2-D"):
        topk_routing_triton(torch.randn(3, 4, 2), 1)
    with pytest.raises(TypeError, match="floating"):
        topk_routing_triton(torch.ones(3, 4, dtype=torch.long), 1)
