"""Up-projection grouped GEMM of the expert FFN, fused with the row gather, bias and activation; and its dx kernel.

Math (glossary: T tokens, D model width, F expert hidden width, E experts, k top-k, TK = T·k; sorted row r of
`moe_align` holds flat slot f = sorted_to_flat[r] = t·k + j of token t = f // k, routed to expert e(r)):
  forward    h_r = x[t(r)] · W1[e(r)]ᵀ + b1[e(r)]       ([TK, F], expert-sorted rows, fp32 accumulate)
             a_r = act(h_r)                              (quick_gelu, gelu (erf) or gelu_tanh, in the epilogue)
  backward   dx[t] = Σ_j dh_{r(t,j)} · W1[e]             (dh from grouped_down's backward)
             dW1[e] = Σ_{r∈e} dh_rᵀ x[t(r)],  db1[e] = Σ_{r∈e} dh_r   (grouped_gemm.grouped_wgrad)
Tensors: x [T, D] (any strides), w1 [E, F, D], b1 [E, F] (nn.Linear orientation), a and h [TK, F] expert-sorted.

Design: one program per (tile of the moe_align tile table, BLOCK_N columns of F), issued in the grouped order of
grouped_gemm.program_tile (docs/kernels.md). A tile is BLOCK_M sorted rows of
one expert; its x rows are gathered on load through sorted_to_flat // k (no permuted copy of x). Unused tile slots
(tile_expert == -1; the table is sized by the host bound ceil(TK/BLOCK_M) + E) exit at once, so the grid never
depends on routing and nothing synchronises with the host. The pre-activation h is stored only when a gradient is
needed (store_h): the backward recomputes act(h) and act'(h) from it instead of keeping a as well. dx is computed per
slot (scatter on store to [T, k, D] fp32, or straight into dx when k = 1) and summed over the k slots by the
deterministic grouped_gemm.slot_combine; no atomics.
"""

import torch
import triton
import triton.language as tl

from clipmoe_kernels._triton_utils import (
    GEMM_CONFIGS,
    GEMM_CONFIGS_LARGE,
    PlanCache,
    TunedKernel,
    block_m_for,
    cdiv,
    custom_op,
    dot_precision,
    launch_settings,
    rows_bucket,
    weight_operand,
)
from clipmoe_kernels.activation import get_activation
from clipmoe_kernels.dropout import dropout_keep, dropout_threshold
from clipmoe_kernels.grouped_gemm import GROUP_M, apply_activation, row_tile_program, rows_matmul, rows_to_slots


def grouped_up_ref(x, w1, b1, sorted_to_flat, expert_offsets, top_k, activation):
    """Plain torch: (a, h), both [TK, F] in expert-sorted row order (loops over experts; the test oracle)."""
    tok = sorted_to_flat.long() // top_k
    xs = x.index_select(0, tok)
    bounds = expert_offsets.tolist()
    h = xs.new_empty(xs.shape[0], w1.shape[1])
    for e in range(len(bounds) - 1):
        lo, hi = bounds[e], bounds[e + 1]
        h[lo:hi] = torch.nn.functional.linear(xs[lo:hi], w1[e], b1[e])
    return get_activation(activation)(h), h


