"""Host time of one MoEFFN(backend="triton") forward at batch 1, launches stubbed (setup: bench/host_overhead.py).

A CPU timer (pytest-benchmark, perf_counter) around the stubbed forward; the router GEMM, which computes on the CPU
here but is an asynchronous launch on a GPU, is timed too (before and after the layer) and extra_info reports the
layer's time without it. Goal (issue 10): <= 60 µs per layer forward. Run: pytest bench/test_host_overhead.py
--benchmark. The same forward counted in instructions, which the machine's load does not move: python -m
bench.host_overhead.
"""
import time

import pytest
import torch

pytest.importorskip("triton")

from bench.host_overhead import CASES, GOAL_US, stubbed_forward, stubbed_launches  # noqa: E402


def _per_call_us(fn, calls=200, repeats=5):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


@pytest.mark.parametrize("tower,mode", CASES)
def test_host_overhead_batch1(benchmark, tower, mode):
    with stubbed_launches(), torch.set_grad_enabled(mode == "training_forward"):  # around the timing loop
        forward, router = stubbed_forward(tower, mode)
        for _ in range(10):
            forward()
        before = _per_call_us(router, calls=50, repeats=10)
        benchmark.pedantic(forward, rounds=20, iterations=50, warmup_rounds=2)
        router_us = min(before, _per_call_us(router, calls=50, repeats=10))  # a busy spell inflates one side only
    layer_us = benchmark.stats.stats.min * 1e6
    benchmark.extra_info.update({
        "goal_us": GOAL_US, "layer_us_min": layer_us, "router_gemm_cpu_us": router_us,
        "host_us_without_router_gemm": layer_us - router_us, "torch_threads": 1,
        "note": "launches stubbed; fp32 CPU tensors; tile configs from the tuned table; router GEMM and moe_align "
                "compute on the CPU",
    })
