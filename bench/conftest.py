"""Benchmark plumbing: the --benchmark flag (pytest has none of its own) and the run's machine record."""
import subprocess

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--benchmark", action="store_true", default=False,
                     help="run the clipmoe benchmark suite in bench/ (skipped without this flag)")
    parser.addoption("--bench-scale", choices=("auto", "cpu", "gpu"), default="auto",
                     help="shape selection of bench/configs.py: cpu (fp32, minutes on 2 cores) or gpu (bf16); "
                          "auto = gpu when CUDA is available")


def bench_device(config) -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    from bench import configs
    scale = metafunc.config.getoption("--bench-scale")
    if scale == "auto":
        scale = "gpu" if torch.cuda.is_available() else "cpu"
    cases = configs.GPU_CASES if scale == "gpu" else configs.CPU_CASES
    metafunc.parametrize("case", cases, ids=[c.id for c in cases])


def pytest_collection_modifyitems(config, items):
    if config.getoption("--benchmark"):
        return
    skip = pytest.mark.skip(reason="benchmarks run only with --benchmark")
    for item in items:
        if "bench" in str(item.fspath):
            item.add_marker(skip)


def _git_sha():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def pytest_benchmark_update_machine_info(config, machine_info):
    import clipmoe
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    machine_info["torch"] = torch.__version__
    machine_info["triton"] = triton_version
    machine_info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["git_sha"] = _git_sha()
    machine_info["clipmoe_ops"] = {k: v for k, v in clipmoe.available_ops().items() if k != "extension_error"}


_NOT_TIMED = []


def pytest_runtest_logreport(report):
    """Remember benchmark tests that failed or were skipped, so the JSON (and the report) lists them."""
    if "bench" not in report.nodeid or report.passed and report.when == "call":
        return
    if report.failed or (report.skipped and report.when in ("setup", "call")):
        reason = report.longrepr[2] if report.skipped and isinstance(report.longrepr, tuple) else \
            str(getattr(report, "longreprtext", ""))[-300:]
        _NOT_TIMED.append({"test": report.nodeid.split("::")[-1], "outcome": report.outcome, "reason": reason})


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["not_timed"] = list(_NOT_TIMED)
