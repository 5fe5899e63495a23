"""Down-projection grouped GEMM of the expert FFN, fused with bias, routing weight and the top-k combine; and its
backward kernel (dh and the routing-weight gradient).

Math (glossary: T tokens, D model width, F expert hidden width, E experts, k top-k, TK = T·k; sorted row r holds flat
slot f(r) = t·k + j of token t(r), routed to expert e(r) with routing weight s_r = topk_weights[t, j]):
  forward    z_r = a_r · W2[e]ᵀ + b2[e]                    ([D] per row, fp32 accumulator)
             Y[t, j] = s_r · z_r                            (weight applied on the fp32 accumulator)
             y[t] = Σ_j Y[t, j]                              (fp32, slot order, cast once to the output dtype)
  backward   G_r = dy[t(r)] · W2[e]                          ([F] per row)
             ds_r = dy[t(r)] · z_r = Σ_f G_rf · a_rf + dy[t(r)] · b2[e]
             dh_r = s_r · G_r ⊙ act'(h_r)                    (a_r = act(h_r) and act'(h_r) recomputed from the saved h)
             u_r = s_r · a_r                                 (stored for dW2: the activation once per element)
             dW2[e] = Σ_{r∈e} dy[t(r)]ᵀ u_r,  db2[e] = Σ_{r∈e} s_r dy[t(r)]   (grouped_gemm.grouped_wgrad)
Tensors: a, h [TK, F] expert-sorted; w2 [E, D, F], b2 [E, D]; topk_weights [T, k] fp32; y, dy [T, D] token order.

Design. Forward: one program per (tile of the moe_align tile table, BLOCK_N columns of D), in the grouped order of
grouped_gemm.program_tile; unused tiles
(tile_expert == -1) exit at once. Rows scatter on store to their flat slot of an fp32 [T, k, D] buffer, then
grouped_gemm.slot_combine sums the k slots per token in slot order: deterministic, no atomics. For k = 1 the GEMM
writes y directly. Because the weight multiplies the fp32 accumulator and the slot buffer is fp32, a 16-bit output
cannot overflow before the routing weight shrinks it (docs/kernels.md, "Numerics").
Backward: the SonicMoE idea, so Y (TK x D) is never cached: ds_r is a row sum of G ⊙ a, which the dh kernel holds in
registers anyway. Each program reduces its BLOCK_N columns of F to one partial per row, written to
partials[pid_n, f(r)]; the launcher sums the partials over pid_n (fixed order, no atomics). The dy·b2 term is added
by the pid_n == 0 programs. The same epilogue stores u = s·a' for the dW2 GEMM, so the activation (and the dropout
mask) is computed once per element instead of once per dW2 column block, and the dW2 GEMM's operands go to the
tensor cores exactly as loaded (a pipelined wgmma loop).
"""

import torch
import triton
import triton.language as tl

from clipmoe_kernels._triton_utils import (
    GEMM_CONFIGS,
    GEMM_CONFIGS_LARGE,
    TunedKernel,
    block_m_for,
    cdiv,
    custom_op,
    dot_precision,
    rows_bucket,
    weight_operand,
)
from clipmoe_kernels.activation import get_activation
from clipmoe_kernels.dropout import dropout_keep, dropout_threshold
from clipmoe_kernels.grouped_gemm import (
    GROUP_M,
    activation_grad,
    apply_activation,
    min_block_n,
    row_tile_program,
    rows_matmul,
    rows_to_slots,
)


def grouped_down_ref(a, w2, b2, topk_weights, sorted_to_flat, expert_offsets):
    """Plain torch: y [T, D] = Σ_j s · (a W2[e]ᵀ + b2[e]), combine in fp32 (the test oracle)."""
    T, k = topk_weights.shape
    bounds = expert_offsets.tolist()
    acc = torch.promote_types(a.dtype, torch.float32)
    z = a.new_empty(a.shape[0], w2.shape[1], dtype=acc)
    for e in range(len(bounds) - 1):
        lo, hi = bounds[e], bounds[e + 1]
        z[lo:hi] = torch.nn.functional.linear(a[lo:hi].to(acc), w2[e].to(acc), b2[e].to(acc))
    flat = sorted_to_flat.long()
    slots = z.new_zeros(T * k, w2.shape[1])
    slots[flat] = z * topk_weights.reshape(-1)[flat].to(acc)[:, None]
    return slots.view(T, k, -1).sum(1).to(a.dtype)


