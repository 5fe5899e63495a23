"""Tile configs chosen by autotuning, cached across processes: a JSON shipped in the package (tuned_configs.json,
written by the GPU check with `save_tuned_configs`) and the choices autotune makes in this process.

Format: {device name: {kernel name: {"D=1024,F=4096,ROWS_BUCKET=32768": {"BLOCK_N": 256, "BLOCK_K": 64,
"num_warps": 8, "num_stages": 3}}}}. The key is the kernel's autotune key (its widths and the power-of-two bucket
of rows per expert, _triton_utils.rows_bucket), so one entry serves every batch size of a regime. A launch whose
(device, kernel, key) is listed runs that config at once instead of benchmarking every candidate (minutes on a
cold cache). Environment variable CLIPMOE_TUNED_CONFIGS names another JSON file to read instead of the shipped one.
"""
import json
import os
from pathlib import Path

import torch

ENV_TUNED_CONFIGS = "CLIPMOE_TUNED_CONFIGS"
SHIPPED = Path(__file__).with_name("tuned_configs.json")
_CONFIG_FIELDS = ("BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
_loaded: dict = {}   # path -> its table
_chosen: dict = {}   # choices autotune made in this process, same layout
_generation = [0]    # bumped whenever a lookup could answer differently (memo keys of the launch path include it)


def generation() -> int:
    return _generation[0]


def table_env() -> str:
    """The raw CLIPMOE_TUNED_CONFIGS value ("" when unset): part of the launch path's memo keys."""
    return os.environ.get(ENV_TUNED_CONFIGS, "")


def device_name(device: torch.device) -> str:
    """The table's device key: the CUDA device name ("NVIDIA H200"), "cpu-interpreter" for CPU tensors."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type}-interpreter"


def key_string(names, values) -> str:
    return ",".join(f"{n}={int(v)}" for n, v in zip(names, values, strict=True))


def _table(path: Path) -> dict:
    if path not in _loaded:
        try:
            table = json.loads(path.read_text()) if path.exists() else {}
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not a valid tuned-config JSON file ({exc})") from None
        if not isinstance(table, dict):
            raise ValueError(f"{path}: expected a JSON object {{device: {{kernel: {{key: config}}}}}}")
        _loaded[path] = table
    return _loaded[path]


def table_path() -> Path:
    return Path(table_env() or SHIPPED)


def lookup(device: torch.device, kernel: str, key: str):
    """The cached config dict for (device, kernel, key), or None: this process's autotune choices first, then the
    JSON file."""
    name = device_name(device)
    for table in (_chosen, _table(table_path())):
        entry = table.get(name, {}).get(kernel, {}).get(key)
        if entry is not None:
            missing = [f for f in _CONFIG_FIELDS if f not in entry]
            if missing:
                raise ValueError(f"{table_path()}: config of {name}/{kernel}/{key} lacks {missing}")
            return entry
    return None


def record(device: torch.device, kernel: str, key: str, config: dict):
    """Remember autotune's choice for (device, kernel, key) in this process."""
    _chosen.setdefault(device_name(device), {}).setdefault(kernel, {})[key] = {f: int(config[f]) for f in
                                                                               _CONFIG_FIELDS}
    _generation[0] += 1


def save_tuned_configs(path=None) -> Path:
    """Merge this process's autotune choices into the JSON at `path` (default: the file lookups read) and write it;
    returns the path. The GPU check calls it after the benchmarks, so the next process starts tuned."""
    path = Path(path) if path is not None else table_path()
    table = json.loads(path.read_text()) if path.exists() else {}
    for device, kernels in _chosen.items():
        for kernel, keys in kernels.items():
            table.setdefault(device, {}).setdefault(kernel, {}).update(keys)
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    _loaded.pop(path, None)
    _generation[0] += 1
    return path


def forget_tuned_configs():
    """Drop this process's autotune choices and the files read so far (the next lookup rereads the JSON)."""
    _chosen.clear()
    _loaded.clear()
    _generation[0] += 1
