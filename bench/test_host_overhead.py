"""Host time of one MoEFFN(backend="triton") forward at batch 1, launches and router GEMM stubbed (setup:
bench/host_overhead.py).

A CPU timer (pytest-benchmark, perf_counter) around the stubbed forward; extra_info reports the minimum and the
median per forward. Goal (issue 10): <= 60 µs per layer forward. Run: pytest bench/test_host_overhead.py
--benchmark. The same forward counted in instructions, which the machine's load does not move: python -m
bench.host_overhead.
"""
import pytest
import torch

pytest.importorskip("triton")

from bench.host_overhead import CASES, GOAL_US, stubbed_forward, stubbed_launches  # noqa: E402


@pytest.mark.parametrize("tower,mode", CASES)
def test_host_overhead_batch1(benchmark, tower, mode):
    with stubbed_launches(), torch.set_grad_enabled(mode == "training_forward"):  # around the timing loop
        forward = stubbed_forward(tower, mode)
        for _ in range(10):
            forward()
        benchmark.pedantic(forward, rounds=300, iterations=10, warmup_rounds=5)
    stats = benchmark.stats.stats
    benchmark.extra_info.update({
        "goal_us": GOAL_US, "host_us_min": stats.min * 1e6, "host_us_median": stats.median * 1e6,
        "torch_threads": 1,
        "note": "launches and router GEMM stubbed; fp32 CPU tensors; tile configs from the tuned table; moe_align "
                "computes on the CPU",
    })
