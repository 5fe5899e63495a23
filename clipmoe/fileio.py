"""Atomic file writes: checkpoints and results are never left half-written under their final name."""
import os
import uuid
from pathlib import Path
from typing import Callable

import torch


def atomic_write(path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` to a temporary file in `path`'s folder, then rename it to `path`: a crash never leaves a partial
    file under the final name. The temporary file is created by `write` itself, so it gets the usual umask
    permissions (tempfile.mkstemp would make it private, 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_torch_save(obj, path) -> Path:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))
