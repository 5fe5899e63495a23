"""Routing metadata (moe_align): invariants on random and adversarial routings, C++ vs reference, bad input."""
import pytest
import torch

from clipmoe_kernels import RoutingMeta, moe_align, moe_align_ref, num_tiles_bound
from clipmoe_kernels._ext import has_ext_op

IMPLS = {"ref": moe_align_ref}
if has_ext_op("cpu"):
    IMPLS["ext"] = lambda ids, e, bm: RoutingMeta(*torch.ops.clipmoe.moe_align(ids, e, bm))


def _routing(case: str, T: int, k: int, E: int) -> torch.Tensor:
    """topk_ids [T, k] for a named routing case; rows of distinct experts as a real top-k gives."""
    if case == "random":
        return torch.stack([torch.randperm(E)[:k] for _ in range(T)]) if T else torch.empty(0, k, dtype=torch.long)
    if case == "all_to_one":  # every slot on expert E-1 (k=1 so a token's slots stay distinct)
        return torch.full((T, k), E - 1)
    if case == "empty_experts":  # only experts 0 and 2 receive rows
        return torch.stack([torch.tensor([0, 2])[torch.randperm(2)[:k]] for _ in range(T)])
    raise ValueError(case)


ROUTINGS = [
    # (case, T, k, E, block_m)
    ("random", 37, 2, 4, 8),      # T*k not a multiple of the tile
    ("random", 1, 1, 1, 16),      # T=1, E=1, k=1
    ("random", 0, 2, 4, 8),       # T=0: no rows, all tiles unused
    ("random", 50, 3, 3, 4),      # k=E
    ("random", 64, 2, 7, 16),     # prime E, T*k a multiple of the tile
    ("random", 300, 2, 13, 64),   # prime E, more rows than one CUDA chunk (256)
    ("random", 9, 2, 8, 1),       # block_m=1: one tile per row
    ("all_to_one", 40, 1, 4, 8),  # all rows on the last expert, the others empty
    ("empty_experts", 33, 2, 5, 4),  # experts 1, 3, 4 empty
]


