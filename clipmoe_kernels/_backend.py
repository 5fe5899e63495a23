"""Backend choice for the expert computation, and every environment variable the package reads.

Environment variables (all prefixed CLIPMOE_):
  CLIPMOE_BACKEND          overrides backend="auto": one of BACKENDS.
  CLIPMOE_SKIP_CUDA_BUILD  (build time, setup.py) =1 builds only the CPU ops of clipmoe_kernels._C.
  CLIPMOE_SKIP_EXT_BUILD   (build time, setup.py) =1 builds no extension; torch fallbacks are used.

Nothing here queries a device: the choice depends on the device of the tensors passed in.
"""
import os

import torch

# naive: the per-expert Python loop of the official CLIP-MoE code (the benchmark baseline).
# torch: rows sorted by expert with moe_align, one GEMM per contiguous expert segment.
BACKENDS = ("auto", "torch", "naive")
ENV_BACKEND = "CLIPMOE_BACKEND"


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def select_backend(backend: str, device: torch.device) -> str:
    """Resolve "auto" (or the CLIPMOE_BACKEND override of it) to a concrete backend for tensors on `device`."""
    check_backend(backend)
    if backend == "auto":
        env = os.environ.get(ENV_BACKEND, "auto")
        if env not in BACKENDS:
            raise ValueError(f"environment variable {ENV_BACKEND} must be one of {BACKENDS}, got {env!r}")
        backend = env
    if backend == "auto":
        backend = "torch"  # the sorted-segment path is the fastest one on CPU and CUDA until the Triton kernels land
    return backend
