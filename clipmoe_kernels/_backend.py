"""Backend choice for the expert computation, and every environment variable the package reads.

Environment variables (all prefixed CLIPMOE_):
  CLIPMOE_BACKEND          overrides backend="auto": one of BACKENDS.
  CLIPMOE_TRITON_CONFIG    pins one tile config for every grouped-GEMM kernel instead of autotuning, e.g.
                           "BLOCK_N=128,BLOCK_K=64,num_warps=8,num_stages=3" (read at each call; _triton_utils.py).
  CLIPMOE_TUNED_CONFIGS    a JSON of autotuned tile configs to read instead of the shipped one (tuned_configs.py).
  CLIPMOE_TUNED_CACHE      the user's autotune cache file (default $XDG_CACHE_HOME or ~/.cache, then
                           clipmoe/tuned_configs.json), or "off" (tuned_configs.py).
  CLIPMOE_TRITON_TMA       "auto" (default), "1" or "0": TMA tensor-descriptor weight loads (_triton_utils.py).
  CLIPMOE_SKIP_CUDA_BUILD  (build time, setup.py) =1 builds only the CPU ops of clipmoe_kernels._C.
  CLIPMOE_SKIP_EXT_BUILD   (build time, setup.py) =1 builds no extension; torch fallbacks are used.

Nothing here queries a device: the choice depends on the device of the tensors passed in.
"""

import torch

from clipmoe_kernels._hotpath import device_type, env_value
from clipmoe_kernels._triton_utils import HAS_TRITON

# naive: the per-expert Python loop of the official CLIP-MoE code (the benchmark baseline).
# torch: rows sorted by expert with moe_align, one GEMM per contiguous expert segment.
# triton: fused Triton grouped GEMMs (expert_ffn_triton); CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.
BACKENDS = ("auto", "torch", "naive", "triton")
ENV_BACKEND = "CLIPMOE_BACKEND"


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def select_backend(backend: str, device: torch.device) -> str:
    """Resolve "auto" (or the CLIPMOE_BACKEND override of it) to a concrete backend for tensors on `device`."""
    check_backend(backend)
    if backend == "auto":
        env = env_value(ENV_BACKEND, "auto")
        if env not in BACKENDS:
            raise ValueError(f"environment variable {ENV_BACKEND} must be one of {BACKENDS}, got {env!r}")
        backend = env
    kind = device_type(device)
    if backend == "auto":
        # CUDA: the fused Triton kernels when triton imports; CPU: the sorted-segment torch path.
        backend = "triton" if kind == "cuda" and HAS_TRITON else "torch"
    if backend == "triton" and kind not in ("cuda", "cpu"):
        raise ValueError(f"backend 'triton' runs on CUDA tensors (and CPU ones under TRITON_INTERPRET=1), got tensors "
                         f"on {device}; use backend 'torch'")
    if backend == "triton" and kind == "cpu" and env_value("TRITON_INTERPRET", "0") != "1":
        raise ValueError("backend 'triton' got CPU tensors: on CPU the Triton kernels run only in the Triton "
                         "interpreter (slow, for tests), which needs TRITON_INTERPRET=1; use backend 'torch' on CPU")
    return backend
