"""moe_ffn_triton (routing + expert FFN in one autograd node) against the two public functions it fuses, under the
Triton interpreter: the same kernels in the same order, so values and every gradient must be bitwise equal, for
each set of inputs that can train (the router training stage trains only the router, fine-tuning only the experts,
an aux-loss-only backward runs only the router's part)."""
import pytest
import torch

pytest.importorskip("triton")

from clipmoe_kernels import moe_ffn_triton  # noqa: E402
from clipmoe_kernels.expert_ffn_triton import expert_ffn_triton  # noqa: E402
from clipmoe_kernels.router import topk_routing_triton  # noqa: E402
from tests.moe_cases import expert_weights  # noqa: E402

pytestmark = pytest.mark.usefixtures("triton_interpreter")


def _composed(x, logits, w1, b1, w2, b2, top_k, activation, dropout_p):
    routed = topk_routing_triton(logits, top_k, True, True)
    return expert_ffn_triton(x, routed.topk_ids, routed.topk_weights, w1, b1, w2, b2, activation, dropout_p,
                             True), routed


def _fused(x, logits, w1, b1, w2, b2, top_k, activation, dropout_p):
    return moe_ffn_triton(x, logits, w1, b1, w2, b2, top_k, True, activation, dropout_p, True, True)


def _run(fn, inputs, trainable, top_k, activation, dropout_p, loss_terms):
    leaves = [t.detach().clone().requires_grad_(name in trainable) for name, t in inputs.items()]
    torch.manual_seed(7)  # the dropout seed is drawn from torch's generator
    y, routed = fn(*leaves, top_k, activation, dropout_p)
    g = torch.linspace(-1, 1, y.numel()).view_as(y)
    terms = {"y": (y * g).sum(), "balance": (routed.prob_sums * routed.expert_counts).sum(),
             "z": routed.logsumexp.square().mean(), "weights": routed.topk_weights.square().sum()}
    sum(terms[name] for name in loss_terms).backward()
    outputs = [y, *(t for t in routed if t is not None)]
    return outputs, {name: leaf.grad for name, leaf in zip(inputs, leaves, strict=True) if leaf.requires_grad}


CASES = [
    # (T, D, F, E, k, dtype, dropout_p, trainable, loss terms)
    (9, 16, 24, 4, 2, torch.float32, 0.0, ("x", "logits", "w1", "b1", "w2", "b2"), ("y", "balance", "z")),
    (9, 16, 24, 4, 2, torch.float32, 0.25, ("x", "logits", "w1", "b1", "w2", "b2"), ("y", "balance", "z")),
    (6, 16, 16, 4, 2, torch.float16, 0.1, ("x", "logits", "w1", "b1", "w2", "b2"), ("y", "balance")),
    (7, 16, 24, 4, 2, torch.float32, 0.1, ("x", "logits"), ("y", "balance")),   # router training: experts frozen
    (7, 16, 24, 4, 2, torch.float32, 0.0, ("x", "w1", "b1", "w2", "b2"), ("y",)),  # experts train, router frozen
    (5, 16, 16, 3, 3, torch.float32, 0.0, ("logits",), ("balance", "z")),       # aux losses only: no dy
    (5, 16, 16, 3, 3, torch.float32, 0.0, ("logits",), ("weights",)),            # topk_weights' own gradient
    (7, 16, 24, 4, 2, torch.float32, 0.0, ("x", "logits"), ("y", "weights")),   # ... added to the experts' one
    (1, 16, 16, 4, 1, torch.float32, 0.0, ("x", "logits", "w1", "b1", "w2", "b2"), ("y", "z")),  # one token, k = 1
    (0, 16, 16, 4, 2, torch.float32, 0.0, ("x", "logits", "w1", "b1", "w2", "b2"), ("y", "balance")),  # no token
]


@pytest.mark.parametrize("T,D,F,E,k,dtype,dropout_p,trainable,loss_terms", CASES)
def test_one_autograd_node_gives_what_the_two_functions_give(T, D, F, E, k, dtype, dropout_p, trainable, loss_terms):
    torch.manual_seed(0)
    w1, b1, w2, b2 = expert_weights(D, F, E, dtype)
    inputs = {"x": torch.randn(T, D).to(dtype), "logits": torch.randn(T, E) * 3, "w1": w1, "b1": b1, "w2": w2,
              "b2": b2}
    want, want_grads = _run(_composed, inputs, trainable, k, "gelu", dropout_p, loss_terms)
    got, got_grads = _run(_fused, inputs, trainable, k, "gelu", dropout_p, loss_terms)
    assert len(got) == len(want) == 8
    for index, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.dtype == b.dtype and torch.equal(a, b), f"output {index}"
    assert got_grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        if grad is None:  # an input that no loss term reaches
            assert got_grads[name] is None or not got_grads[name].any(), name
        else:
            assert got_grads[name] is not None and torch.equal(got_grads[name], grad), f"d{name}"


def test_routing_and_experts_record_one_autograd_node():
    """A training forward adds one node to the graph for the router kernel and the expert GEMMs (the host time of a
    second autograd.Function was part of what a batch-1 forward spent around its launches)."""
    w1, b1, w2, b2 = (p.requires_grad_() for p in expert_weights(16, 16, 4))
    x = torch.randn(6, 16, requires_grad=True)
    logits = (x @ torch.randn(16, 4)).requires_grad_()
    y, routed = moe_ffn_triton(x, logits, w1, b1, w2, b2, 2, True, "gelu", 0.0, True, True)
    node = y.grad_fn
    assert type(node).__name__ == "MoEFunctionBackward"
    assert routed.probs.grad_fn is node and routed.logsumexp.grad_fn is node
    inputs = {type(fn).__name__ for fn, _ in node.next_functions if fn is not None}
    assert inputs == {"AccumulateGrad", "MmBackward0"}, inputs  # the leaves and the router GEMM, no second node
    # the integer outputs (ids, counts) are outside the graph, unmarked: autograd never differentiates integers
    for name in ("topk_ids", "expert_counts", "topk_counts"):
        tensor = getattr(routed, name)
        assert not tensor.dtype.is_floating_point and not tensor.requires_grad and tensor.grad_fn is None, name