def grouped_up_bwd_dx_ref(dh, w1, sorted_to_flat, expert_offsets, num_tokens, top_k):
    """Plain torch: dx [T, D] = Σ_j dh_{r(t,j)} W1[e]."""
    bounds = expert_offsets.tolist()
    per_row = dh.new_empty(dh.shape[0], w1.shape[2])
    for e in range(len(bounds) - 1):
        lo, hi = bounds[e], bounds[e + 1]
        per_row[lo:hi] = dh[lo:hi] @ w1[e]
    dx = per_row.new_zeros(num_tokens, w1.shape[2])
    return dx.index_add_(0, sorted_to_flat.long() // top_k, per_row)


@triton.jit(do_not_specialize=["ROWS_BUCKET", "DROPOUT_THRESHOLD"])
def _grouped_up_fwd_kernel(
    x_ptr,               # [T, D] token order, any strides
    w1,                  # [E, F, D]: a pointer, or a TensorDescriptor when WEIGHT_DESC (grouped_gemm.rows_matmul)
    b1_ptr,              # [E, F]
    a_ptr,               # [TK, F] out, expert-sorted rows: act(h)
    h_ptr,               # [TK, F] out, expert-sorted rows: pre-activation h (written only when STORE_H)
    sorted_to_flat_ptr,  # [TK] int32
    expert_offsets_ptr,  # [E+1] int32
    tile_expert_ptr,     # [num_tiles] int32, -1 = unused
    tile_row_start_ptr,  # [num_tiles] int32
    seed_ptr,            # [1] int64 Philox key of the dropout mask (read when DROPOUT)
    D, F, ROWS_BUCKET, DROPOUT_THRESHOLD, DROPOUT_SCALE,
    stride_xt, stride_xd, stride_w1e, stride_w1f, stride_w1d, stride_b1e, stride_b1f, stride_am, stride_hm,
    TOP_K: tl.constexpr, ACTIVATION: tl.constexpr, STORE_H: tl.constexpr, DROPOUT: tl.constexpr,
    WEIGHT_DESC: tl.constexpr, INPUT_PRECISION: tl.constexpr, GROUP_M: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Program (tile, pid_n): BLOCK_M sorted rows of expert tile_expert[tile] x columns pid_n·BLOCK_N.. of F.
    e, rows, row_mask, pid_n = row_tile_program(tile_expert_ptr, tile_row_start_ptr, expert_offsets_ptr, F, GROUP_M,
                                                BLOCK_M, BLOCK_N)
    if e < 0:  # an unused slot of the tile table
        return
    flat = tl.load(sorted_to_flat_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    tok = flat // TOP_K
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < F
    # B[kk, n] = W1[e, n, kk]: x · W1[e]ᵀ without a transposed copy.
    acc = rows_matmul(x_ptr, tok, row_mask, stride_xt, stride_xd, w1, e, stride_w1e, stride_w1d, stride_w1f, pid_n,
                      offs_n, n_mask, D, WEIGHT_DESC, BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION)
    bias = tl.load(b1_ptr + e * stride_b1e + offs_n * stride_b1f, mask=n_mask, other=0.0).to(tl.float32)
    h = acc + bias[None, :]
    mask = row_mask[:, None] & n_mask[None, :]
    if STORE_H:
        tl.store(h_ptr + rows[:, None] * stride_hm + offs_n[None, :], h.to(h_ptr.dtype.element_ty), mask=mask)
    a = apply_activation(h, ACTIVATION)
    if DROPOUT:  # a' = a ⊙ keep / (1 - p), the mask of dropout.py
        keep = dropout_keep(tl.load(seed_ptr), flat, offs_n, F, DROPOUT_THRESHOLD)
        a = tl.where(keep, a * DROPOUT_SCALE, 0.0)
    tl.store(a_ptr + rows[:, None] * stride_am + offs_n[None, :], a.to(a_ptr.dtype.element_ty), mask=mask)


# The epilogue holds the fp32 h and act(h) tiles: beyond 64 elements of each per thread they spill (ptxas -v).
_grouped_up_fwd = TunedKernel(_grouped_up_fwd_kernel, GEMM_CONFIGS, key=["D", "F", "ROWS_BUCKET"],
                              large_configs=GEMM_CONFIGS_LARGE, max_outputs_per_thread=64, weight_arg="w1")
_UP_PLANS = PlanCache()  # grouped_up's launches, replayed (see LaunchPlan)


@custom_op("clipmoe::grouped_up")
def grouped_up(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, sorted_to_flat: torch.Tensor,
               expert_offsets: torch.Tensor, tile_expert: torch.Tensor, tile_row_start: torch.Tensor, top_k: int,
               activation: str, store_h: bool, dropout_seed: torch.Tensor | None = None,
               dropout_p: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, h): act(h) and h = x W1[e]ᵀ + b1[e], both [TK, F] in x.dtype, expert-sorted rows. h is [0, F] unless
    store_h. With dropout_p > 0, a is act(h) ⊙ keep / (1 - p), keep the Philox mask of dropout_seed (dropout.py).
    The moe_align tile table must have been built with block_m = block_m_for(x.device, TK, E)."""
    tk = sorted_to_flat.shape[0]
    E, F, D = w1.shape
    # sizes as separate ints: torch parses a size tuple in ~3.5k more instructions, a torch.Size in ~13.5k (callgrind)
    a = x.new_empty(tk, F)
    h = x.new_empty(tk if store_h else 0, F)
    h_arg = h if store_h else a  # never written when STORE_H is False
    dropout = dropout_p > 0
    tensors = (x, w1, b1, a, h_arg, sorted_to_flat, expert_offsets, tile_expert, tile_row_start,
               dropout_seed if dropout else sorted_to_flat)
    precision = dot_precision(x.dtype)
    plan_key = (x.device, x.dtype, tk, tile_expert.shape[0], w1.shape, x.stride(), w1.stride(), b1.stride(), top_k,
                activation, store_h, dropout_p, precision, launch_settings())
    plan = _UP_PLANS.get(plan_key)
    if plan is not None:
        plan(*tensors)
        return a, h
    get_activation(activation)
    num_tiles = tile_expert.shape[0]

    def grid(block_n, block_k):
        return (num_tiles * cdiv(F, block_n),)

    block_m = block_m_for(x.device, tk, E)
    stride_w1e, stride_w1f, stride_w1d = w1.stride()
    weight, weight_desc = weight_operand(w1, D, F, stride_w1d, stride_w1f, block_m)
    args = (x, weight, *tensors[2:], D, F, rows_bucket(tk, E), dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p),
            *x.stride(), stride_w1e, stride_w1f, stride_w1d, *b1.stride(), a.stride(0), h_arg.stride(0))
    meta = dict(TOP_K=top_k, ACTIVATION=activation, STORE_H=store_h, DROPOUT=dropout, WEIGHT_DESC=weight_desc,
                INPUT_PRECISION=precision, GROUP_M=GROUP_M, BLOCK_M=block_m)
    if tk > 0:
        plan = _grouped_up_fwd.launch_plan(grid, x.device, args, meta, len(tensors))
        if plan is None:  # autotune chooses first, or a TMA descriptor: the launch as built
            _grouped_up_fwd(grid, x.device, args, meta)
        else:
            _UP_PLANS.remember(plan_key, plan)(*tensors)
    return a, h


@grouped_up.register_fake
def _(x, w1, b1, sorted_to_flat, expert_offsets, tile_expert, tile_row_start, top_k, activation, store_h,
      dropout_seed=None, dropout_p=0.0):
    tk, F = sorted_to_flat.shape[0], w1.shape[1]
    return x.new_empty((tk, F)), x.new_empty((tk if store_h else 0, F))


@custom_op("clipmoe::grouped_up_bwd_dx")
def grouped_up_bwd_dx(dh: torch.Tensor, w1: torch.Tensor, sorted_to_flat: torch.Tensor,
                      expert_offsets: torch.Tensor, tile_expert: torch.Tensor, tile_row_start: torch.Tensor,
                      num_tokens: int, top_k: int) -> torch.Tensor:
    """dx [T, D] in dh.dtype: Σ over the k slots of each token of dh_r W1[e(r)] (fp32 slot sum, deterministic)."""
    # B[f, n] = W1[e, f, n]: dh · W1[e].
    return rows_to_slots(dh.contiguous(), w1, w1.stride(1), w1.stride(2), w1.shape[2], None, None, sorted_to_flat,
                         expert_offsets, tile_expert, tile_row_start, num_tokens, top_k)


@grouped_up_bwd_dx.register_fake
def _(dh, w1, sorted_to_flat, expert_offsets, tile_expert, tile_row_start, num_tokens, top_k):
    return dh.new_empty((num_tokens, w1.shape[2]))
