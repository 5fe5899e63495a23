"""Fused top-k router: fp32 softmax -> top-k -> (optional) renormalisation -> int32 ids, fp32 weights, and the
statistics of the router's auxiliary losses, in one kernel over the router logits.

Math (glossary: T tokens, E experts, k top-k):
  p[t] = softmax(logits[t]) in fp32 over all E experts      (CLIP-MoE: softmax before top-k)
  ids[t] = the k largest p[t, e], decreasing; w[t, j] = p[t, ids[t, j]]
  renormalize: w[t, j] /= Σ_j' w[t, j']
  expert_counts[e] = #{t : ids[t, 0] = e}   (top-1 counts, int32)     prob_sums[e] = Σ_t p[t, e]   (fp32)
  topk_counts[e] = #{(t, j) : ids[t, j] = e}   (all k choices, int32)   lse[t] = log Σ_e exp(logits[t, e])   (fp32)
so the paper-form balance loss is E · Σ_e (expert_counts[e] / T) · (prob_sums[e] / T), the official-code form the
same with topk_counts, and the router z-loss mean_t lse[t]² (clipmoe.losses).

Ties: equal probabilities go to the lower expert id first (torch.topk leaves the order of ties unspecified; on CPU
it picks the higher id), so ids can differ from topk_routing_ref only where probabilities are exactly equal, and the
weights agree there. Non-finite logits follow topk_routing_ref: a token whose logits hold NaN or +inf (or are all
-inf) gets NaN probabilities and weights, and k distinct ids in [0, E).

Backward (plain torch in router_backward, a few [T, E] elementwise ops): the gradients of probs, of the
weights (through the renormalisation, scattered to the chosen columns) and of prob_sums (broadcast over tokens) are
summed into dp, then the softmax VJP dlogits = p ⊙ (dp − Σ_e p·dp), plus dlse ⊙ p (∂lse/∂logits = p). ids and
counts are not differentiable.
Saved: probs [T, E] and ids [T, k] (the weights are recomputed from them).

Kernel: each program walks BLOCKS_PER_PROGRAM blocks of BLOCK_T tokens, one [BLOCK_T, E] tile in registers at a
time (E padded to a power of two); top-k is k rounds of argmax + mask. The per-expert statistics accumulate in
registers and are written once per program. Up to SINGLE_PROGRAM_TOKENS tokens (every CLIP batch-1 shape) one
program covers all of them, so its statistics are the totals and the router is one launch; beyond, each program
writes partials that the launcher sums in program order. No atomics: two runs give identical bits.
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from clipmoe_kernels._triton_utils import cdiv, check_triton_device, custom_op, eager_cache, launch
from clipmoe_kernels.routing import topk_routing_ref

# Tokens per tile: the tile is BLOCK_T x next_pow2(E) fp32, tiny for E <= 64.
ROUTER_BLOCK_T = 64
# Up to this many tokens one program routes them all (at most 64 tiles in a row: a few µs on a GPU, less than a
# second launch for the reduction would cost); beyond, programs of TOKENS_PER_PROGRAM tokens (hundreds of programs
# at CLIP training batches) write partial statistics.
SINGLE_PROGRAM_TOKENS = 4096
TOKENS_PER_PROGRAM = 1024
# One [BLOCK_T, BLOCK_E] tile in registers; larger E would need a loop over experts.
MAX_EXPERTS = 1024


class RouterOutput(NamedTuple):
    probs: torch.Tensor          # [T, E] fp32 softmax
    topk_weights: torch.Tensor   # [T, k] fp32, renormalised when asked
    topk_ids: torch.Tensor       # [T, k] int32, decreasing probability
    # The statistics (None when topk_routing_triton was called with stats=False):
    expert_counts: torch.Tensor | None  # [E] int32, tokens whose top-1 expert is e
    prob_sums: torch.Tensor | None      # [E] fp32, Σ_t probs[t, e]
    topk_counts: torch.Tensor | None    # [E] int32, (token, slot) pairs routed to e over all k choices
    logsumexp: torch.Tensor | None      # [T] fp32, log Σ_e exp(logits[t, e]) (the router z-loss is its mean square)


def router_ref(router_logits: torch.Tensor, top_k: int, renormalize: bool = True) -> RouterOutput:
    """Plain torch: topk_routing_ref plus the balance-loss statistics (ids as int32)."""
    probs, weights, ids = topk_routing_ref(router_logits, top_k, renormalize)
    E = router_logits.shape[-1]
    counts = torch.bincount(ids[:, 0], minlength=E).to(torch.int32)
    topk_counts = torch.bincount(ids.reshape(-1), minlength=E).to(torch.int32)
    lse = torch.logsumexp(router_logits.to(probs.dtype), dim=-1)
    return RouterOutput(probs, weights, ids.to(torch.int32), counts, probs.sum(0), topk_counts, lse)


@triton.jit(do_not_specialize=["T", "BLOCKS_PER_PROGRAM"])
def _router_fwd_kernel(
    logits_ptr,   # [T, E] any float dtype, any strides
    probs_ptr,    # [T, E] fp32 out, contiguous
    weights_ptr,  # [T, TOP_K] fp32 out, contiguous
    ids_ptr,      # [T, TOP_K] int32 out, contiguous
    lse_ptr,      # [T] fp32 out: logsumexp of the logits
    counts_ptr,   # [num_programs, E] int32 out: top-1 counts of this program's tokens
    topk_counts_ptr,  # [num_programs, E] int32 out: counts over all k choices of this program's tokens
    psums_ptr,    # [num_programs, E] fp32 out: probability sums of this program's tokens
    T, E, BLOCKS_PER_PROGRAM,
    stride_lt, stride_le,
    TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr, STATS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Program pid: token blocks pid·BLOCKS_PER_PROGRAM .. (pid+1)·BLOCKS_PER_PROGRAM - 1 of BLOCK_T tokens, all experts.
    # STATS False: only probs, weights and ids are written (lse_ptr and the statistics pointers are not read).
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_E)
    e_mask = cols < E
    kcols = tl.arange(0, BLOCK_K)
    counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
    topk_counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
    psums = tl.zeros((BLOCK_E,), dtype=tl.float32)
    for b in range(BLOCKS_PER_PROGRAM):
        offs_t = (pid * BLOCKS_PER_PROGRAM + b).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        t_mask = offs_t < T
        mask = t_mask[:, None] & e_mask[None, :]
        # Padding columns read as -inf (probability 0); padding rows as 0 (finite, so they compute no NaN).
        x = tl.load(logits_ptr + offs_t[:, None] * stride_lt + cols[None, :] * stride_le, mask=mask,
                    other=0.0).to(tl.float32)
        x = tl.where(e_mask[None, :], x, float("-inf"))
        # Softmax like torch: exp(x - max) / sum. A row holding +inf or NaN, or all -inf, becomes NaN throughout.
        m = tl.max(x, axis=1)
        p = tl.exp(x - m[:, None])
        p = tl.where(e_mask[None, :], p, 0.0)
        total = tl.sum(p, axis=1)
        p = p / total[:, None]
        tl.store(probs_ptr + offs_t[:, None] * E + cols[None, :], p, mask=mask)
        if STATS:
            tl.store(lse_ptr + offs_t, m + tl.log(total), mask=t_mask)

        # Selection keys: NaN ranks below every probability but above chosen (-2) and padding (-3) columns, so k
        # rounds of argmax always pick k distinct real experts. argmax breaks ties toward the lower id.
        key = tl.where(p == p, p, -1.0)  # p == p is False exactly for NaN
        key = tl.where(e_mask[None, :], key, -3.0)
        w_all = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
        id_all = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
        w_sum = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for j in tl.static_range(TOP_K):
            idx = tl.argmax(key, axis=1).to(tl.int32)
            hit = cols[None, :] == idx[:, None]
            w = tl.sum(tl.where(hit, p, 0.0), axis=1)  # p at idx (NaN stays NaN)
            w_all = tl.where(kcols[None, :] == j, w[:, None], w_all)
            id_all = tl.where(kcols[None, :] == j, idx[:, None], id_all)
            w_sum += w
            chosen = tl.sum((hit & t_mask[:, None]).to(tl.int32), axis=0)
            topk_counts += chosen
            if j == 0:
                counts += chosen
            key = tl.where(hit, -2.0, key)
        if RENORMALIZE:
            w_all = w_all / w_sum[:, None]
        k_mask = t_mask[:, None] & (kcols < TOP_K)[None, :]
        tl.store(weights_ptr + offs_t[:, None] * TOP_K + kcols[None, :], w_all, mask=k_mask)
        tl.store(ids_ptr + offs_t[:, None] * TOP_K + kcols[None, :], id_all, mask=k_mask)
        psums += tl.sum(tl.where(t_mask[:, None], p, 0.0), axis=0)
    if STATS:
        tl.store(counts_ptr + pid * E + cols, counts, mask=e_mask)
        tl.store(topk_counts_ptr + pid * E + cols, topk_counts, mask=e_mask)
        tl.store(psums_ptr + pid * E + cols, psums, mask=e_mask)


@eager_cache(maxsize=256)  # at every forward
def router_programs(num_tokens: int) -> tuple[int, int]:
    """(programs, token blocks per program) of a router launch over `num_tokens` tokens."""
    blocks = cdiv(num_tokens, ROUTER_BLOCK_T)
    if num_tokens <= SINGLE_PROGRAM_TOKENS:
        return min(blocks, 1), blocks
    per_program = TOKENS_PER_PROGRAM // ROUTER_BLOCK_T
    return cdiv(blocks, per_program), per_program


def block_size(n: int) -> int:
    """The router kernel's block over n experts or choices: a power of two, at least 2 (tl.arange's minimum)."""
    return max(2, triton.next_power_of_2(n))


def _route(logits: torch.Tensor, top_k: int, renormalize: bool, stats: bool):
    """Allocate the outputs and launch the router kernel: (probs, weights, ids) and, when `stats`, (counts,
    prob_sums, topk_counts, lse) as well."""
    T, E = logits.shape
    f32, i32 = torch.float32, torch.int32
    # logits.new_empty with sizes as separate ints: see grouped_up (torch.empty(..., device=) parses ~1k more)
    probs = logits.new_empty(T, E, dtype=f32)
    weights = logits.new_empty(T, top_k, dtype=f32)
    ids = logits.new_empty(T, top_k, dtype=i32)
    num_programs, blocks_per_program = router_programs(T)
    if not stats:
        if num_programs:
            _launch_router(logits, probs, weights, ids, probs, probs, probs, probs, num_programs, blocks_per_program,
                           top_k, renormalize, False)
        return probs, weights, ids
    lse = logits.new_empty(T, dtype=f32)
    if num_programs == 0:
        return probs, weights, ids, logits.new_zeros(E, dtype=i32), logits.new_zeros(E, dtype=f32), \
            logits.new_zeros(E, dtype=i32), lse
    # One program: its statistics are the totals and go straight into the [E] outputs; else [programs, E] partials.
    partial = (E,) if num_programs == 1 else (num_programs, E)
    counts = logits.new_empty(*partial, dtype=i32)
    topk_counts = logits.new_empty(*partial, dtype=i32)
    psums = logits.new_empty(*partial, dtype=f32)
    _launch_router(logits, probs, weights, ids, lse, counts, topk_counts, psums, num_programs, blocks_per_program,
                   top_k, renormalize, True)
    if num_programs > 1:  # program-order sums of the partials
        counts, topk_counts, psums = counts.sum(0, dtype=torch.int32), topk_counts.sum(0, dtype=torch.int32), \
            psums.sum(0)
    return probs, weights, ids, counts, psums, topk_counts, lse


@eager_cache(maxsize=256)  # at every forward: one lookup for the whole dict (triton.next_power_of_2 costs ~1.4 µs)
def _router_meta(num_experts: int, top_k: int, renormalize: bool, stats: bool) -> dict:
    """The router launch's constexprs and warps (launch copies the dict: the cached one is never changed)."""
    return dict(TOP_K=top_k, RENORMALIZE=renormalize, STATS=stats, BLOCK_T=ROUTER_BLOCK_T,
                BLOCK_E=block_size(num_experts), BLOCK_K=block_size(top_k), num_warps=4)


