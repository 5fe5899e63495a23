"""Shared plumbing of the Triton kernels: guarded import, device/interpreter checks, tile sizes and configs.

Importing this module never imports a kernel, never touches a GPU and works without triton installed
(`HAS_TRITON` is then False and `TRITON_IMPORT_ERROR` says why).

Environment variables read here (at call time, not import time):
  CLIPMOE_TRITON_CONFIG  pins one tile config for every grouped-GEMM kernel instead of autotuning it, e.g.
                         "BLOCK_N=128,BLOCK_K=64,num_warps=8,num_stages=3" (keys: BLOCK_N, BLOCK_K, num_warps,
                         num_stages; omitted keys keep the default of the fixed config below). Useful to skip the
                         one-time autotune (minutes on a cold cache), to reproduce a result, or when autotune
                         benchmarking runs out of memory. Under the interpreter it replaces INTERPRET_CONFIG.
  TRITON_INTERPRET       (Triton's own) =1 runs the kernels on CPU tensors through the Triton interpreter; it is the
                         only way CPU tensors reach these kernels (tests).
"""
import os
from typing import Dict, List, NamedTuple

import torch

try:
    import triton  # noqa: F401  (importing triton does not initialise CUDA)
    HAS_TRITON = True
    TRITON_IMPORT_ERROR = None
except ImportError as exc:  # triton is optional: the torch backends work without it
    HAS_TRITON = False
    TRITON_IMPORT_ERROR = exc

ENV_TRITON_CONFIG = "CLIPMOE_TRITON_CONFIG"

# Rows per tile of the grouped GEMMs. It is also the block_m of the moe_align tile table, so it is a fixed constant
# and never autotuned (a tile table built for one BLOCK_M is wrong for another). 64 on GPU: with 400-65K rows per
# expert in our CLIP shapes (kernel-design.md §0) at most E partial tiles are wasted, and BLOCK_M=64 with BLOCK_N up
# to 256 keeps the accumulator within the register file at 4-8 warps. 16 in the interpreter: test shapes have tens
# of tokens, so 16 gives several tiles per expert and partial tiles (the logic under test) on tiny inputs.
BLOCK_M_GPU = 64
BLOCK_M_INTERPRET = 16


class TileConfig(NamedTuple):
    BLOCK_N: int
    BLOCK_K: int
    num_warps: int = 4
    num_stages: int = 3


# Autotune candidates on CUDA (BLOCK_M fixed above). Small on purpose: each config costs a compile per dtype and
# activation (seconds) and a benchmark per autotune key. Chosen for Hopper with 16-bit inputs: 64x128 / 64x256
# output tiles are the usual sweet spot for BLOCK_M=64; the 64x64 entry covers narrow D (e.g. the 97/47 test
# widths) and fp32 inputs, whose wide tiles exceed shared memory (autotune then scores those configs as inf).
GEMM_CONFIGS = [
    TileConfig(64, 32, 4, 4),
    TileConfig(128, 32, 4, 4),
    TileConfig(128, 64, 8, 3),
    TileConfig(256, 64, 8, 3),
]
# Weight-gradient kernels own a [BLOCK_N, BLOCK_K] tile of dW[e] and loop over the expert's rows; square-ish tiles
# balance the reuse of both operands.
WGRAD_CONFIGS = [
    TileConfig(64, 64, 4, 3),
    TileConfig(128, 64, 8, 3),
    TileConfig(64, 128, 8, 3),
    TileConfig(128, 128, 8, 3),
]
# Under the interpreter each program is a numpy call sequence, so time scales with the number of programs and loop
# trips, not with the tile size: a 128^3 fp32 matmul took 0.80 s with 16^3 tiles and 0.03 s with 64^3 tiles.
INTERPRET_CONFIG = TileConfig(64, 64, 4, 1)


def is_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def require_triton(where: str):
    if not HAS_TRITON:
        raise ImportError(f"{where} needs triton, which failed to import: {TRITON_IMPORT_ERROR}")


