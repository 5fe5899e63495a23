"""Shared machinery of the grouped (per-expert) GEMMs: tile/row helpers, the gathered mainloop, the activations and
their derivatives, the per-expert weight-gradient kernel and the deterministic top-k slot combine.

Glossary: T tokens, D model width, F expert hidden width, E experts, k top-k, TK = T·k. Row r of an "expert-sorted"
tensor is sorted row r of `moe_align` (sorted_to_flat[r] = t·k + j, token t = sorted_to_flat[r] // k); "flat order"
is the [T, k, ·] slot order; "token order" is [T, ·].

Math.
  weight gradient (`grouped_wgrad`): for every expert e with rows R_e = [offsets[e], offsets[e+1]),
      dW[e] = Σ_{r∈R_e} g_r ⊗ u_r  ([N, K]),     db[e] = Σ_{r∈R_e} c_r g_r  ([N]),
  up-projection: g_r = dh_r (expert-sorted), u_r = x[t(r)] (token row, gathered), c_r = 1;
  down-projection: g_r = dy[t(r)] (token row, gathered), u_r = s_r·a'_r (expert-sorted, written by grouped_down_bwd:
  the routing weight times the dropped-out activation), c_r = s_r. So dW2 = Σ (s_r dy)ᵀ a'_r with the activation
  computed once per element (in grouped_down_bwd) rather than once per dW2 column block.
  combine (`slot_combine`): y[t] = Σ_{j<k} Y[t, j], summed in fp32 in slot order j = 0..k-1 (no atomics: two runs
  give identical bits).

Activations (fp32, on the accumulator) and their derivatives used by the backward:
  quick_gelu  a = h·σ(1.702h)                    a' = σ(1.702h) + 1.702·h·σ(1.702h)·(1 − σ(1.702h))
  gelu        a = h·Φ(h), Φ(h) = ½(1 + erf(h/√2))  a' = Φ(h) + h·φ(h), φ(h) = exp(−h²/2)/√(2π)
  gelu_tanh   a = ½h(1 + tanh u), u = √(2/π)(h + 0.044715h³)
              a' = ½(1 + tanh u) + ½h(1 − tanh²u)·√(2/π)(1 + 3·0.044715h²);   tanh u = 2σ(2u) − 1
Every loaded row/token/expert index is widened to int64 before it multiplies a stride (TK·F passes 2^31 at
ViT-L/14, batch 1024); strides themselves stay int32 (widening all of them costs registers).

The weight-gradient kernel writes every [BLOCK_N, BLOCK_K] tile of dW (and db), so an expert with no rows gets
exact zeros, never uninitialised memory.
"""

import torch
import triton
import triton.language as tl

from clipmoe_kernels._triton_utils import (
    GEMM_CONFIGS,
    GEMM_CONFIGS_LARGE,
    WGRAD_CONFIGS,
    LaunchPlan,
    PlanCache,
    TunedKernel,
    block_m_for,
    candidate_configs,
    cdiv,
    custom_op,
    dot_precision,
    launch,
    launch_settings,
    rows_bucket,
    weight_operand,
)

# Combine tile: tokens x columns per program of a bandwidth-bound pass: 32 x 128 elements per slot at 4 warps is 32
# contiguous elements per thread and slot, enough for vector loads and small enough not to spill. Not yet timed on a
# GPU (none was available when this was written); bench/ owns the measurement.
COMBINE_BLOCK_T = 32
COMBINE_BLOCK_D = 128


