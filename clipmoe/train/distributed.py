"""torch.distributed set-up for torchrun: nccl on GPUs, gloo on CPU; a no-op in a single process."""
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from clipmoe.runtime import rank_world


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


# How long a collective waits for the other ranks before it fails (gloo's own default is 30 minutes): a rank that
# died or stopped then ends the run with an error instead of a silent hang.
DEFAULT_TIMEOUT_SECONDS = 600.0


def init_distributed(device: str = "auto", timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS) -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), if any;
    `timeout_seconds` bounds every collective's wait for the other ranks."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device(device)  # cpu, or one chosen GPU (cuda:N) of a single-process run
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                timeout=timedelta(seconds=timeout_seconds))
    if dist.is_initialized():
        rank, world_size = rank_world()
    return DistInfo(rank, world_size, local_rank, dev)


def barrier(info: DistInfo):
    if info.enabled:
        dist.barrier()


def all_gather_rows(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Concatenate every rank's rows, in rank order (rows per rank may differ)."""
    if not info.enabled:
        return tensor
    sizes = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(info.world_size)]
    dist.all_gather(sizes, torch.tensor([tensor.shape[0]], device=tensor.device))
    longest = int(max(s.item() for s in sizes))
    padded = tensor.new_zeros((longest,) + tuple(tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(info.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes, strict=True)])


def sum_over_ranks(counts: list[int], info: DistInfo) -> list[int]:
    """Each count summed over the ranks (a collective: every rank calls it), e.g. what each rank's reads counted."""
    if not info.enabled or not counts:
        return list(counts)
    total = torch.tensor(counts, dtype=torch.long, device=info.device)
    dist.all_reduce(total)
    return total.tolist()
