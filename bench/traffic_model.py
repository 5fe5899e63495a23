"""Traffic model of the fused MoE layer's training step on an H200: HBM bytes and time per kernel (a model, not a
measurement). Run: python -m bench.traffic_model [--batch 256] [--order both]

What it does. For the ViT-L/14 MoE layer (D 1024, F 4096, E 4, top-2, bf16, balanced routing) it replays every
kernel's programs in the order the GPU issues them (program id order, in waves of CONCURRENT programs, one per SM)
through an LRU model of the L2, and counts the bytes that miss (HBM reads) plus the bytes written. The row-tile
GEMMs (grouped_up, grouped_down and their backward kernels) use the kernels' own program order:
clipmoe_kernels.grouped_gemm.program_order runs the kernels' jit helper `program_tile` under the Triton interpreter.
`--order tile_fastest` replays the previous grids (tile index fastest; wgrad: expert fastest) for comparison.

Assumptions (each one is a constant below):
  - L2: 60 MB, fully associative LRU over whole chunks: a gathered token row, a weight column block, a tile's rows.
    Within a wave every program reads all its operands (the main loop's K sweep is not interleaved in time).
  - CONCURRENT = 132 programs resident at once (one per SM; the kernels' 64-row tiles at 8 warps fit one per SM).
  - Time of a kernel = max(compute, memory): compute = waves x per-program FLOPs / (PEAK_FLOPS x MAINLOOP / 132),
    memory = modelled HBM bytes / HBM_BYTES_PER_S. PEAK_FLOPS = 790 TFLOP/s: an 8192^3 bf16 torch.matmul measured on
    the project's H200; HBM = 4.3 TB/s: a device-to-device copy measured there. MAINLOOP = 0.75: the fraction of
    that rate a Triton main loop with 64-row wgmma tiles is assumed to reach (not measured; the GPU check measures it).
  - Weight-gradient kernels stream each expert's rows in lockstep within a wave; their gathered rows are keyed by
    (expert, row block), so a token's row counts once per expert it went to (at most k times).
  - The bound: six dense bf16 GEMMs of the layer's shapes (2·TK·D·F FLOPs each) at PEAK_FLOPS; their compulsory
    bytes at 4.3 TB/s take less time than their FLOPs.
  - Sensitivity line (not the headline): the same kernels if a Triton kernel's gap to the matmul rate were a fixed
    cost per output tile (TILE_OVERHEAD_K elements of K, from the one public figure, measured at K = 512), so that
    longer main loops amortise it. Optimistic for these kernels: their epilogues do more than a plain matmul's
    (activation, dropout mask, scatter to slots, u), and their gathered row operands cannot be TMA loads.

Checked against the GPU: `python -m bench.fold_readme` puts the GPU check's measured times at this shape next to
the model's (bench/gpu_table.py, model_table), with the main-loop rate that reproduces each measured time.
"""
import argparse
import functools
import math
from collections import OrderedDict
from dataclasses import dataclass, replace

L2_BYTES = 60e6
CONCURRENT = 132
PEAK_FLOPS = 790e12
HBM_BYTES_PER_S = 4.3e12
MAINLOOP = 0.75
# The one public same-class figure: Triton's plain (non-persistent, pointer-loaded) fp16 matmul on an H100 at
# M = N = 8192, K = 512 ran at 217.5 TFLOP/s against cuBLAS's 285.4 (0.762; triton-lang/triton#5726). Read as a fixed
# cost per output tile, that is 512 * (1 / 0.762 - 1) = 160 elements of K (used only by the sensitivity line).
TILE_OVERHEAD_K = 160
BF16, FP32 = 2, 4