def slot_combine_ref(slots: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """[T, k, D] -> [T, D]: fp32 (or wider) sum over slots, in slot order, cast once."""
    acc = slots.to(torch.promote_types(slots.dtype, torch.float32))
    y = acc[:, 0]
    for j in range(1, slots.shape[1]):
        y = y + acc[:, j]
    return y.to(out_dtype)


def grouped_wgrad_ref(grad_out, inp, topk_weights, sorted_to_flat, expert_offsets, top_k, gather_grad_out,
                      gather_inp):
    """Plain-torch twin of `grouped_wgrad` (see the module docstring) in its inputs' dtype; loops over experts."""
    flat = sorted_to_flat.long()
    tok = flat // top_k
    g = grad_out.index_select(0, tok) if gather_grad_out else grad_out
    u = inp.index_select(0, tok) if gather_inp else inp
    gb = g * topk_weights.reshape(-1)[flat][:, None].to(g.dtype) if gather_grad_out else g
    bounds = expert_offsets.tolist()
    E = len(bounds) - 1
    dw = g.new_zeros(E, g.shape[1], u.shape[1])
    db = g.new_zeros(E, g.shape[1])
    for e in range(E):
        lo, hi = bounds[e], bounds[e + 1]
        dw[e] = g[lo:hi].T @ u[lo:hi]
        db[e] = gb[lo:hi].sum(0)
    return dw, db


# Program order of the row-tile GEMMs (grouped_up, grouped_down and their backward kernels): one 1-D grid of
# num_tiles x num_n programs in groups of GROUP_M consecutive row tiles; within a group the tile index runs fastest,
# then the N-block. Programs are issued roughly in id order, so the ~132 resident on an H200 cover GROUP_M tiles x
# about 132 / GROUP_M N-blocks: each gathered row tile and each weight column block is read from HBM about once while
# it sits in L2 (the 2-D grid with the tile index fastest re-read every gathered row once per N-block).
# bench/traffic_model.py replays exactly this order (`program_order` runs `program_tile` itself).
GROUP_M = 8


# --------------------------------------------------------------------------------------------------- jit helpers
@triton.jit
def program_tile(pid, num_tiles, num_n, GROUP_M: tl.constexpr):
    """(row tile, N-block) of program `pid` (scalar or block) in the grouped order described above."""
    per_group = GROUP_M * num_n
    first = (pid // per_group) * GROUP_M
    size = tl.minimum(num_tiles - first, GROUP_M)
    within = pid % per_group
    return first + within % size, within // size


@triton.jit
def wgrad_program(pid, num_n, num_k):
    """(expert, N-block, K-block) of weight-gradient program `pid`: experts slowest; within an expert the operand
    with fewer blocks runs fastest, so the resident programs share one row block of the larger operand (read from
    HBM about once) and all blocks of the smaller one."""
    per_expert = num_n * num_k
    e = pid // per_expert
    within = pid % per_expert
    if num_n <= num_k:
        n, k = within % num_n, within // num_n
    else:
        n, k = within // num_k, within % num_k
    return e, n, k


@triton.jit
def _program_order_kernel(out_ptr, num_programs, dim0, dim1, GROUP_M: tl.constexpr, WGRAD: tl.constexpr,
                          BLOCK: tl.constexpr):
    # out[:, pid] = the program's coordinates: (tile, n, 0) of program_tile, or (e, n, k) of wgrad_program
    pids = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = pids < num_programs
    pids = tl.minimum(pids, num_programs - 1)
    if WGRAD:
        a, b, c = wgrad_program(pids, dim0, dim1)
    else:
        a, b = program_tile(pids, dim0, dim1, GROUP_M)
        c = b * 0
    tl.store(out_ptr + pids, a, mask=mask)
    tl.store(out_ptr + num_programs + pids, b, mask=mask)
    tl.store(out_ptr + 2 * num_programs + pids, c, mask=mask)


def _run_order(num_programs, dim0, dim1, wgrad):
    out = torch.empty((3, num_programs), dtype=torch.int32)
    if num_programs:
        block = 1024
        launch(_program_order_kernel, (cdiv(num_programs, block),), out.device, out, num_programs, dim0, dim1,
               GROUP_M=GROUP_M, WGRAD=wgrad, BLOCK=block)
    return out


def program_order(num_tiles: int, num_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tile, N-block) of row-tile programs 0..num_tiles·num_n-1 (int32), computed by the kernels' `program_tile`
    under the Triton interpreter, so that the traffic model replays the kernels' own order."""
    tiles, ns, _ = _run_order(num_tiles * num_n, num_tiles, num_n, False)
    return tiles, ns


def wgrad_program_order(num_experts: int, num_n: int, num_k: int):
    """(expert, N-block, K-block) of weight-gradient programs in launch order, by the kernel's `wgrad_program`."""
    return tuple(_run_order(num_experts * num_n * num_k, num_n, num_k, True))


@triton.jit
def apply_activation(h, ACTIVATION: tl.constexpr):
    """act(h) in fp32 (h fp32)."""
    if ACTIVATION == "quick_gelu":
        a = h * tl.sigmoid(1.702 * h)
    elif ACTIVATION == "gelu":
        a = 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))
    else:  # gelu_tanh
        u = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        a = 0.5 * h * (2.0 * tl.sigmoid(2.0 * u))  # 1 + tanh u = 2σ(2u)
    return a