def check_triton_device(where: str, tensor: torch.Tensor):
    """CUDA tensors run compiled kernels; CPU tensors only under TRITON_INTERPRET=1 (tests)."""
    require_triton(where)
    if tensor.device.type == "cuda":
        return
    if tensor.device.type == "cpu":
        if is_interpreter():
            return
        raise ValueError(f"{where}: the Triton kernels got CPU tensors but TRITON_INTERPRET is not '1'; run on CUDA "
                         f"tensors, set TRITON_INTERPRET=1 (slow, for tests), or use the 'torch' backend")
    raise ValueError(f"{where}: the Triton kernels support CUDA tensors (and CPU under TRITON_INTERPRET=1), "
                     f"got a tensor on {tensor.device}")


def uses_interpreter(device: torch.device) -> bool:
    return device.type == "cpu"


def block_m_for(device: torch.device) -> int:
    """BLOCK_M of the grouped GEMMs (and of the tile table they read) for tensors on `device`."""
    return BLOCK_M_INTERPRET if uses_interpreter(device) else BLOCK_M_GPU


_CONFIG_KEYS = ("BLOCK_N", "BLOCK_K", "num_warps", "num_stages")


def pinned_config():
    """The TileConfig of CLIPMOE_TRITON_CONFIG, or None when it is unset or empty."""
    raw = os.environ.get(ENV_TRITON_CONFIG, "").strip()
    if not raw:
        return None
    values: Dict[str, int] = {}
    for part in raw.split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in _CONFIG_KEYS:
            raise ValueError(f"{ENV_TRITON_CONFIG}={raw!r}: expected comma-separated KEY=INT with KEY in "
                             f"{_CONFIG_KEYS}, e.g. 'BLOCK_N=128,BLOCK_K=64,num_warps=8,num_stages=3'")
        try:
            values[key] = int(value)
        except ValueError:
            raise ValueError(f"{ENV_TRITON_CONFIG}={raw!r}: {key} must be an integer, got {value!r}") from None
    for key in ("BLOCK_N", "BLOCK_K"):
        v = values.get(key)
        if v is not None and (v < 16 or v & (v - 1)):
            raise ValueError(f"{ENV_TRITON_CONFIG}={raw!r}: {key} must be a power of two >= 16 (tl.dot), got {v}")
    base = INTERPRET_CONFIG if is_interpreter() else GEMM_CONFIGS[0]
    return base._replace(**values)


def fixed_config(device: torch.device):
    """The config to launch with when not autotuning: the pinned one, else INTERPRET_CONFIG for CPU tensors, else
    None (autotune on CUDA)."""
    pinned = pinned_config()
    if pinned is not None:
        return pinned
    return INTERPRET_CONFIG if uses_interpreter(device) else None


def candidate_configs(device: torch.device, wgrad: bool = False) -> List[TileConfig]:
    """Every config a launch on `device` may use (sizes buffers whose shape depends on BLOCK_N)."""
    fixed = fixed_config(device)
    if fixed is not None:
        return [fixed]
    return WGRAD_CONFIGS if wgrad else GEMM_CONFIGS


def autotune_configs(configs):
    import triton
    return [triton.Config({"BLOCK_N": c.BLOCK_N, "BLOCK_K": c.BLOCK_K}, num_warps=c.num_warps,
                          num_stages=c.num_stages) for c in configs]


def rows_bucket(total_rows: int, num_experts: int) -> int:
    """Autotune key part: rows per expert if balanced, rounded up to a power of two and capped, so that a new batch
    size re-tunes only when it changes the regime (tens vs thousands of rows per expert), not on every value."""
    per_expert = max(1, -(-total_rows // num_experts))
    return min(1 << (per_expert - 1).bit_length(), 1 << 16)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input_precision: fp32 inputs follow torch.backends.cuda.matmul.allow_tf32 (the tests turn it off, so
    fp32 results are real fp32 GEMMs); 16-bit inputs are exact products either way."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
