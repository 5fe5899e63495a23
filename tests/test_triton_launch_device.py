"""Triton launches a compiled kernel on the current CUDA device and its stream, whatever device the tensors are on; a
layer whose tensors are on another GPU than the current one (a model on cuda:1 in a process on cuda:0) must launch
on theirs. This machine has no GPU, so the CUDA device state is a stand-in: torch.cuda.current_device and
torch.cuda.device read and set one variable, and the kernel records which device was current when it ran."""
import types

import pytest
import torch

pytest.importorskip("triton")

from clipmoe_kernels import _triton_utils, tuned_configs  # noqa: E402
from clipmoe_kernels._triton_utils import GEMM_CONFIGS, TunedKernel, launch  # noqa: E402


@pytest.fixture
def cuda_state(monkeypatch):
    state = types.SimpleNamespace(current=0, ran_on=[])

    class Device:  # torch.cuda.device(index): that device is current inside the block
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            self.previous, state.current = state.current, self.index

        def __exit__(self, *exc):
            state.current = self.previous
    monkeypatch.setattr(torch.cuda, "current_device", lambda: state.current)
    monkeypatch.setattr(torch.cuda, "device", Device)
    return state


def test_a_launch_runs_on_the_tensors_gpu(cuda_state):
    kernel = types.SimpleNamespace(run=lambda *args, **kwargs: cuda_state.ran_on.append(cuda_state.current))
    for index in (1, 0, 1):
        launch(kernel, (1,), torch.device("cuda", index), "a tensor", BLOCK=16)
    assert cuda_state.ran_on == [1, 0, 1]
    assert cuda_state.current == 0  # the process's device is left as it was


def test_autotune_benchmarks_and_launches_on_the_tensors_gpu(cuda_state, monkeypatch):
    class Autotuner:  # triton.autotune's interface as TunedKernel uses it
        best_config = types.SimpleNamespace(kwargs=GEMM_CONFIGS[0]._asdict(), num_warps=4, num_stages=4)

        def __getitem__(self, grid):
            return lambda *args, **meta: cuda_state.ran_on.append(cuda_state.current)
    kernel = types.SimpleNamespace(arg_names=["x", "N"], fn=types.SimpleNamespace(__name__="gemm"))
    tuned = TunedKernel(kernel, GEMM_CONFIGS, key=["N"])
    monkeypatch.setattr(tuned, "resolve", lambda device, args, meta: None)  # nothing cached: autotune chooses
    monkeypatch.setattr(tuned, "autotuner", lambda block_m, layout=None: Autotuner())
    monkeypatch.setattr(tuned_configs, "record", lambda *args, **kwargs: None)
    tuned(lambda block_n, block_k: (1,), torch.device("cuda", 1), (torch.empty(2), 64), {"BLOCK_M": 64})
    assert cuda_state.ran_on == [1] and cuda_state.current == 0


def test_the_current_gpu_and_the_cpu_need_no_device_switch(cuda_state, monkeypatch):
    def refuse(index):
        raise AssertionError(f"switched to device {index}")
    monkeypatch.setattr(torch.cuda, "device", refuse)
    kernel = types.SimpleNamespace(run=lambda *args, **kwargs: cuda_state.ran_on.append(cuda_state.current))
    launch(kernel, (1,), torch.device("cuda", 0), BLOCK=16)
    with _triton_utils.on_device(torch.device("cpu")), _triton_utils.on_device(torch.device("cuda", 0)):
        pass
    assert cuda_state.ran_on == [0]
