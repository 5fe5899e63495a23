"""The expert FFN as fused Triton grouped GEMMs: y[t] = Σ_j w[t,j] · FFN_{e[t,j]}(x[t]), forward and backward.

FFN_e(x) = act(x W1[e]ᵀ + b1[e]) W2[e]ᵀ + b2[e]; w1 [E, F, D], b1 [E, F], w2 [E, D, F], b2 [E, D] (nn.Linear
orientation). Glossary: T tokens, D model width, F expert hidden width, E experts, k top-k, TK = T·k. Same signature
and semantics as expert_ffn.expert_ffn_torch (its plain-torch reference and test oracle).

Pipeline (every launch grid is sized from shapes only: no host synchronisation, CUDA-graph capturable):
  forward   moe_align(topk_ids, E, BLOCK_M)                 expert-sorted order + tile table (C++/CUDA op)
            clipmoe::grouped_up        x rows gathered on load -> h = x W1ᵀ + b1 -> a = act(h)     [TK, F] sorted
            clipmoe::grouped_down      a W2ᵀ + b2, × routing weight on the fp32 accumulator -> [T, k, D] fp32 slots
                                       -> slot-order fp32 sum per token -> y [T, D] (k = 1: y directly)
  backward  clipmoe::grouped_down_bwd  G = dy W2[e] per sorted row; dh = s·G⊙act'(h); ds = Σ G⊙a + dy·b2;
                                       u = s·a (the dW2 input, [TK, F], freed once dW2 is done)
            clipmoe::grouped_wgrad     dW2 = Σ dyᵀ u, db2 = Σ s·dy;  dW1 = Σ dhᵀ x, db1 = Σ dh
            clipmoe::grouped_up_bwd_dx dx = Σ_j dh W1[e] (slots + deterministic sum)
Saved for backward: x, w1, w2, b2, the fp32 routing weights, the pre-activation h [TK, F] (the only TK x F tensor
kept) and the routing metadata. Recomputed: act(h) and act'(h) (elementwise, once, in grouped_down_bwd's epilogue) and
the expert outputs z (never cached: ds comes from G ⊙ a, see grouped_down). The backward holds at most two TK x F
temporaries at once (dh and u). Weight gradients of experts without
tokens are exact zeros. All sums are in a fixed order (no atomics): two runs give identical bits.

Dtypes: fp32, fp16, bf16 (bf16 only on GPU: the Triton interpreter's bf16 math is wrong). fp32 GEMMs follow
torch.backends.cuda.matmul.allow_tf32. Under autocast the inputs are cast to the autocast dtype first (as F.linear
would). fp64 inputs take expert_ffn_torch.

Tiles: BLOCK_M follows the rows per expert (64 on GPU; 16 or 32 in the interpreter: _triton_utils.block_m_for; it is
also the moe_align tile size); BLOCK_N, BLOCK_K, warps and stages are autotuned on CUDA per kernel, keyed on (D, F,
bucket of rows per expert). The environment variable CLIPMOE_TRITON_CONFIG (e.g. "BLOCK_N=128,BLOCK_K=64,num_warps=8,
num_stages=3") pins one config instead (see _triton_utils); under the Triton interpreter a fixed config is always
used (autotune cannot run there). Autotune's choices are cached across processes in the JSON of tuned_configs.py
(per device name and key).

Dropout (dropout_p > 0 in training, CLIP-MoE's 0.1 between the activation and W2) is fused: grouped_up stores
a' = act(h) ⊙ keep / (1 − p) for the down-projection, and grouped_down_bwd regenerates the same Philox mask from the
saved [1] seed (dropout.py) for dh, ds and the dW2 input u = s·a'; no mask tensor exists. The seed comes from
torch's generator of x's device, so runs repeat under torch.manual_seed; the draw is one tiny device op.
"""
import torch

from clipmoe_kernels._triton_utils import block_m_for, check_triton_device
from clipmoe_kernels.activation import get_activation
from clipmoe_kernels.dropout import check_dropout_p, dropout_seed
from clipmoe_kernels.expert_ffn import check_expert_args, expert_ffn_torch
from clipmoe_kernels.grouped_down import grouped_down, grouped_down_bwd
from clipmoe_kernels.grouped_gemm import grouped_wgrad
from clipmoe_kernels.grouped_up import grouped_up, grouped_up_bwd_dx
from clipmoe_kernels.routing import moe_align

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def fused_forward(x, topk_ids, topk_weights, w1, b1, w2, b2, activation, store_h, dropout_p):
    """y, and what the backward needs (x, w1, w2, b2, fp32 weights, h, seed, tile table) when store_h."""
    T, k = topk_ids.shape
    E = w1.shape[0]
    meta = moe_align(topk_ids, E, block_m_for(x.device, T * k, E))
    table = (meta.sorted_to_flat, meta.expert_offsets, meta.tile_expert, meta.tile_row_start)
    weights32 = topk_weights
    if weights32.dtype != torch.float32 or not weights32.is_contiguous():  # the router's are (a no-op costs ~1 µs)
        weights32 = weights32.to(torch.float32).contiguous()
    seed = dropout_seed(x.device) if dropout_p > 0 else None
    a, h = grouped_up(x, w1, b1, *table, k, activation, store_h, seed, dropout_p)
    y = grouped_down(a, w2, b2, weights32, *table)
    return y, ((x, w1, w2, b2, weights32, h, seed, *table) if store_h else ())