@triton.jit
def activation_grad(h, ACTIVATION: tl.constexpr):
    """act'(h) in fp32 (h fp32); the formulas of the module docstring."""
    if ACTIVATION == "quick_gelu":
        sg = tl.sigmoid(1.702 * h)
        da = sg + 1.702 * h * sg * (1.0 - sg)
    elif ACTIVATION == "gelu":
        da = 0.5 * (1.0 + tl.erf(h * 0.7071067811865476)) + h * 0.3989422804014327 * tl.exp(-0.5 * h * h)
    else:  # gelu_tanh
        u = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        th = 2.0 * tl.sigmoid(2.0 * u) - 1.0
        da = 0.5 * (1.0 + th) + 0.5 * h * (1.0 - th * th) * 0.7978845608028654 * (1.0 + 0.134145 * h * h)
    return da


@triton.jit
def tile_rows(tile, tile_row_start_ptr, expert_offsets_ptr, e, BLOCK_M: tl.constexpr):
    """Sorted rows [BLOCK_M] (int64) of tile `tile` of expert `e`, and the mask of rows inside the expert."""
    row_start = tl.load(tile_row_start_ptr + tile).to(tl.int64)
    row_end = tl.load(expert_offsets_ptr + e + 1).to(tl.int64)
    rows = row_start + tl.arange(0, BLOCK_M)
    return rows, rows < row_end


