"""Autotuning must not leak state between candidates: triton.autotune runs every candidate config on the same
buffers before the chosen one. Emulated under the interpreter: every TunedKernel launch runs all candidates in turn,
narrow to wide, on the same arguments, so buffers sized for the narrowest BLOCK_N keep the earlier runs' contents
unless the kernels write them fully."""
import pytest
import torch

pytest.importorskip("triton")

from clipmoe_kernels import _triton_utils, grouped_gemm  # noqa: E402
from clipmoe_kernels._triton_utils import TileConfig, TunedKernel, launch  # noqa: E402
from clipmoe_kernels.expert_ffn import expert_ffn_torch  # noqa: E402
from clipmoe_kernels.expert_ffn_triton import expert_ffn_triton  # noqa: E402
from tests.moe_cases import GRAD_NAMES, expert_weights, routing, run_with_grads  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402

pytestmark = pytest.mark.usefixtures("triton_interpreter")

# Narrowest first, the "winner" last (the widest), as when autotune picks a wide tile after benchmarking narrow ones.
CANDIDATES = [TileConfig(16, 16, 4, 1), TileConfig(32, 16, 4, 1), TileConfig(64, 32, 4, 1)]


def run_every_candidate(self, grid, device, args, meta):
    for cfg in CANDIDATES:
        launch(self.kernel, grid(cfg.BLOCK_N, cfg.BLOCK_K), device, *args, **meta, BLOCK_N=cfg.BLOCK_N,
               BLOCK_K=cfg.BLOCK_K, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


@pytest.fixture
def emulated_autotune(monkeypatch):
    monkeypatch.setattr(TunedKernel, "__call__", run_every_candidate)
    # buffers sized for these candidates (what candidate_configs returns on CUDA when autotuning)
    monkeypatch.setattr(grouped_gemm, "candidate_configs", lambda device, wgrad=False: CANDIDATES)
    monkeypatch.setattr(_triton_utils, "candidate_configs", lambda device, wgrad=False: CANDIDATES)


@pytest.mark.parametrize("k", [1, 2])
def test_every_gradient_is_right_after_all_candidates_ran(emulated_autotune, k):
    T, D, F, E = 23, 24, 80, 3  # F = 80: 5 N-tiles at BLOCK_N 16, 2 at 64
    ids, w = routing(T, E, k)
    x = torch.randn(T, D)
    params = expert_weights(D, F, E)
    g = torch.randn(T, D)
    y, grads = run_with_grads(expert_ffn_triton, x, ids, w, params, "gelu", g)
    y_ref, grads_ref = run_with_grads(expert_ffn_torch, x.double(), ids, w.double(), [p.double() for p in params],
                                      "gelu", g.double())
    assert_close(y, y_ref, torch.float32, "y")
    for name, got, want in zip(GRAD_NAMES, grads, grads_ref, strict=False):
        assert_close(got, want, torch.float32, f"d{name}")
