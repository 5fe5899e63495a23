"""The program orders the kernels use (run by their jit helpers under the interpreter) and the traffic model that
replays them (bench/traffic_model.py): permutations of the grid, grouped as documented, and modelled HBM bytes never
below the compulsory minimum."""
import pytest

pytest.importorskip("triton")

from bench import traffic_model  # noqa: E402
from clipmoe_kernels.grouped_gemm import GROUP_M, program_order, wgrad_program_order  # noqa: E402


@pytest.mark.parametrize("num_tiles,num_n", [(19, 3), (8, 5), (1, 1), (33, 16)])
def test_row_tile_order_is_a_grouped_permutation(num_tiles, num_n):
    tiles, ns = program_order(num_tiles, num_n)
    pairs = list(zip(tiles.tolist(), ns.tolist(), strict=True))
    assert sorted(pairs) == [(t, n) for t in range(num_tiles) for n in range(num_n)]
    first_group = pairs[:min(GROUP_M, num_tiles) * num_n]
    assert {t for t, _ in first_group} == set(range(min(GROUP_M, num_tiles)))  # GROUP_M tiles x every N-block
    assert [t for t, _ in first_group[:min(GROUP_M, num_tiles)]] == list(range(min(GROUP_M, num_tiles)))


@pytest.mark.parametrize("num_n,num_k", [(32, 8), (8, 32), (3, 3)])
def test_wgrad_order_is_a_permutation_expert_by_expert(num_n, num_k):
    e, n, k = (c.tolist() for c in wgrad_program_order(4, num_n, num_k))
    triples = list(zip(e, n, k, strict=True))
    assert sorted(triples) == [(a, b, c) for a in range(4) for b in range(num_n) for c in range(num_k)]
    assert e == sorted(e)  # experts one after the other
    fast = n if num_n <= num_k else k  # the operand with fewer blocks runs fastest
    assert fast[:min(num_n, num_k)] == list(range(min(num_n, num_k)))


@pytest.mark.parametrize("order", ["grouped", "tile_fastest"])
def test_model_never_reads_less_than_the_compulsory_bytes(order):
    text, kernels, ratio, bytes_ratio = traffic_model.report(traffic_model.Shape(tokens=257 * 4), order)
    assert "MODEL" in text
    for k in kernels:
        assert k.hbm_bytes >= k.min_bytes * (1 - 1e-9), k.name
        assert k.time_s > 0
    assert 0 < ratio <= 1 and bytes_ratio >= 1


def test_tile_overhead_variant_reproduces_its_calibration_point():
    """The sensitivity variant's per-tile cost is calibrated on the public K = 512 figure (0.762 of cuBLAS): a
    compute-bound kernel with a 512-element main loop must come out at that rate, a memory-bound one unchanged."""
    compute = traffic_model.KernelTraffic("k512", 1.0, 0.0, 0.0, traffic_model.CONCURRENT, 1e12, 512)
    at_peak = compute.compute_s * traffic_model.MAINLOOP
    assert at_peak / traffic_model.tile_overhead_layer_time_s([compute]) == pytest.approx(0.762, abs=0.002)
    memory = traffic_model.KernelTraffic("copy", 1.0, 4.3e12, 4.3e12, 1, 0.0)
    assert traffic_model.tile_overhead_layer_time_s([memory]) == pytest.approx(memory.time_s)


def test_mainloop_reproducing_inverts_the_modelled_time():
    """The rate read from a measured time gives that time back in the model; the model's own time gives MAINLOOP;
    a time under the memory floor has no rate."""
    kernels = traffic_model.modelled_kernels(traffic_model.Shape(tokens=257 * 4))
    modelled = sum(k.time_s for k in kernels)
    assert traffic_model.mainloop_reproducing(kernels, modelled) == pytest.approx(traffic_model.MAINLOOP, rel=1e-6)
    for seconds in (modelled * 0.5, modelled * 1.7):
        rate = traffic_model.mainloop_reproducing(kernels, seconds)
        assert traffic_model.layer_time_s(kernels, rate) == pytest.approx(seconds, rel=1e-6)
    floor = sum(k.memory_s for k in kernels)
    assert traffic_model.mainloop_reproducing(kernels, floor) is None


def test_forward_kernels_are_the_forward_pass():
    shape = traffic_model.Shape(tokens=257 * 4)
    forward = traffic_model.modelled_kernels(shape, "forward")
    assert [k.name for k in forward] == ["up forward", "down forward", "combine y"]
    assert len(traffic_model.modelled_kernels(shape)) == 8
    assert traffic_model.bound_s(shape) == pytest.approx(3 * traffic_model.bound_s(shape, "forward"))
