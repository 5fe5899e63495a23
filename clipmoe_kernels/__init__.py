"""clipmoe_kernels: the MoE compute ops of clipmoe (routing metadata, expert FFN) and their plain-torch twins.

Layering: imports only torch and its own extension `_C`; never clipmoe or open_clip; no device query at import.
"""
from clipmoe_kernels._backend import BACKENDS, ENV_BACKEND, check_backend, select_backend
from clipmoe_kernels._ext import EXT_IMPORT_ERROR, has_ext_op
from clipmoe_kernels._triton_utils import HAS_TRITON, missing_triton
from clipmoe_kernels.activation import ACTIVATIONS, gelu, gelu_tanh, get_activation, quick_gelu
from clipmoe_kernels.expert_ffn import check_expert_args, expert_ffn_naive, expert_ffn_torch
from clipmoe_kernels.routing import (
    DEFAULT_BLOCK_M,
    RoutingMeta,
    moe_align,
    moe_align_ref,
    num_tiles_bound,
    topk_routing_ref,
)

if HAS_TRITON:  # importing the kernel modules defines (does not compile) the kernels and registers clipmoe:: ops
    from clipmoe_kernels.expert_ffn_triton import expert_ffn_triton
    from clipmoe_kernels.moe_triton import moe_ffn_triton
    from clipmoe_kernels.router import topk_routing_triton
else:  # triton is optional: these raise an ImportError naming the cause when called
    expert_ffn_triton = missing_triton("expert_ffn_triton")
    moe_ffn_triton = missing_triton("moe_ffn_triton")
    topk_routing_triton = missing_triton("topk_routing_triton")


def available_ops() -> dict:
    """Which compiled ops this install has, e.g. {"extension": True, "cpu": True, "cuda": True, ...}."""
    return {
        "extension": has_ext_op("cpu"),
        "cpu": has_ext_op("cpu"),
        "cuda": has_ext_op("cuda"),
        "extension_error": None if EXT_IMPORT_ERROR is None else str(EXT_IMPORT_ERROR),
    }


__all__ = [
    "ACTIVATIONS", "BACKENDS", "DEFAULT_BLOCK_M", "ENV_BACKEND", "RoutingMeta", "available_ops", "check_backend",
    "check_expert_args", "expert_ffn_naive", "expert_ffn_torch", "expert_ffn_triton", "gelu", "gelu_tanh",
    "get_activation", "moe_align", "moe_align_ref", "moe_ffn_triton", "num_tiles_bound", "quick_gelu", "select_backend",
    "topk_routing_ref", "topk_routing_triton",
]