def _launch_router(logits, probs, weights, ids, lse, counts, topk_counts, psums, num_programs, blocks_per_program,
                   top_k, renormalize, stats):
    T, E = logits.shape
    launch(_router_fwd_kernel, (num_programs,), logits.device, logits, probs, weights, ids, lse, counts, topk_counts,
           psums, T, E, blocks_per_program, *logits.stride(), **_router_meta(E, top_k, renormalize, stats))


@custom_op("clipmoe::route_topk")
def route_topk(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor,
                                                                                torch.Tensor, torch.Tensor,
                                                                                torch.Tensor, torch.Tensor,
                                                                                torch.Tensor]:
    """(probs, topk_weights, topk_ids, expert_counts, prob_sums, topk_counts, logsumexp) of a [T, E] logits tensor;
    see RouterOutput."""
    return _route(logits, top_k, renormalize, True)


@route_topk.register_fake
def _(logits, top_k, renormalize):
    T, E = logits.shape
    f32, i32 = torch.float32, torch.int32
    return (logits.new_empty((T, E), dtype=f32), logits.new_empty((T, top_k), dtype=f32),
            logits.new_empty((T, top_k), dtype=i32), logits.new_empty((E,), dtype=i32),
            logits.new_empty((E,), dtype=f32), logits.new_empty((E,), dtype=i32), logits.new_empty((T,), dtype=f32))


