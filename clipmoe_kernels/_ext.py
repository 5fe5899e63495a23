"""Guarded import of the compiled extension clipmoe_kernels._C, and the fake (meta) implementations of its ops.

The extension is an accelerator, never a requirement: when it was not built (or fails to load), every op has a
plain-torch twin and `has_ext_op` reports False.
"""
import torch

try:
    from clipmoe_kernels import _C
    EXT_IMPORT_ERROR = None
except ImportError as exc:  # not built (CLIPMOE_SKIP_EXT_BUILD=1, a pure-Python install) or built for another torch
    _C = None
    EXT_IMPORT_ERROR = exc

# Read once at import (a build-time fact, not a device query): has_ext_op runs while torch.compile traces a forward,
# and dynamo cannot trace a call into the pybind module.
_EXT_DEVICE_TYPES = frozenset() if _C is None else frozenset(("cpu", "cuda") if _C.built_with_cuda() else ("cpu",))


# The moe_align op's C++ function without the dispatcher (routing.moe_align's eager path); None in an extension built
# before it was exposed, whose calls then take torch.ops.
moe_align_unboxed = getattr(_C, "moe_align", None)


def has_ext_op(device_type: str) -> bool:
    """Whether the extension implements its ops for tensors on `device_type` ("cpu" or "cuda")."""
    return device_type in _EXT_DEVICE_TYPES


if _C is not None:
    @torch.library.register_fake("clipmoe::moe_align")
    def _moe_align_fake(topk_ids, num_experts, block_m):
        tk = topk_ids.numel()
        num_tiles = (tk + block_m - 1) // block_m + num_experts

        def new(n):
            return topk_ids.new_empty((n,), dtype=torch.int32)
        return new(num_experts), new(num_experts + 1), new(tk), new(tk), new(num_tiles), new(num_tiles)
