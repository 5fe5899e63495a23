"""Top-k routing and its metadata: which expert each (token, slot) goes to, and the expert-sorted row order.

Glossary: T tokens, E experts, k top-k, TK = T·k. Flat index f = t·k + j names slot j of token t.

`topk_routing_ref`: router logits [T, E] -> fp32 softmax over all E -> top-k -> (optionally) renormalise the k
weights to sum to 1. This is CLIP-MoE's order of operations (softmax before top-k, in fp32).

`moe_align` builds, from topk_ids [T, k], a stable counting sort of the TK flat slots by expert plus a tile table for
grouped GEMMs (see RoutingMeta). It runs as the C++/CUDA op torch.ops.clipmoe.moe_align when the extension is built
for the tensor's device (an eager call on a plain tensor calls the op's C++ function without the dispatcher), and as
`moe_align_ref` (plain torch) otherwise. The CUDA op never synchronises with the host, so out-of-range ids there
trap on the device with a printed message instead of raising on the host.
"""
from typing import NamedTuple

import torch

from clipmoe_kernels._ext import has_ext_op, moe_align_unboxed
from clipmoe_kernels._hotpath import device_type

# Rows per grouped-GEMM tile when the caller does not care (the sorted-segment torch path ignores tiles).
DEFAULT_BLOCK_M = 64


class RoutingMeta(NamedTuple):
    expert_counts: torch.Tensor   # [E] int32, rows routed to each expert
    expert_offsets: torch.Tensor  # [E+1] int32, exclusive scan of expert_counts
    sorted_to_flat: torch.Tensor  # [TK] int32, sorted row r -> flat index t·k+j (ties keep token order)
    flat_to_sorted: torch.Tensor  # [TK] int32, inverse permutation of sorted_to_flat
    tile_expert: torch.Tensor     # [ceil(TK/block_m)+E] int32, expert of each tile, -1 = unused slot
    tile_row_start: torch.Tensor  # [ceil(TK/block_m)+E] int32, first sorted row of each tile, -1 = unused slot


def num_tiles_bound(tk: int, num_experts: int, block_m: int) -> int:
    """Tiles of block_m rows needed when no tile mixes experts, at most: each expert wastes under one tile."""
    return (tk + block_m - 1) // block_m + num_experts


def _check_align_args(topk_ids, num_experts, block_m):
    # The C++ op checks the same in csrc/bindings.cpp; this guards the plain-torch path.
    if not isinstance(topk_ids, torch.Tensor):
        raise TypeError(f"moe_align: topk_ids must be a tensor, got {type(topk_ids).__name__}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"moe_align: topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if topk_ids.dim() != 2:
        raise ValueError(f"moe_align: topk_ids must be 2-D [T, k], got shape {tuple(topk_ids.shape)}")
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"moe_align: num_experts must be an int >= 1, got {num_experts!r}")
    if not isinstance(block_m, int) or block_m < 1:
        raise ValueError(f"moe_align: block_m must be an int >= 1, got {block_m!r}")
    if topk_ids.numel() >= 2**31:
        raise ValueError(f"moe_align: topk_ids has {topk_ids.numel()} entries; the int32 permutation holds < 2^31")


def moe_align_ref(topk_ids: torch.Tensor, num_experts: int, block_m: int = DEFAULT_BLOCK_M) -> RoutingMeta:
    """Plain-torch twin of torch.ops.clipmoe.moe_align (same outputs, bit for bit). It checks the id range on the
    host, which synchronises on CUDA: it is the reference and the fallback, not the fast path."""
    _check_align_args(topk_ids, num_experts, block_m)
    flat = topk_ids.reshape(-1).long()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= num_experts):
        bad = int(((flat < 0) | (flat >= num_experts)).nonzero()[0])
        raise ValueError(f"moe_align: topk_ids holds {int(flat[bad])} at flat index {bad}, "
                         f"expected a value in [0, num_experts={num_experts})")
    counts = torch.bincount(flat, minlength=num_experts)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    sorted_to_flat = torch.sort(flat, stable=True).indices
    flat_to_sorted = torch.empty_like(sorted_to_flat)
    flat_to_sorted[sorted_to_flat] = torch.arange(flat.numel(), device=flat.device)

    # Slot s of the tile table belongs to the first expert whose running tile count exceeds s.
    tiles = (counts + block_m - 1) // block_m
    tile_ends = tiles.cumsum(0)
    slots = torch.arange(num_tiles_bound(flat.numel(), num_experts, block_m), device=flat.device)
    expert = torch.searchsorted(tile_ends, slots, right=True)
    valid = expert < num_experts
    e = expert.clamp(max=num_experts - 1)
    row_start = offsets[e] + (slots - (tile_ends[e] - tiles[e])) * block_m
    tile_expert = torch.where(valid, expert, -1)
    tile_row_start = torch.where(valid, row_start, -1)
    i32 = torch.int32
    return RoutingMeta(counts.to(i32), offsets.to(i32), sorted_to_flat.to(i32), flat_to_sorted.to(i32),
                       tile_expert.to(i32), tile_row_start.to(i32))


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int = DEFAULT_BLOCK_M) -> RoutingMeta:
    """Expert-sorted order and grouped-GEMM tile table of a top-k routing.

    Args:
        topk_ids: [T, k] int32 or int64, expert of slot j of token t, each in [0, num_experts).
        num_experts: E >= 1.
        block_m: rows per tile of the tile table; tiles never mix experts.
    Returns:
        RoutingMeta of int32 tensors on topk_ids' device (see its field comments). Unused tile slots hold -1.
    Raises:
        TypeError / ValueError naming the argument for a wrong dtype, shape, or an id out of range (on CUDA with the
        extension: a device-side trap with a printed message, since a host check would synchronise).
    """
    if isinstance(topk_ids, torch.Tensor) and has_ext_op(device_type(topk_ids.device)):
        if moe_align_unboxed is not None and type(topk_ids) is torch.Tensor and not torch.compiler.is_compiling():
            # the op's own function: torch.ops' boxed call costs about 13k instructions a call (callgrind)
            return RoutingMeta(*moe_align_unboxed(topk_ids, num_experts, block_m))
        return RoutingMeta(*torch.ops.clipmoe.moe_align(topk_ids, num_experts, block_m))
    return moe_align_ref(topk_ids, num_experts, block_m)


def topk_routing_ref(router_logits: torch.Tensor, top_k: int, renormalize: bool = True):
    """fp32 softmax over all experts, then top-k.

    Args:
        router_logits: [T, E], any float dtype.
        top_k: k in [1, E].
        renormalize: divide the k selected probabilities by their sum (CLIP-MoE does).
    Returns:
        probs [T, E], topk_weights [T, k], both fp32 (fp64 for fp64 logits); topk_ids [T, k] int64.
    Non-finite logits: a token whose logits hold NaN or +inf (or are all -inf) gets NaN probabilities and NaN weights,
    so its MoE output is NaN too, never a plausible-looking wrong value; its ids stay in [0, E), and other tokens are
    unaffected.
    """
    probs = torch.softmax(router_logits.to(torch.promote_types(router_logits.dtype, torch.float32)), dim=-1)
    topk_weights, topk_ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    return probs, topk_weights, topk_ids