def fused_backward(saved, dy, activation, dropout_p, need_x, need_s, need_w1, need_b1, need_w2, need_b2):
    """(dx, ds, dw1, db1, dw2, db2) from dy and what fused_forward saved; ds [T, k] fp32 (the routing weights'
    gradient); a gradient not needed is None."""
    x, w1, w2, b2, weights32, h, seed, sorted_to_flat, expert_offsets, tile_expert, tile_row_start = saved
    table = (sorted_to_flat, expert_offsets, tile_expert, tile_row_start)
    T, k = weights32.shape
    need_dh = need_x or need_w1 or need_b1
    need_u = need_w2 or need_b2
    dh, ds, u = grouped_down_bwd(dy, h, w2, b2, weights32, *table, activation, need_dh, need_s, need_u,
                                 seed, dropout_p)  # the forward's dropout mask, regenerated
    dx = dw1 = db1 = dw2 = db2 = None
    if need_u:
        dw2, db2 = grouped_wgrad(dy, u, weights32, sorted_to_flat, expert_offsets, k, True, False)
        del u  # before the up-projection's gradients allocate theirs
    if need_x:
        dx = grouped_up_bwd_dx(dh, w1, *table, T, k)
    if need_w1 or need_b1:
        dw1, db1 = grouped_wgrad(dh, x, weights32, sorted_to_flat, expert_offsets, k, False, True)
    return (dx, ds if need_s else None, dw1 if need_w1 else None, db1 if need_b1 else None,
            dw2 if need_w2 else None, db2 if need_b2 else None)


class ExpertFFNFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, topk_ids, topk_weights, w1, b1, w2, b2, activation, store_h, dropout_p):
        y, saved = fused_forward(x, topk_ids, topk_weights, w1, b1, w2, b2, activation, store_h, dropout_p)
        if store_h:
            ctx.save_for_backward(*saved)
        ctx.activation, ctx.dropout_p = activation, dropout_p
        ctx.weights_dtype = topk_weights.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        need_x, _, need_s, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:7]
        dx, ds, dw1, db1, dw2, db2 = fused_backward(ctx.saved_tensors, dy, ctx.activation, ctx.dropout_p, need_x,
                                                    need_s, need_w1, need_b1, need_w2, need_b2)
        d_weights = ds.to(ctx.weights_dtype) if need_s else None
        return dx, None, d_weights, dw1, db1, dw2, db2, None, None, None  # ..., activation, store_h, dropout_p


def expert_ffn_triton(x, topk_ids, topk_weights, w1, b1, w2, b2, activation="quick_gelu", dropout_p=0.0,
                      training=False, validate_args=True):
    """Fused Triton expert FFN (see the module docstring); drop-in for expert_ffn_torch.

    Args:
        x: [T, D] fp32/fp16/bf16, any strides, CUDA (CPU only under TRITON_INTERPRET=1, for tests).
        topk_ids: [T, k] int32/int64 in [0, E) (out-of-range ids trap on the device). topk_weights: [T, k] (fp32 from
            the router; any float dtype is read as fp32).
        w1 [E, F, D], b1 [E, F], w2 [E, D, F], b2 [E, D]: expert weights, x's dtype.
        activation: "quick_gelu", "gelu" (erf) or "gelu_tanh". dropout_p, training: dropout between act and w2,
            fused (a Philox mask from a seed drawn from torch's generator, see dropout.py); the identity unless
            training.
        validate_args: False skips the argument checks (shapes, dtypes, devices, activation, dropout_p) for a caller
            that has checked them itself (MoEFFN: its input, its own weights and the router's output; about 5 µs of
            a batch-1 forward). The launchers still refuse an unknown activation or dropout_p.
    Returns:
        y [T, D] in x's dtype (the autocast dtype under autocast), differentiable with respect to x, topk_weights and
        the four weight tensors.
    """
    if validate_args:
        check_expert_args(x, topk_ids, topk_weights, w1, b1, w2, b2)
        get_activation(activation)
        check_dropout_p(dropout_p)
        check_triton_device("expert_ffn_triton", x)
    params = (x, w1, b1, w2, b2)
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        params = tuple(p.to(dtype) for p in params)
    x, w1, b1, w2, b2 = params
    dtype = x.dtype
    if not dtype == w1.dtype == b1.dtype == w2.dtype == b2.dtype:
        raise TypeError(f"x, w1, b1, w2, b2 must share one dtype (or run under torch.autocast), got "
                        f"{[str(p.dtype) for p in params]}")
    if dtype not in KERNEL_DTYPES:  # fp64: the kernels compute in fp32 at most
        return expert_ffn_torch(x, topk_ids, topk_weights, w1, b1, w2, b2, activation, dropout_p, training)
    if dtype == torch.bfloat16 and device_type == "cpu":
        raise TypeError("expert_ffn_triton: bf16 runs on CUDA only; the Triton interpreter (CPU) computes bf16 GEMMs "
                        "wrongly (triton-lang/triton#11584). Use fp32/fp16, or the 'torch' backend on CPU")
    store_h = torch.is_grad_enabled() and any(t.requires_grad for t in params + (topk_weights,))
    p = float(dropout_p) if training else 0.0
    if not store_h:  # no gradient: the forward without autograd.Function's bookkeeping (µs at batch 1)
        return fused_forward(x, topk_ids, topk_weights, w1, b1, w2, b2, activation, False, p)[0]
    return ExpertFFNFunction.apply(x, topk_ids, topk_weights, w1, b1, w2, b2, activation, store_h, p)