@custom_op("clipmoe::route_topk_without_stats")
def route_topk_without_stats(logits: torch.Tensor, top_k: int,
                             renormalize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(probs, topk_weights, topk_ids) only: the router of a forward whose aux losses nobody needs (inference). Four
    allocations fewer than route_topk, a measurable share of the host time at batch 1."""
    return _route(logits, top_k, renormalize, False)


@route_topk_without_stats.register_fake
def _(logits, top_k, renormalize):
    T, E = logits.shape
    return (logits.new_empty((T, E), dtype=torch.float32), logits.new_empty((T, top_k), dtype=torch.float32),
            logits.new_empty((T, top_k), dtype=torch.int32))


class RouterFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, top_k, renormalize):
        probs, weights, ids, counts, psums, topk_counts, lse = route_topk(logits, top_k, renormalize)
        ctx.save_for_backward(probs, ids)
        ctx.renormalize = renormalize
        ctx.logits_dtype = logits.dtype
        # ids and counts are int32: never differentiable, so they need no marking
        return probs, weights, ids, counts, psums, topk_counts, lse

    @staticmethod
    def backward(ctx, d_probs, d_weights, d_ids, d_counts, d_psums, d_topk_counts, d_lse):
        probs, ids = ctx.saved_tensors
        d_logits = router_backward(probs, ids, ctx.renormalize, d_probs, d_weights, d_psums, d_lse)
        return d_logits.to(ctx.logits_dtype), None, None  # logits, top_k, renormalize


def router_backward(probs, ids, renormalize, d_probs, d_weights, d_psums, d_lse):
    """d_logits [T, E] fp32 from the gradients of probs, topk_weights, prob_sums and logsumexp (any may be None)."""
    dp = torch.zeros_like(probs) if d_probs is None else d_probs.to(torch.float32)
    if d_psums is not None:
        dp = dp + d_psums.to(torch.float32)[None, :]
    if d_weights is not None:
        idx = ids.long()
        chosen = probs.gather(1, idx)
        d_w = d_weights.to(torch.float32)
        if renormalize:  # w = p_sel / S, S = Σ p_sel: dp_sel = (dw − Σ dw·w) / S
            total = chosen.sum(-1, keepdim=True)
            w = chosen / total
            d_chosen = (d_w - (d_w * w).sum(-1, keepdim=True)) / total
        else:
            d_chosen = d_w
        dp = dp.scatter_add(1, idx, d_chosen)
    d_logits = probs * (dp - (dp * probs).sum(-1, keepdim=True))
    if d_lse is not None:
        d_logits = d_logits + d_lse.to(torch.float32)[:, None] * probs
    return d_logits


NO_STATS = (None,) * 4


def _check_router_args(router_logits, top_k):
    if not isinstance(router_logits, torch.Tensor) or router_logits.dim() != 2:
        raise ValueError(f"router_logits must be a 2-D [T, E] tensor, got "
                         f"{tuple(router_logits.shape) if isinstance(router_logits, torch.Tensor) else router_logits}")
    E = router_logits.shape[1]
    if not isinstance(top_k, int) or not 1 <= top_k <= E:
        raise ValueError(f"top_k must be an int in [1, E={E}], got {top_k!r}")
    if not router_logits.is_floating_point():
        raise TypeError(f"router_logits must be floating point, got {router_logits.dtype}")
    if router_logits.dtype != torch.float64:
        check_triton_device("topk_routing_triton", router_logits)


def topk_routing_triton(router_logits: torch.Tensor, top_k: int, renormalize: bool = True,
                        stats: bool = True, validate_args: bool = True) -> RouterOutput:
    """Fused router: what topk_routing_ref returns (probs, topk_weights, topk_ids) plus the aux-loss statistics.

    Args:
        router_logits: [T, E] fp32/fp16/bf16 (fp64 takes router_ref), CUDA; CPU only under TRITON_INTERPRET=1.
        top_k: k in [1, E].
        renormalize: divide the k selected probabilities by their sum (CLIP-MoE does).
        stats: compute the statistics; False leaves those four fields None (the kernel then writes only probs,
            weights and ids; on the differentiable path it computes them anyway and they are dropped).
        validate_args: False skips the argument checks (shape, top_k, dtype, device) for a caller that made the
            logits itself and has checked them (MoEFFN: about 3 µs of a batch-1 forward).
    Returns:
        RouterOutput(probs [T, E] fp32, topk_weights [T, k] fp32, topk_ids [T, k] int32 (decreasing probability;
        ties to the lower id), expert_counts [E] int32 (top-1 counts), prob_sums [E] fp32, topk_counts [E] int32
        (all k choices), logsumexp [T] fp32). probs, topk_weights, prob_sums and logsumexp are differentiable with
        respect to router_logits. No host synchronisation; one kernel launch up to SINGLE_PROGRAM_TOKENS tokens.
    """
    if validate_args:
        _check_router_args(router_logits, top_k)
    renormalize = bool(renormalize)
    if router_logits.dtype == torch.float64:  # the kernel computes in fp32; fp64 callers get the fp64 reference
        out = router_ref(router_logits, top_k, renormalize)
    else:
        E = router_logits.shape[1]
        if E > MAX_EXPERTS:
            raise ValueError(f"topk_routing_triton supports up to {MAX_EXPERTS} experts, got E={E}")
        if not (router_logits.requires_grad and torch.is_grad_enabled()):  # no autograd.Function bookkeeping
            if not stats:
                return RouterOutput(*route_topk_without_stats(router_logits, top_k, renormalize), *NO_STATS)
            return RouterOutput(*route_topk(router_logits, top_k, renormalize))
        out = RouterOutput(*RouterFunction.apply(router_logits, top_k, renormalize))
    return out if stats else RouterOutput(*out[:3], *NO_STATS)