@dataclass(frozen=True)
class Shape:
    tokens: int
    d_model: int = 1024
    hidden: int = 4096
    num_experts: int = 4
    top_k: int = 2
    block_m: int = 128     # the kernels' BLOCK_M on a GPU at this many rows per expert (block_m_for)
    wgrad_tile: int = 128  # weight-gradient kernels: 128x128 dW tiles

    @property
    def rows(self):
        return self.tokens * self.top_k

    @property
    def rows_per_expert(self):
        return -(-self.rows // self.num_experts)


class LRU:
    """Byte-capacity LRU of chunk keys; `read` returns the bytes that missed."""

    def __init__(self, capacity):
        self.capacity, self.used, self.lines = capacity, 0, OrderedDict()

    def read(self, key, size):
        if key in self.lines:
            self.lines.move_to_end(key)
            return 0
        self.lines[key] = size
        self.used += size
        while self.used > self.capacity:
            self.used -= self.lines.popitem(last=False)[1]
        return size


@dataclass
class KernelTraffic:
    name: str
    flops: float
    hbm_bytes: float
    min_bytes: float
    programs: int
    program_flops: float
    reduction: int = 0  # elements each program's main loop reduces over (K; a weight-gradient kernel's rows)
    forward: bool = False  # part of the forward pass (else the backward's)

    @property
    def compute_s(self):
        waves = -(-self.programs // CONCURRENT)
        return waves * self.program_flops / (PEAK_FLOPS * MAINLOOP / CONCURRENT)

    @property
    def memory_s(self):
        return self.hbm_bytes / HBM_BYTES_PER_S

    @property
    def time_s(self):
        return max(self.compute_s, self.memory_s)


def tile_table(shape):
    """Per tile: (expert, first sorted row, rows) for balanced routing (sorted rows of expert e are contiguous)."""
    tiles = []
    for e in range(shape.num_experts):
        lo = e * shape.rows_per_expert
        hi = min(shape.rows, lo + shape.rows_per_expert)
        for start in range(lo, hi, shape.block_m):
            tiles.append((e, start, min(shape.block_m, hi - start)))
    return tiles


def token_of_row(shape):
    """Token of each sorted row under balanced round-robin routing: slot j of token t goes to expert (t + j) % E,
    and rows within an expert keep token order (moe_align's stable sort)."""
    per_expert = [[] for _ in range(shape.num_experts)]
    for t in range(shape.tokens):
        for j in range(shape.top_k):
            per_expert[(t + j) % shape.num_experts].append(t)
    return [t for rows in per_expert for t in rows]


def orders(num_tiles, num_n, order):
    if order == "tile_fastest":
        return [(p % num_tiles, p // num_tiles) for p in range(num_tiles * num_n)]
    from clipmoe_kernels.grouped_gemm import program_order
    tiles, ns = program_order(num_tiles, num_n)
    return list(zip(tiles.tolist(), ns.tolist(), strict=True))


def widest_block_n(launcher, block_m):
    """The widest BLOCK_N a kernel's autotune may pick at block_m-row tiles (its launcher's candidates)."""
    return max(c.BLOCK_N for c in launcher.candidates(block_m))


def row_tile_gemm(name, shape, order, n_total, k_total, a_gathered, a_bytes, extra_reads, out_bytes_per_row,
                  block_n, extra_writes=0.0):
    """A row-tile grouped GEMM: program (tile, n) reads its tile's A rows (all K; gathered token rows or sorted rows),
    the weight block W[e][n-block, :] and `extra_reads(tile, n)` chunks; writes out_bytes_per_row per row and
    column."""
    tiles = tile_table(shape)
    tokens = token_of_row(shape)
    num_n = -(-n_total // block_n)
    cache = LRU(L2_BYTES)
    hbm = 0.0
    order_list = orders(len(tiles), num_n, order)
    for wave_start in range(0, len(order_list), CONCURRENT):
        for tile, n in order_list[wave_start:wave_start + CONCURRENT]:
            e, start, rows = tiles[tile]
            if a_gathered:
                for r in range(start, start + rows):
                    hbm += cache.read(("a", tokens[r]), k_total * a_bytes)
            else:
                hbm += cache.read(("a", tile), rows * k_total * a_bytes)
            hbm += cache.read(("w", e, n), min(block_n, n_total - n * block_n) * k_total * BF16)
            for key, size in extra_reads(tile, n, rows):
                hbm += cache.read(key, size)
    width = n_total
    writes = shape.rows * width * out_bytes_per_row + extra_writes
    a_min = (shape.tokens if a_gathered else shape.rows) * k_total * a_bytes
    w_min = shape.num_experts * n_total * k_total * BF16
    extra_min = sum(size for tile in range(len(tiles)) for n in range(num_n)
                    for _, size in extra_reads(tile, n, tiles[tile][2]))
    flops = 2.0 * shape.rows * n_total * k_total
    return KernelTraffic(name, flops, hbm + writes, a_min + w_min + extra_min + writes, len(order_list),
                         2.0 * shape.block_m * block_n * k_total, k_total)


def wgrad(name, shape, order, n_total, k_total, go_gathered, in_gathered):
    """grouped_wgrad: program (e, n, k) streams expert e's rows, reading the grad-out rows' n-block and the input
    rows' k-block; writes one dW tile (bf16). Order: the kernel's `wgrad_program` (tile_fastest: the previous 3-D
    grid, e fastest, then n, then k)."""
    t = shape.wgrad_tile
    num_n, num_k = -(-n_total // t), -(-k_total // t)
    if order == "tile_fastest":
        programs = [(e, n, k) for k in range(num_k) for n in range(num_n) for e in range(shape.num_experts)]
    else:
        from clipmoe_kernels.grouped_gemm import wgrad_program_order
        programs = list(zip(*(c.tolist() for c in wgrad_program_order(shape.num_experts, num_n, num_k)), strict=True))
    steps = -(-shape.rows_per_expert // shape.block_m)
    cache = LRU(L2_BYTES)
    hbm = 0.0
    for wave_start in range(0, len(programs), CONCURRENT):
        wave = programs[wave_start:wave_start + CONCURRENT]
        go_keys = {(e, n) for e, n, _ in wave}
        in_keys = {(e, k) for e, _, k in wave}
        for step in range(steps):
            for e, n in go_keys:
                hbm += cache.read(("go", e, step, n), shape.block_m * t * BF16)
            for e, k in in_keys:
                hbm += cache.read(("in", e, step, k), shape.block_m * t * BF16)
    writes = shape.num_experts * n_total * k_total * BF16
    go_min = (shape.tokens if go_gathered else shape.rows) * n_total * BF16
    in_min = (shape.tokens if in_gathered else shape.rows) * k_total * BF16
    flops = 2.0 * shape.rows * n_total * k_total
    return KernelTraffic(name, flops, hbm + writes, go_min + in_min + writes, len(programs),
                         2.0 * t * t * shape.rows_per_expert, shape.rows_per_expert)


def combine(name, shape):
    """slot_combine: read the [TK, D] fp32 slots, write [T, D] bf16 (bandwidth-bound, no reuse)."""
    nbytes = shape.rows * shape.d_model * FP32 + shape.tokens * shape.d_model * BF16
    return KernelTraffic(name, shape.rows * shape.d_model, nbytes, nbytes, 1, 0.0)


def training_step(shape, order):
    from clipmoe_kernels import grouped_down, grouped_gemm, grouped_up
    D, F = shape.d_model, shape.hidden
    up_n = widest_block_n(grouped_up._grouped_up_fwd, shape.block_m)
    slots_n = widest_block_n(grouped_gemm._rows_to_slots, shape.block_m)
    down_bwd_n = widest_block_n(grouped_down._grouped_down_bwd, shape.block_m)

    def none(tile, n, rows):
        return ()

    def h_block(tile, n, rows):  # down_bwd reads the saved pre-activation h[rows, n-block]
        return ((("h", tile, n), rows * min(down_bwd_n, F - n * down_bwd_n) * BF16),)

    forward = [
        # x rows gathered, W1[e] -> a and h (both [TK, F] bf16)
        row_tile_gemm("up forward", shape, order, F, D, True, BF16, none, 2 * BF16, up_n),
        # a rows (sorted), W2[e] -> fp32 slots [TK, D]
        row_tile_gemm("down forward", shape, order, D, F, False, BF16, none, FP32, slots_n),
        combine("combine y", shape),
    ]
    backward = [
        # dy rows gathered, W2[e], h -> dh and u = s·act(h) [TK, F] bf16 (+ ds partials, small)
        row_tile_gemm("down backward (dh, ds, u)", shape, order, F, D, True, BF16, h_block, 2 * BF16, down_bwd_n),
        # dh rows (sorted), W1[e] -> fp32 slots [TK, D]
        row_tile_gemm("up backward (dx)", shape, order, D, F, False, BF16, none, FP32, slots_n),
        combine("combine dx", shape),
        wgrad("dW1, db1", shape, order, F, D, go_gathered=False, in_gathered=True),
        wgrad("dW2, db2 (from u)", shape, order, D, F, go_gathered=True, in_gathered=False),
    ]
    return [replace(k, forward=True) for k in forward] + backward


@functools.lru_cache(maxsize=8)
def _replayed(shape, order):
    return tuple(training_step(shape, order))


def modelled_kernels(shape, mode="forward_backward", order="grouped"):
    """training_step's kernels of one pass: `mode` "forward" (the forward's three) or "forward_backward" (all).
    The replay is cached: at the training shape it takes about 10 s, and the GPU tables ask for it per measured row."""
    return [k for k in _replayed(shape, order) if k.forward or mode == "forward_backward"]


def bound_s(shape, mode="forward_backward"):
    """The dense-GEMM bound at PEAK_FLOPS: 2 GEMMs for the forward, 6 for forward + backward (2·TK·D·F FLOPs each)."""
    gemms = 2 if mode == "forward" else 6
    return gemms * 2.0 * shape.rows * shape.d_model * shape.hidden / PEAK_FLOPS


def layer_time_s(kernels, mainloop):
    """The modelled layer time if the main loops ran at `mainloop` of the matmul rate instead of MAINLOOP."""
    return sum(max(k.compute_s * MAINLOOP / mainloop, k.memory_s) for k in kernels)


def tile_overhead_layer_time_s(kernels, k0=TILE_OVERHEAD_K):
    """Sensitivity variant, not the headline: the layer time if the gap of a Triton kernel to the matmul rate were a
    fixed cost per output tile worth `k0` reduction elements, so a main loop over K elements runs at K / (K + k0)."""
    return sum(max(k.compute_s * MAINLOOP * (k.reduction + k0) / k.reduction, k.memory_s) if k.reduction
               else k.time_s for k in kernels)


def mainloop_for_ratio(kernels, bound, goal):
    """Smallest main-loop rate (fraction of PEAK_FLOPS, to 0.01) at which bound / layer time reaches `goal`, or None
    if even 1.0 does not."""
    rate = mainloop_reproducing(kernels, bound / goal)
    if rate is None or rate > 1.0 + 1e-9:
        return None
    return max(math.ceil(rate * 100 - 1e-6), 1) / 100


def mainloop_reproducing(kernels, seconds):
    """The main-loop rate (fraction of PEAK_FLOPS) at which the modelled time of `kernels` is `seconds`: what a
    measured time says of the MAINLOOP assumption. None when the time is at or under the model's memory floor (its
    bytes at HBM_BYTES_PER_S), which no main-loop rate reaches: then the traffic side of the model is wrong."""
    floor = sum(k.memory_s for k in kernels)
    if seconds <= floor * (1 + 1e-9):
        return None
    lo, hi = 1e-6, 1.0
    while layer_time_s(kernels, hi) > seconds:  # the time falls as the rate rises, down to the floor
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if layer_time_s(kernels, mid) <= seconds else (mid, hi)
    return hi


def report(shape, order):
    kernels = modelled_kernels(shape, "forward_backward", order)
    total_bytes = sum(k.hbm_bytes for k in kernels)
    total_min = sum(k.min_bytes for k in kernels)
    total_s = sum(k.time_s for k in kernels)
    lines = [f"ViT-L/14 MoE layer, batch {shape.tokens // 257} ({shape.tokens} tokens), E {shape.num_experts}, "
             f"top-{shape.top_k}, bf16, program order: {order}  (MODEL, see bench/traffic_model.py)",
             "| kernel | HBM GB (model) | compulsory GB | ratio | TFLOP | modelled ms | bound |",
             "|---|---|---|---|---|---|---|"]
    for k in kernels:
        limit = "memory" if k.memory_s > k.compute_s else "compute"
        lines.append(f"| {k.name} | {k.hbm_bytes / 1e9:.2f} | {k.min_bytes / 1e9:.2f} | "
                     f"{k.hbm_bytes / k.min_bytes:.2f} | {k.flops / 1e12:.2f} | {k.time_s * 1e3:.3f} | {limit} |")
    lines.append(f"| **layer, forward + backward** | {total_bytes / 1e9:.2f} | {total_min / 1e9:.2f} | "
                 f"{total_bytes / total_min:.2f} | {sum(k.flops for k in kernels) / 1e12:.2f} | "
                 f"{total_s * 1e3:.3f} | |")
    ratio = bound_s(shape) / total_s
    lines.append(f"six dense bf16 GEMMs of these shapes at {PEAK_FLOPS / 1e12:.0f} TFLOP/s: "
                 f"{bound_s(shape) * 1e3:.3f} ms; modelled layer time / bound = {ratio:.2f} of the bound "
                 f"(goal >= 0.8); HBM bytes / compulsory = {total_bytes / total_min:.2f} (goal <= 1.5)")
    needed = mainloop_for_ratio(kernels, bound_s(shape), 0.8)
    lines.append(f"main-loop rate assumed: {MAINLOOP:.2f} of the matmul rate; the 0.8 goal needs "
                 + (f"{needed:.2f}" if needed is not None else "more than 1.0 (the waves' tile quantisation)")
                 + " (a GPU measures it: bench/gpu_check.py)")
    lines.append(f"sensitivity, not the headline: if the gap to the matmul rate were a fixed cost per output tile "
                 f"({TILE_OVERHEAD_K} elements of K, from the public K = 512 figure), main loops over K = "
                 f"{shape.d_model} / {shape.hidden} would run at "
                 f"{shape.d_model / (shape.d_model + TILE_OVERHEAD_K):.2f} / "
                 f"{shape.hidden / (shape.hidden + TILE_OVERHEAD_K):.2f} and the layer at "
                 f"{bound_s(shape) / tile_overhead_layer_time_s(kernels):.2f} of the bound")
    return "\n".join(lines), kernels, ratio, total_bytes / total_min


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256, help="images of 257 tokens")
    parser.add_argument("--order", choices=("grouped", "tile_fastest", "both"), default="both")
    args = parser.parse_args(argv)
    shape = Shape(tokens=257 * args.batch)
    for order in (("grouped", "tile_fastest") if args.order == "both" else (args.order,)):
        print(report(shape, order)[0])
        print()


if __name__ == "__main__":
    main()