def check_invariants(meta: RoutingMeta, topk_ids: torch.Tensor, num_experts: int, block_m: int):
    flat = topk_ids.reshape(-1).long()
    tk = flat.numel()
    assert all(t.dtype == torch.int32 for t in meta)
    counts, offsets = meta.expert_counts.long(), meta.expert_offsets.long()
    s2f, f2s = meta.sorted_to_flat.long(), meta.flat_to_sorted.long()
    assert torch.equal(counts, torch.bincount(flat, minlength=num_experts))
    assert offsets[0] == 0 and torch.equal(offsets[1:], counts.cumsum(0))
    # A permutation, its inverse, sorted by expert, stable (ties in increasing flat index = token order).
    assert torch.equal(torch.sort(s2f).values, torch.arange(tk))
    assert torch.equal(s2f[f2s], torch.arange(tk)) and torch.equal(f2s[s2f], torch.arange(tk))
    sorted_ids = flat[s2f]
    for e in range(num_experts):
        seg = s2f[offsets[e]:offsets[e + 1]]
        assert torch.all(sorted_ids[offsets[e]:offsets[e + 1]] == e)
        assert torch.all(seg[1:] > seg[:-1]), "ties must keep token order"
    # Tile table: bound size, valid tiles first, every row covered exactly once, no tile mixes experts.
    num_tiles = num_tiles_bound(tk, num_experts, block_m)
    assert meta.tile_expert.numel() == num_tiles == meta.tile_row_start.numel()
    te, tr = meta.tile_expert.long(), meta.tile_row_start.long()
    valid = te >= 0
    n_valid = int(valid.sum())
    assert torch.all(valid[:n_valid]) and not torch.any(valid[n_valid:])
    assert torch.all(tr[n_valid:] == -1)
    covered = torch.zeros(tk, dtype=torch.long)
    for e, start in zip(te[:n_valid].tolist(), tr[:n_valid].tolist(), strict=True):
        end = min(start + block_m, int(offsets[e + 1]))
        assert offsets[e] <= start < end, "a tile starts outside its expert's segment"
        covered[start:end] += 1
    assert torch.all(covered == 1)
    assert n_valid == int(((counts + block_m - 1) // block_m).sum())


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("case,T,k,E,block_m", ROUTINGS)
def test_invariants(impl, index_dtype, case, T, k, E, block_m):
    topk_ids = _routing(case, T, k, E).to(index_dtype)
    check_invariants(IMPLS[impl](topk_ids, E, block_m), topk_ids, E, block_m)


@pytest.mark.skipif(not has_ext_op("cpu"), reason="extension not built")
@pytest.mark.parametrize("case,T,k,E,block_m", ROUTINGS)
def test_ext_equals_reference(case, T, k, E, block_m):
    topk_ids = _routing(case, T, k, E)
    for got, want, name in zip(IMPLS["ext"](topk_ids, E, block_m), moe_align_ref(topk_ids, E, block_m),
                               RoutingMeta._fields, strict=True):
        assert torch.equal(got, want), name


def test_dispatch_uses_extension_when_built():
    topk_ids = _routing("random", 20, 2, 4)
    meta = moe_align(topk_ids, 4, 8)
    assert isinstance(meta, RoutingMeta)
    assert all(torch.equal(a, b) for a, b in zip(meta, moe_align_ref(topk_ids, 4, 8), strict=True))


@pytest.mark.skipif(not has_ext_op("cpu"), reason="extension not built")
def test_eager_calls_skip_the_dispatcher(monkeypatch):
    """Eager moe_align on a plain tensor calls the op's C++ function directly (the same outputs and errors as
    torch.ops.clipmoe.moe_align); the registered op is not called."""
    from clipmoe_kernels import routing
    assert routing.moe_align_unboxed is not None  # built with the unboxed entry point
    topk_ids = _routing("random", 33, 2, 4)

    class NoOps:
        def __getattr__(self, name):
            raise AssertionError(f"torch.ops.{name} called in eager mode")
    monkeypatch.setattr(routing.torch, "ops", NoOps())
    for got, want in zip(moe_align(topk_ids, 4, 8), moe_align_ref(topk_ids, 4, 8), strict=True):
        assert torch.equal(got, want) and got.dtype == torch.int32
    with pytest.raises(ValueError, match="topk_ids holds 4 at flat index 1"):
        moe_align(torch.tensor([[0, 4]]), 4, 8)
    with pytest.raises(TypeError, match="topk_ids must be int32 or int64"):
        moe_align(torch.tensor([[0.0, 1.0]]), 4, 8)


def test_non_contiguous_ids():
    base = _routing("random", 30, 3, 5)
    topk_ids = base[:, ::2]  # a non-contiguous view: slots 0 and 2
    assert not topk_ids.is_contiguous()
    for impl in IMPLS.values():
        check_invariants(impl(topk_ids, 5, 4), topk_ids, 5, 4)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("args,err,words", [
    ((torch.tensor([[0, 4]]), 4, 8), ValueError, "topk_ids holds 4"),           # id == E
    ((torch.tensor([[-1, 0]]), 4, 8), ValueError, "topk_ids holds -1"),         # negative id
    ((torch.tensor([[0.0, 1.0]]), 4, 8), TypeError, "topk_ids must be int32 or int64"),
    ((torch.tensor([0, 1]), 4, 8), ValueError, "topk_ids must be 2-D"),
    ((torch.tensor([[0, 1]]), 0, 8), ValueError, "num_experts"),
    ((torch.tensor([[0, 1]]), 4, 0), ValueError, "block_m"),
])
def test_bad_input(impl, args, err, words):
    with pytest.raises(err, match=words):
        IMPLS[impl](*args)


@pytest.mark.skipif(not has_ext_op("cpu"), reason="extension not built")
def test_fake_impl_and_compile():
    topk_ids = _routing("random", 21, 2, 4)
    torch.library.opcheck(torch.ops.clipmoe.moe_align.default, (topk_ids, 4, 8))

    def counts_and_tiles(ids):
        meta = moe_align(ids, 4, 8)
        return meta.expert_counts * 2, meta.tile_expert

    compiled = torch.compile(counts_and_tiles, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(topk_ids), counts_and_tiles(topk_ids), strict=True):
        assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("case,T,k,E,block_m", ROUTINGS + [("random", 70000, 2, 8, 64)])
def test_cuda_equals_reference(case, T, k, E, block_m):
    topk_ids = _routing(case, T, k, E)
    got = moe_align(topk_ids.cuda(), E, block_m)
    for g, w, name in zip(got, moe_align_ref(topk_ids, E, block_m), RoutingMeta._fields, strict=True):
        assert torch.equal(g.cpu(), w), name


@pytest.mark.gpu
def test_cuda_graph_capture():
    topk_ids = _routing("random", 1000, 2, 4).cuda()
    moe_align(topk_ids, 4, 64)  # warm-up outside the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        meta = moe_align(topk_ids, 4, 64)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(meta.sorted_to_flat.cpu(), moe_align_ref(topk_ids.cpu(), 4, 64).sorted_to_flat)


def test_package_works_without_extension():
    """With clipmoe_kernels._C unavailable, everything imports and runs on the plain-torch twins."""
    import subprocess
    import sys
    code = (
        "import sys; sys.modules['clipmoe_kernels._C'] = None\n"  # makes `from clipmoe_kernels import _C` fail
        "import torch, clipmoe\n"
        "ops = clipmoe.available_ops(); assert ops['extension'] is False and ops['extension_error'], ops\n"
        "from clipmoe_kernels import moe_align, moe_align_ref\n"
        "ids = torch.randint(0, 4, (9, 2))\n"
        "assert all(torch.equal(a, b) for a, b in zip(moe_align(ids, 4, 4), moe_align_ref(ids, 4, 4)))\n"
        "y = clipmoe.MoEFFN(8, 16, 4, 2)(torch.randn(5, 8)); assert y.shape == (5, 8)\n"
        "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