def grouped_down_bwd_ref(dy, h, w2, b2, topk_weights, sorted_to_flat, expert_offsets, activation):
    """Plain torch: (dh [TK, F], dtopk_weights [T, k]) by autograd through the forward reference."""
    with torch.enable_grad():
        h = h.detach().requires_grad_()
        s = topk_weights.detach().requires_grad_()
        y = grouped_down_ref(get_activation(activation)(h), w2, b2, s, sorted_to_flat, expert_offsets)
        return torch.autograd.grad(y, (h, s), dy)


def grouped_down_dw2_input_ref(h, topk_weights, sorted_to_flat, activation):
    """Plain torch: u [TK, F] = s_r · act(h_r), expert-sorted rows (the dW2 input grouped_down_bwd stores)."""
    s = topk_weights.reshape(-1)[sorted_to_flat.long()].to(torch.promote_types(h.dtype, torch.float32))
    return (get_activation(activation)(h.to(s.dtype)) * s[:, None]).to(h.dtype)


@triton.jit(do_not_specialize=["ROWS_BUCKET", "NUM_N_ALLOC", "DROPOUT_THRESHOLD"])
def _grouped_down_bwd_kernel(
    dy_ptr,              # [T, D] token order, any strides
    h_ptr,               # [TK, F] expert-sorted pre-activation (saved by grouped_up)
    w2,                  # [E, D, F]: a pointer, or a TensorDescriptor when WEIGHT_DESC (grouped_gemm.rows_matmul)
    b2_ptr,              # [E, D]
    topk_weights_ptr,    # [TK] fp32, flat order
    dh_ptr,              # [TK, F] out, expert-sorted, h's row stride (written when COMPUTE_DH)
    u_ptr,               # [TK, F] out, expert-sorted, h's row stride: s_r · a'_r, the dW2 input (when STORE_U)
    ds_ptr,              # [NUM_N_ALLOC, TK] fp32 out: per-N-tile partials of ds, flat order (when COMPUTE_DS)
    sorted_to_flat_ptr,  # [TK] int32
    expert_offsets_ptr,  # [E+1] int32
    tile_expert_ptr,     # [num_tiles] int32, -1 = unused
    tile_row_start_ptr,  # [num_tiles] int32
    seed_ptr,            # [1] int64 Philox key of the dropout mask (read when DROPOUT)
    D, F, ROWS_BUCKET, NUM_N_ALLOC, DROPOUT_THRESHOLD, DROPOUT_SCALE,
    stride_dyt, stride_dyd, stride_hm, stride_w2e, stride_w2d, stride_w2f, stride_b2e, stride_b2d, stride_dsn,
    TOP_K: tl.constexpr, ACTIVATION: tl.constexpr, COMPUTE_DH: tl.constexpr, COMPUTE_DS: tl.constexpr,
    STORE_U: tl.constexpr, DROPOUT: tl.constexpr, WEIGHT_DESC: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Program (tile, pid_n): BLOCK_M sorted rows x columns pid_n·BLOCK_N.. of F.
    e, rows, row_mask, pid_n = row_tile_program(tile_expert_ptr, tile_row_start_ptr, expert_offsets_ptr, F, GROUP_M,
                                                BLOCK_M, BLOCK_N)
    if e < 0:  # an unused slot of the tile table
        return
    flat = tl.load(sorted_to_flat_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    tok = flat // TOP_K
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < F
    mask = row_mask[:, None] & n_mask[None, :]
    if COMPUTE_DS:  # dy[t] · b2[e], once per row (pid_n == 0)
        ds = tl.zeros((BLOCK_M,), dtype=tl.float32)
        if pid_n == 0:
            for d0 in range(0, D, BLOCK_K):
                offs_d = d0 + tl.arange(0, BLOCK_K)
                d_mask = offs_d < D
                dyv = tl.load(dy_ptr + tok[:, None] * stride_dyt + offs_d[None, :] * stride_dyd,
                              mask=row_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
                b2v = tl.load(b2_ptr + e * stride_b2e + offs_d * stride_b2d, mask=d_mask, other=0.0).to(tl.float32)
                ds += tl.sum(dyv * b2v[None, :], axis=1)
    s = tl.load(topk_weights_ptr + flat, mask=row_mask, other=0.0)
    # B[d, n] = W2[e, d, n]: G = dy[t] · W2[e], gathered dy rows.
    g = rows_matmul(dy_ptr, tok, row_mask, stride_dyt, stride_dyd, w2, e, stride_w2e, stride_w2d, stride_w2f, pid_n,
                    offs_n, n_mask, D, WEIGHT_DESC, BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION)
    sorted_off = rows[:, None] * stride_hm + offs_n[None, :]  # h, u and dh share one layout: one offset tensor
    h = tl.load(h_ptr + sorted_off, mask=mask, other=0.0)
    # a' (for u and ds), then act'(h) (for dh), each from h.
    a = apply_activation(h.to(tl.float32), ACTIVATION)
    if DROPOUT:  # the forward's a' = a ⊙ keep / (1 - p): ds and u see a', dh gets the same factor on act'(h)
        keep = dropout_keep(tl.load(seed_ptr), flat, offs_n, F, DROPOUT_THRESHOLD)
        a = tl.where(keep, a * DROPOUT_SCALE, 0.0)
    if STORE_U:
        tl.store(u_ptr + sorted_off, (a * s[:, None]).to(u_ptr.dtype.element_ty), mask=mask)
    if COMPUTE_DS:
        ds += tl.sum(g * a, axis=1)  # masked columns: g = 0 there
        tl.store(ds_ptr + pid_n.to(tl.int64) * stride_dsn + flat, ds, mask=row_mask)
        if pid_n == 0:
            # The buffer has NUM_N_ALLOC rows (for the narrowest candidate BLOCK_N); rows this launch's BLOCK_N does
            # not reach are zeroed here, so no earlier launch (an autotune candidate) can leave partials behind.
            for n in range(tl.cdiv(F, BLOCK_N), NUM_N_ALLOC):
                tl.store(ds_ptr + flat + n * stride_dsn, 0.0, mask=row_mask)  # n·stride < NUM_N_ALLOC·TK < 2^31
    if COMPUTE_DH:
        da = activation_grad(h.to(tl.float32), ACTIVATION)
        if DROPOUT:
            da = tl.where(keep, da * DROPOUT_SCALE, 0.0)
        dh = g * da * s[:, None]
        tl.store(dh_ptr + sorted_off, dh.to(dh_ptr.dtype.element_ty), mask=mask)


# The epilogue holds the fp32 G, a' and act'(h) tiles: beyond 32 elements of each per thread they spill (ptxas -v).
_grouped_down_bwd = TunedKernel(_grouped_down_bwd_kernel, GEMM_CONFIGS, key=["D", "F", "ROWS_BUCKET"],
                                large_configs=GEMM_CONFIGS_LARGE, max_outputs_per_thread=32, weight_arg="w2")


@custom_op("clipmoe::grouped_down")
def grouped_down(a: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, topk_weights: torch.Tensor,
                 sorted_to_flat: torch.Tensor, expert_offsets: torch.Tensor, tile_expert: torch.Tensor,
                 tile_row_start: torch.Tensor) -> torch.Tensor:
    """y [T, D] in a.dtype = Σ_j s·(a W2[e]ᵀ + b2[e]), token order. a [TK, F] expert-sorted; topk_weights [T, k] fp32
    contiguous. The moe_align tile table must have been built with block_m = block_m_for(a.device, TK, E)."""
    T, k = topk_weights.shape
    # B[f, n] = W2[e, n, f]: a · W2[e]ᵀ, then + b2[e] and × the routing weight on the fp32 accumulator.
    return rows_to_slots(a, w2, w2.stride(2), w2.stride(1), w2.shape[1], b2, topk_weights, sorted_to_flat,
                         expert_offsets, tile_expert, tile_row_start, T, k)


@grouped_down.register_fake
def _(a, w2, b2, topk_weights, sorted_to_flat, expert_offsets, tile_expert, tile_row_start):
    return a.new_empty((topk_weights.shape[0], w2.shape[1]))


@custom_op("clipmoe::grouped_down_bwd")
def grouped_down_bwd(dy: torch.Tensor, h: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                     topk_weights: torch.Tensor, sorted_to_flat: torch.Tensor, expert_offsets: torch.Tensor,
                     tile_expert: torch.Tensor, tile_row_start: torch.Tensor, activation: str, compute_dh: bool,
                     compute_ds: bool, store_u: bool = False, dropout_seed: torch.Tensor | None = None,
                     dropout_p: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dh [TK, F] in h.dtype, expert-sorted; dtopk_weights [T, k] fp32; u [TK, F] in h.dtype, expert-sorted, the
    dW2 input s_r · a'_r). Each is an empty [0, ·] tensor when its flag is off. h is the saved pre-activation;
    topk_weights [T, k] fp32 contiguous; dropout_seed and dropout_p those of the forward (the mask is
    regenerated)."""
    get_activation(activation)
    T, k = topk_weights.shape
    tk = sorted_to_flat.shape[0]
    E, D, F = w2.shape
    h = h.contiguous()  # dh and u are written with h's row stride (one offset tensor in the kernel)
    dh = h.new_empty((tk if compute_dh else 0, F))
    dh_arg = dh if compute_dh else h  # never written when COMPUTE_DH is False
    u = h.new_empty((tk if store_u else 0, F))
    u_arg = u if store_u else h  # never written when STORE_U is False
    # One row of partials per BLOCK_N columns of F, sized for the narrowest BLOCK_N the launch may pick; the kernel
    # writes every row (zeros past its own BLOCK_N), so the buffer needs no fill and autotune candidates that ran
    # before the chosen one on the same buffer leave nothing behind.
    num_n_alloc = cdiv(F, min_block_n(h.device)) if compute_ds else 1
    partials = h.new_empty((num_n_alloc, tk), dtype=torch.float32)
    num_tiles = tile_expert.shape[0]

    def grid(block_n, block_k):
        return (num_tiles * cdiv(F, block_n),)

    dropout = dropout_p > 0
    block_m = block_m_for(h.device, tk, E)
    stride_w2e, stride_w2d, stride_w2f = w2.stride()
    weight, weight_desc = weight_operand(w2, D, F, stride_w2d, stride_w2f, block_m)
    args = (dy, h, weight, b2, topk_weights, dh_arg, u_arg, partials, sorted_to_flat, expert_offsets, tile_expert,
            tile_row_start, dropout_seed if dropout else sorted_to_flat, D, F, rows_bucket(tk, E), num_n_alloc,
            dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p), dy.stride(0), dy.stride(1), h.stride(0),
            stride_w2e, stride_w2d, stride_w2f, b2.stride(0), b2.stride(1), partials.stride(0))
    meta = dict(TOP_K=k, ACTIVATION=activation, COMPUTE_DH=compute_dh, COMPUTE_DS=compute_ds, STORE_U=store_u,
                DROPOUT=dropout, WEIGHT_DESC=weight_desc, INPUT_PRECISION=dot_precision(h.dtype), GROUP_M=GROUP_M,
                BLOCK_M=block_m)
    if tk > 0 and (compute_dh or compute_ds or store_u):
        _grouped_down_bwd(grid, h.device, args, meta)
    ds = partials.sum(0).view(T, k) if compute_ds else partials.new_empty((0, k))
    return dh, ds, u


@grouped_down_bwd.register_fake
def _(dy, h, w2, b2, topk_weights, sorted_to_flat, expert_offsets, tile_expert, tile_row_start, activation,
      compute_dh, compute_ds, store_u=False, dropout_seed=None, dropout_p=0.0):
    T, k = topk_weights.shape
    tk, F = sorted_to_flat.shape[0], w2.shape[2]
    dh = h.new_empty((tk if compute_dh else 0, F))
    ds = topk_weights.new_empty((T, k) if compute_ds else (0, k), dtype=torch.float32)
    return dh, ds, h.new_empty((tk if store_u else 0, F))
