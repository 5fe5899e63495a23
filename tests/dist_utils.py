"""The harness of the multi-process tests: real torch.distributed process groups (gloo on CPU) on this machine."""
import datetime
import os
import socket
from pathlib import Path

import torch


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_rank(rank, fn, world_size, port, out_dir, args):
    import torch.distributed as dist
    torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.save(fn(rank, *args), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_gloo(fn, world_size: int, out_dir, *args) -> list:
    """Run `fn(rank, *args)` in `world_size` spawned processes joined in one gloo group; return what each rank
    returned, in rank order (passed back through `out_dir` with torch.save, so tensors, dicts, lists and numbers).
    `fn` must be a module-level function (spawn pickles it by name)."""
    import torch.multiprocessing as mp
    mp.spawn(_gloo_rank, args=(fn, world_size, free_port(), str(out_dir), args), nprocs=world_size, join=True)
    return [torch.load(Path(out_dir) / f"rank{rank}.pt") for rank in range(world_size)]