@triton.jit
def row_tile_program(tile_expert_ptr, tile_row_start_ptr, expert_offsets_ptr, N, GROUP_M: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The work of this program of a row-tile GEMM over N output columns, in the L2-friendly program order:
    (expert e, sorted rows [BLOCK_M] int64, row mask, column block pid_n). e = -1 marks an unused slot of the tile
    table: the caller returns (its rows are read as expert 0's and fully masked, so nothing reads out of bounds)."""
    num_n = tl.cdiv(N, BLOCK_N)
    tile, pid_n = program_tile(tl.program_id(0), tl.num_programs(0) // num_n, num_n, GROUP_M)
    e = tl.load(tile_expert_ptr + tile).to(tl.int64)
    rows, row_mask = tile_rows(tile, tile_row_start_ptr, expert_offsets_ptr, tl.maximum(e, 0), BLOCK_M)
    return e, rows, row_mask & (e >= 0), pid_n


@triton.jit
def rows_matmul(a_ptr, a_rows, row_mask, stride_am, stride_ak,
                w, e, stride_we, stride_wk, stride_wn, pid_n, offs_n, n_mask, K, WEIGHT_DESC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_N] = A[a_rows, :K] @ B[:K, offs_n] with B[kk, n] = W[e] at kk·stride_wk + n·stride_wn
    (so W[e] or W[e]ᵀ without a transposed copy). A rows are gathered by int64 index (no permuted copy); masked rows
    and columns read as zero. The weight tiles: WEIGHT_DESC "" pointer loads from `w`, a pointer; "kn" / "nk" TMA
    loads from `w`, a descriptor over the [E, K, N] / [E, N, K] view (_triton_utils.weight_operand) whose box is
    one [BLOCK_K, BLOCK_N] / [BLOCK_N, BLOCK_K] tile of one expert, zero-filled past that expert's K and N."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    a_base = a_ptr + a_rows[:, None] * stride_am
    if WEIGHT_DESC == "":
        b_base = w + e * stride_we + offs_n[None, :] * stride_wn
    else:
        e32 = e.to(tl.int32)
        n0 = pid_n * BLOCK_N
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        a = tl.load(a_base + offs_k[None, :] * stride_ak, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        if WEIGHT_DESC == "kn":
            b = w.load([e32, k0, n0]).reshape(BLOCK_K, BLOCK_N)
        elif WEIGHT_DESC == "nk":
            b = tl.trans(w.load([e32, n0, k0]).reshape(BLOCK_N, BLOCK_K))
        else:
            b = tl.load(b_base + offs_k[:, None] * stride_wk, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a.to(b.dtype), b, acc, input_precision=INPUT_PRECISION)
    return acc


# ------------------------------------------------------------------------------------------------------- kernels
@triton.jit(do_not_specialize=["ROWS_BUCKET"])
def _grouped_wgrad_kernel(
    go_ptr,              # grad-out rows: [TK, N] expert-sorted, or [T, N] token order when GATHER_GO
    in_ptr,              # input rows: [T, K] token order when GATHER_IN, or [TK, K] expert-sorted
    topk_weights_ptr,    # [TK] fp32 routing weights, flat order (read when SCALE_DB)
    dw_ptr,              # [E, N, K] out
    db_ptr,              # [E, N] out
    sorted_to_flat_ptr,  # [TK] int32
    expert_offsets_ptr,  # [E+1] int32
    N, K, ROWS_BUCKET,
    stride_gom, stride_gon, stride_inm, stride_ink,
    stride_dwe, stride_dwn, stride_dwk, stride_dbe, stride_dbn,
    TOP_K: tl.constexpr, GATHER_GO: tl.constexpr, SCALE_DB: tl.constexpr, GATHER_IN: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Program (e, pid_n, pid_k) (order: wgrad_program) owns dW[e, pid_n·BLOCK_N:, pid_k·BLOCK_K:] and walks expert
    # e's contiguous sorted rows BLOCK_M at a time (BLOCK_M is the grouped-GEMM constant; this loop does not read the
    # tile table); programs with pid_k == 0 also store db[e, pid_n·BLOCK_N:]. Both operands go to the GEMM exactly as
    # loaded (nothing is computed on them in registers), so the wgmma loop is pipelined like the row-tile GEMMs'.
    e, pid_n, pid_k = wgrad_program(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(K, BLOCK_K))
    e = e.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    k_mask = offs_k < K
    lo = tl.load(expert_offsets_ptr + e).to(tl.int64)
    hi = tl.load(expert_offsets_ptr + e + 1).to(tl.int64)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(lo, hi, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M).to(tl.int64)
        row_mask = rows < hi
        flat = tl.load(sorted_to_flat_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        tok = flat // TOP_K
        if GATHER_GO:
            go_rows = tok
        else:
            go_rows = rows
        g = tl.load(go_ptr + go_rows[:, None] * stride_gom + offs_n[None, :] * stride_gon,
                    mask=row_mask[:, None] & n_mask[None, :], other=0.0)
        if GATHER_IN:
            in_rows = tok
        else:
            in_rows = rows
        u = tl.load(in_ptr + in_rows[:, None] * stride_inm + offs_k[None, :] * stride_ink,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(tl.trans(g), u, acc, input_precision=INPUT_PRECISION)
        if SCALE_DB:
            s = tl.load(topk_weights_ptr + flat, mask=row_mask, other=0.0)
            db_acc += tl.sum(g.to(tl.float32) * s[:, None], axis=0)
        else:
            db_acc += tl.sum(g.to(tl.float32), axis=0)
    tl.store(dw_ptr + e * stride_dwe + offs_n[:, None] * stride_dwn + offs_k[None, :] * stride_dwk,
             acc.to(dw_ptr.dtype.element_ty), mask=n_mask[:, None] & k_mask[None, :])
    if pid_k == 0:
        tl.store(db_ptr + e * stride_dbe + offs_n * stride_dbn, db_acc.to(db_ptr.dtype.element_ty), mask=n_mask)


_grouped_wgrad = TunedKernel(_grouped_wgrad_kernel, WGRAD_CONFIGS, key=["N", "K", "ROWS_BUCKET"])


@triton.jit(do_not_specialize=["ROWS_BUCKET"])
def _rows_to_slots_kernel(
    a_ptr,               # [TK, K] expert-sorted rows
    w,                   # [E, ...] expert weights: B[kk, n] = w[e] at kk·stride_wk + n·stride_wn; a pointer, or a
                         # TensorDescriptor when WEIGHT_DESC (rows_matmul)
    b_ptr,               # [E, N] bias (read when BIAS_AND_WEIGHT)
    topk_weights_ptr,    # [TK] fp32, flat order (read when BIAS_AND_WEIGHT)
    out_ptr,             # [TK, N] out, flat order (the [T, k, N] slots), or [T, N] itself when top-k is 1
    sorted_to_flat_ptr,  # [TK] int32
    expert_offsets_ptr,  # [E+1] int32
    tile_expert_ptr,     # [num_tiles] int32, -1 = unused
    tile_row_start_ptr,  # [num_tiles] int32
    N, K, ROWS_BUCKET,
    stride_am, stride_ak, stride_we, stride_wk, stride_wn, stride_be, stride_bn, stride_om, stride_on,
    BIAS_AND_WEIGHT: tl.constexpr, WEIGHT_DESC: tl.constexpr, INPUT_PRECISION: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Program (tile, pid_n): BLOCK_M sorted rows x columns pid_n·BLOCK_N.. of N; rows scatter to their flat slot.
    # The down-projection (a W2[e]ᵀ + b2[e], times the routing weight) and the up-projection's dx (dh W1[e]).
    e, rows, row_mask, pid_n = row_tile_program(tile_expert_ptr, tile_row_start_ptr, expert_offsets_ptr, N, GROUP_M,
                                                BLOCK_M, BLOCK_N)
    if e < 0:  # an unused slot of the tile table
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    acc = rows_matmul(a_ptr, rows, row_mask, stride_am, stride_ak, w, e, stride_we, stride_wk, stride_wn, pid_n,
                      offs_n, n_mask, K, WEIGHT_DESC, BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION)
    flat = tl.load(sorted_to_flat_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    if BIAS_AND_WEIGHT:  # the weight multiplies the fp32 accumulator, before the single cast
        bias = tl.load(b_ptr + e * stride_be + offs_n * stride_bn, mask=n_mask, other=0.0).to(tl.float32)
        s = tl.load(topk_weights_ptr + flat, mask=row_mask, other=0.0)
        acc = (acc + bias[None, :]) * s[:, None]
    tl.store(out_ptr + flat[:, None] * stride_om + offs_n[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & n_mask[None, :])


# Two GEMMs of equal widths (N = D, K = F) run this kernel: the down-projection forward reads W2[e] [D, F] along K,
# the up-projection's dx reads W1[e] [F, D] along N. Their best tiles can differ, so each has its own autotune state
# and tuned-config entry.
_rows_to_slots = TunedKernel(_rows_to_slots_kernel, GEMM_CONFIGS, key=["N", "K", "ROWS_BUCKET"],
                             large_configs=GEMM_CONFIGS_LARGE, weight_arg="w")
_rows_to_slots_dx = TunedKernel(_rows_to_slots_kernel, GEMM_CONFIGS, key=["N", "K", "ROWS_BUCKET"],
                                large_configs=GEMM_CONFIGS_LARGE, weight_arg="w", name="_rows_to_slots_kernel[dx]")


@triton.jit(do_not_specialize=["T"])
def _slot_combine_kernel(
    slots_ptr,  # [T, TOP_K, D] contiguous (fp32 accumulator, or any float)
    out_ptr,    # [T, D] out
    T, D,
    stride_ot, stride_od,
    TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Program (pid_t, pid_d) sums the TOP_K slots of a [BLOCK_T, BLOCK_D] block of y, in slot order.
    offs_t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (offs_t < T)[:, None] & (offs_d < D)[None, :]
    base = slots_ptr + offs_t[:, None] * (TOP_K * D) + offs_d[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        acc += tl.load(base + j * D, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs_t[:, None] * stride_ot + offs_d[None, :] * stride_od,
             acc.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------- launchers
def min_block_n(device, wgrad=False) -> int:
    """Smallest BLOCK_N any launch on `device` may pick (sizes per-N-tile partial buffers before autotune picks)."""
    return min(c.BLOCK_N for c in candidate_configs(device, wgrad))


def _slot_combine_plan(device, num_tokens: int, top_k: int, width: int, out_strides) -> LaunchPlan:
    grid = (cdiv(num_tokens, COMBINE_BLOCK_T), cdiv(width, COMBINE_BLOCK_D))
    return LaunchPlan.build(_slot_combine_kernel, grid, device, (num_tokens, width, *out_strides),
                            dict(TOP_K=top_k, BLOCK_T=COMBINE_BLOCK_T, BLOCK_D=COMBINE_BLOCK_D, num_warps=4))


def slot_combine(slots: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[t] = Σ_j slots[t, j] in fp32, slot order; slots [T, k, D] contiguous, out [T, D] (any strides)."""
    T, k, D = slots.shape
    if T > 0:
        _slot_combine_plan(slots.device, T, k, D, out.stride())(slots, out)
    return out


_ROWS_TO_SLOTS_PLANS = PlanCache()  # rows_to_slots' launches (GEMM, then the slot combine), replayed


def rows_to_slots(a: torch.Tensor, w: torch.Tensor, stride_wk: int, stride_wn: int, n: int, bias, topk_weights,
                  sorted_to_flat, expert_offsets, tile_expert, tile_row_start, num_tokens: int, top_k: int):
    """[T, n] in a.dtype: Σ over the k slots of each token of a_r · B[e(r)] (B[kk, j] = w[e] at kk·stride_wk +
    j·stride_wn), with bias and routing weight (`bias` [E, n] and `topk_weights` given) or without (both None); fp32
    slots summed in slot order (deterministic). a [TK, K] expert-sorted rows."""
    tk, num_experts = sorted_to_flat.shape[0], w.shape[0]
    y = a.new_empty(num_tokens, n)  # sizes as ints: see grouped_up
    # k = 1: one slot per token, so the GEMM writes y directly; else fp32 slots, summed in slot order.
    out = y if top_k == 1 else a.new_empty(tk, n, dtype=torch.float32)
    with_bias = bias is not None
    tensors = (a, w, bias if with_bias else w, topk_weights if with_bias else w, out, sorted_to_flat, expert_offsets,
               tile_expert, tile_row_start)
    precision = dot_precision(a.dtype)
    plan_key = (a.device, a.dtype, tk, tile_expert.shape[0], w.shape, a.stride(), w.stride(), stride_wk, stride_wn, n,
                bias.stride() if with_bias else None, num_tokens, top_k, precision, launch_settings())
    plans = _ROWS_TO_SLOTS_PLANS.get(plan_key)
    if plans is not None:
        gemm, combine = plans
        gemm(*tensors)
        if combine is not None:
            combine(out, y)
        return y
    num_tiles = tile_expert.shape[0]

    def grid(block_n, block_k):
        return (num_tiles * cdiv(n, block_n),)

    block_m = block_m_for(a.device, tk, num_experts)
    weight, weight_desc = weight_operand(w, a.shape[1], n, stride_wk, stride_wn, block_m)
    args = (a, weight, *tensors[2:], n, a.shape[1], rows_bucket(tk, num_experts), *a.stride(), w.stride(0), stride_wk,
            stride_wn, *(bias.stride() if with_bias else (0, 0)), *out.stride())
    meta = dict(BIAS_AND_WEIGHT=with_bias, WEIGHT_DESC=weight_desc, INPUT_PRECISION=precision, GROUP_M=GROUP_M,
                BLOCK_M=block_m)
    combine = _slot_combine_plan(a.device, num_tokens, top_k, n, y.stride()) if top_k > 1 and num_tokens else None
    if tk > 0:
        kernel = _rows_to_slots if with_bias else _rows_to_slots_dx
        gemm = kernel.launch_plan(grid, a.device, args, meta, len(tensors))
        if gemm is None:  # autotune chooses first, or a TMA descriptor: the launch as built
            kernel(grid, a.device, args, meta)
        else:
            _ROWS_TO_SLOTS_PLANS.remember(plan_key, (gemm, combine))
            gemm(*tensors)
    if combine is not None:
        combine(out, y)
    return y


@custom_op("clipmoe::grouped_wgrad")
def grouped_wgrad(grad_out: torch.Tensor, inp: torch.Tensor, topk_weights: torch.Tensor,
                  sorted_to_flat: torch.Tensor, expert_offsets: torch.Tensor, top_k: int,
                  gather_grad_out: bool, gather_inp: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dW [E, N, K], db [E, N]) in inp.dtype, see the module docstring. grad_out [TK or T, N], inp [T or TK, K],
    topk_weights [T, k] fp32 contiguous (read only when gather_grad_out: db then sums the token rows scaled by s_r;
    dW takes the rows as they are, the scale being in inp)."""
    E = expert_offsets.shape[0] - 1
    N, K = grad_out.shape[1], inp.shape[1]
    dw = inp.new_empty((E, N, K))
    db = inp.new_empty((E, N))
    tk = sorted_to_flat.shape[0]

    def grid(block_n, block_k):
        return (E * cdiv(N, block_n) * cdiv(K, block_k),)

    args = (grad_out, inp, topk_weights, dw, db, sorted_to_flat, expert_offsets, N, K, rows_bucket(tk, E),
            grad_out.stride(0), grad_out.stride(1), inp.stride(0), inp.stride(1),
            dw.stride(0), dw.stride(1), dw.stride(2), db.stride(0), db.stride(1))
    meta = dict(TOP_K=top_k, GATHER_GO=gather_grad_out, SCALE_DB=gather_grad_out, GATHER_IN=gather_inp,
                INPUT_PRECISION=dot_precision(inp.dtype), BLOCK_M=block_m_for(inp.device, tk, E))
    _grouped_wgrad(grid, inp.device, args, meta)
    return dw, db


@grouped_wgrad.register_fake
def _(grad_out, inp, topk_weights, sorted_to_flat, expert_offsets, top_k, gather_grad_out, gather_inp):
    E = expert_offsets.shape[0] - 1
    return inp.new_empty((E, grad_out.shape[1], inp.shape[1])), inp.new_empty((E, grad_out.shape[1]))

