"""Where the code runs: this process's rank and world size under torch.distributed, and autocast for a precision
name. One place for both, below clipmoe.data and clipmoe.train in the layering, so every layer asks the same way."""
import torch
import torch.distributed as dist

# Precision names of TrainConfig and the CLI: fp32, or autocast to bf16 / fp16 (fp16 training adds a GradScaler).
PRECISIONS = ("fp32", "amp_bf16", "amp_fp16")


def rank_world(group=None) -> tuple[int, int]:
    """(rank, world size) of this process in `group` (default: the world); (0, 1) without an initialised
    torch.distributed, so single-process code needs no special case."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def autocast(precision: str, device) -> torch.autocast:
    """torch.autocast for a precision name: disabled for "fp32", else bf16 or fp16 on `device` (a torch.device or
    its type string)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    device_type = torch.device(device).type
    if precision == "fp32":
        return torch.autocast(device_type, enabled=False)
    return torch.autocast(device_type, dtype=torch.bfloat16 if precision == "amp_bf16" else torch.float16)
