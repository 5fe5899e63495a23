"""A whole MoE layer after its router GEMM on the fused kernels: routing and the expert FFN in one autograd node.

moe_ffn_triton(x, logits, ...) returns what
    routed = topk_routing_triton(logits, top_k, renormalize, stats)
    y = expert_ffn_triton(x, routed.topk_ids, routed.topk_weights, w1, b1, w2, b2, activation, dropout_p, training)
returns, (y, routed), with the same values and gradients (the same kernels in the same order), but as one
autograd.Function without the two wrappers' argument checks: at batch 1 the host time around the launches sets the
layer time, and a second Function's bookkeeping was a measurable share of it (bench/test_host_overhead.py).
Backward: the expert FFN's (expert_ffn_triton.fused_backward), whose routing-weight gradient joins the gradient of
the topk_weights output in the router's (router.router_backward). Gradients of outputs that no loss used arrive as
None and cost nothing (materialize_grads off): an aux-loss-only backward runs only the router's few [T, E] ops.
"""
import torch

from clipmoe_kernels._hotpath import device_type
from clipmoe_kernels.expert_ffn_triton import KERNEL_DTYPES, expert_ffn_triton, fused_backward, fused_forward
from clipmoe_kernels.router import (
    MAX_EXPERTS,
    NO_STATS,
    RouterOutput,
    route_topk,
    route_topk_without_stats,
    router_backward,
    topk_routing_triton,
)


def _routing(logits, top_k, renormalize, stats):
    if stats:
        return route_topk(logits, top_k, renormalize)
    return (*route_topk_without_stats(logits, top_k, renormalize), *NO_STATS)


class MoEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, x, w1, b1, w2, b2, top_k, renormalize, activation, dropout_p, stats):
        probs, weights, ids, counts, psums, topk_counts, lse = _routing(logits, top_k, renormalize, stats)
        y, saved = fused_forward(x, ids, weights, w1, b1, w2, b2, activation, True, dropout_p)
        ctx.save_for_backward(probs, ids, *saved)
        # ids and the counts are int32: autograd never makes integer outputs differentiable (no marking needed)
        ctx.set_materialize_grads(False)
        ctx.options = renormalize, logits.dtype, activation, dropout_p  # one attribute: one setattr
        return y, probs, weights, ids, counts, psums, topk_counts, lse

    @staticmethod
    def backward(ctx, dy, d_probs, d_weights, d_ids, d_counts, d_psums, d_topk_counts, d_lse):
        probs, ids, *saved = ctx.saved_tensors
        renormalize, logits_dtype, activation, dropout_p = ctx.options
        need_logits, need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:6]
        dx = dw1 = db1 = dw2 = db2 = None
        if dy is not None:
            dx, ds, dw1, db1, dw2, db2 = fused_backward(saved, dy, activation, dropout_p, need_x,
                                                        need_logits, need_w1, need_b1, need_w2, need_b2)
            if ds is not None:
                d_weights = ds if d_weights is None else d_weights.to(torch.float32) + ds
        d_logits = None
        if need_logits and not (d_probs is None and d_weights is None and d_psums is None and d_lse is None):
            d_logits = router_backward(probs, ids, renormalize, d_probs, d_weights, d_psums, d_lse)
            d_logits = d_logits.to(logits_dtype)
        # logits, x, w1, b1, w2, b2, then top_k, renormalize, activation, dropout_p, stats
        return d_logits, dx, dw1, db1, dw2, db2, None, None, None, None, None


def moe_ffn_triton(x, router_logits, w1, b1, w2, b2, top_k, renormalize=True, activation="quick_gelu",
                   dropout_p=0.0, training=False, stats=True):
    """(y [T, D], RouterOutput) of the MoE layer whose router GEMM gave `router_logits` [T, E] for tokens x [T, D]
    (see the module docstring). Arguments as for topk_routing_triton and expert_ffn_triton, and as there with
    validate_args=False: they are not checked (MoEFFN checks its input, its weights and top_k). Inputs the kernels
    do not take (fp64, more than MAX_EXPERTS experts, bf16 on CPU) go through those two functions, which fall back
    or raise."""
    kind = device_type(x.device)
    params = (x, w1, b1, w2, b2)
    if torch.is_autocast_enabled(kind):  # the autocast dtype, as F.linear would
        dtype = torch.get_autocast_dtype(kind)
        params = tuple(p.to(dtype) for p in params)
    dtype = params[0].dtype
    if dtype not in KERNEL_DTYPES or router_logits.dtype == torch.float64 or router_logits.shape[1] > MAX_EXPERTS \
            or (dtype == torch.bfloat16 and kind == "cpu"):
        routed = topk_routing_triton(router_logits, top_k, renormalize, stats, validate_args=False)
        y = expert_ffn_triton(x, routed.topk_ids, routed.topk_weights, w1, b1, w2, b2, activation, dropout_p,
                              training, validate_args=False)
        return y, routed
    renormalize, p = bool(renormalize), float(dropout_p) if training else 0.0
    if torch.is_grad_enabled() and (router_logits.requires_grad or any(t.requires_grad for t in params)):
        y, *routed = MoEFunction.apply(router_logits, *params, top_k, renormalize, activation, p, stats)
        return y, RouterOutput(*routed)
    routed = RouterOutput(*_routing(router_logits, top_k, renormalize, stats))
    x, w1, b1, w2, b2 = params
    return fused_forward(x, routed.topk_ids, routed.topk_weights, w1, b1, w2, b2, activation, False, p)[0], routed
