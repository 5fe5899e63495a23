"""Tile configs chosen by autotuning, cached across processes. Three sources, read in this order: the choices
autotune made in this process; the user's autotune cache, a JSON that every autotune choice on this machine is
added to (`cache_path`: $XDG_CACHE_HOME/clipmoe/tuned_configs.json, ~/.cache/... by default), so a second run
starts tuned; the JSON shipped in the package (tuned_configs.json: the GPU check writes its choices with
`save_tuned_configs`, and `python -m bench.fold_readme` merges them into it with `merge_tuned_configs`).

Format: {device name: {kernel name: {"D=1024,F=4096,ROWS_BUCKET=32768,dtype=bfloat16": {"BLOCK_N": 256,
"BLOCK_K": 64, "num_warps": 8, "num_stages": 3}}}}. The key is the kernel's autotune key (its widths and the
power-of-two bucket of rows per expert, _triton_utils.rows_bucket) and the inputs' dtype, so one entry serves every
batch size of a regime. A launch whose (device, kernel, key) is listed runs that config at once instead of
benchmarking every candidate (minutes on a cold cache). Environment variable CLIPMOE_TUNED_CONFIGS names another
JSON file to read instead of the shipped one; CLIPMOE_TUNED_CACHE names another autotune cache file, or "off" for
none. A cache entry that is unreadable or no longer one of the kernel's candidates (another package version) is
passed over and tuned again; one in the shipped (or named) table is an error.
"""
import contextlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch

from clipmoe_kernels._hotpath import env_value

ENV_TUNED_CONFIGS = "CLIPMOE_TUNED_CONFIGS"
ENV_TUNED_CACHE = "CLIPMOE_TUNED_CACHE"
SHIPPED = Path(__file__).with_name("tuned_configs.json")
_CONFIG_FIELDS = ("BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
_loaded: dict = {}   # path -> its table
_chosen: dict = {}   # choices autotune made in this process, same layout
_generation = [0]    # bumped whenever a lookup could answer differently (memo keys of the launch path include it)


def generation() -> int:
    return _generation[0]


def table_env() -> tuple[str, str]:
    """The raw CLIPMOE_TUNED_CONFIGS and CLIPMOE_TUNED_CACHE values ("" when unset): part of the launch path's memo
    keys."""
    return env_value(ENV_TUNED_CONFIGS), env_value(ENV_TUNED_CACHE)


def device_name(device: torch.device) -> str:
    """The table's device key: the CUDA device name ("NVIDIA H200"), "cpu-interpreter" for CPU tensors."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type}-interpreter"


def key_string(names, values, dtype: torch.dtype) -> str:
    """A table key: the autotune key's values and the inputs' dtype, "D=1024,F=4096,ROWS_BUCKET=32768,dtype=bfloat16"
    (a choice for 16-bit inputs can need more shared memory than a block has when the inputs are fp32)."""
    widths = ",".join(f"{n}={int(v)}" for n, v in zip(names, values, strict=True))
    return f"{widths},dtype={str(dtype).removeprefix('torch.')}"


def _read(path: Path) -> dict:
    try:
        table = json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not a valid tuned-config JSON file ({exc})") from None
    if not isinstance(table, dict):
        raise ValueError(f"{path}: expected a JSON object {{device: {{kernel: {{key: config}}}}}}")
    return table


def _table(path: Path) -> dict:
    if path not in _loaded:
        _loaded[path] = _read(path)
    return _loaded[path]


def _cache_table(path: Path) -> dict:
    """The user's autotune cache; an unreadable one is passed over with a warning (it is rewritten, merged, by the
    next autotune choice)."""
    if path not in _loaded:
        try:
            _loaded[path] = _read(path)
        except (OSError, ValueError) as exc:
            warnings.warn(f"ignoring the autotune cache: {exc}", stacklevel=3)
            _loaded[path] = {}
    return _loaded[path]


def table_path() -> Path:
    return Path(table_env()[0] or SHIPPED)


def cache_path() -> Path | None:
    """The user's autotune cache file: CLIPMOE_TUNED_CACHE, else $XDG_CACHE_HOME (default ~/.cache)
    /clipmoe/tuned_configs.json; None when CLIPMOE_TUNED_CACHE is "off"."""
    value = table_env()[1]
    if value.lower() == "off":
        return None
    if value:
        return Path(value)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "clipmoe" / "tuned_configs.json"


def lookup(device: torch.device, kernel: str, key: str, accept=lambda config: True):
    """The cached config dict for (device, kernel, key), or None: this process's autotune choices, then the user's
    autotune cache (its entries that `accept` refuses are passed over), then the table file (its entry as it is:
    one that is not a candidate is the caller's error to raise, naming the file)."""
    name = device_name(device)
    entry = _chosen.get(name, {}).get(kernel, {}).get(key)
    if entry is not None:
        return entry
    cache = cache_path()
    if cache is not None:
        entry = _cache_table(cache)
        for level in (name, kernel, key):  # a hand-edited cache may hold anything: only a whole entry counts
            entry = entry.get(level) if isinstance(entry, dict) else None
        if isinstance(entry, dict) and all(isinstance(entry.get(f), int) for f in _CONFIG_FIELDS):
            config = {f: entry[f] for f in _CONFIG_FIELDS}
            if accept(config):
                return config
    entry = _table(table_path()).get(name, {}).get(kernel, {}).get(key)
    if entry is not None:
        missing = [f for f in _CONFIG_FIELDS if f not in entry]
        if missing:
            raise ValueError(f"{table_path()}: config of {name}/{kernel}/{key} lacks {missing}")
    return entry


def record(device: torch.device, kernel: str, key: str, config: dict, cache: bool = False):
    """Remember autotune's choice for (device, kernel, key) in this process; with `cache`, also add it to the user's
    autotune cache file (what TunedKernel does after autotuning), so later processes start with it."""
    config = {f: int(config[f]) for f in _CONFIG_FIELDS}
    name = device_name(device)
    _chosen.setdefault(name, {}).setdefault(kernel, {})[key] = config
    _generation[0] += 1
    path = cache_path() if cache else None
    if path is not None:
        try:
            _merge_into_cache(path, {name: {kernel: {key: config}}})
        except OSError as exc:  # a read-only home must not stop training: the choice still holds in this process
            warnings.warn(f"could not write the autotune cache {path} ({exc}); set {ENV_TUNED_CACHE} to a writable "
                          f"file, or to off", stacklevel=2)


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on `path`.lock, where the platform has one: the ranks of a torchrun job autotune at once
    and each merges its choices into the same cache file."""
    try:
        import fcntl
    except ImportError:  # no fcntl (Windows): the atomic replace still keeps the file whole
        yield
        return
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _merge_into_cache(path: Path, entries: dict):
    """Merge `entries` into the JSON at `path` under a lock, written atomically (an unreadable file is replaced)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        try:
            table = _read(path)
        except ValueError:  # an unreadable cache is replaced (it was passed over when read)
            table = {}
        for device, kernels in entries.items():
            if not isinstance(table.get(device), dict):  # levels that are not tables were passed over too
                table[device] = {}
            for kernel, keys in kernels.items():
                if not isinstance(table[device].get(kernel), dict):
                    table[device][kernel] = {}
                table[device][kernel].update(keys)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.name, suffix=".tmp", delete=False) as f:
            try:
                f.write(json.dumps(table, indent=1, sort_keys=True) + "\n")
                f.close()
                os.replace(f.name, path)  # readers see the old file or the new one, never half of one
            except BaseException:
                os.unlink(f.name)
                raise
    _loaded[path] = table


def save_tuned_configs(path=None) -> Path:
    """Merge this process's autotune choices into the JSON at `path` (default: the file lookups read) and write it;
    returns the path. The GPU check calls it after the benchmarks, so the next process starts tuned."""
    return merge_tuned_configs(_chosen, path)


def merge_tuned_configs(entries: dict, path=None, source: str = "entries") -> Path:
    """Merge `entries` ({device: {kernel: {key: config}}}: a GPU check's -tuned_configs.json, or this process's
    choices) into the JSON at `path` (default: the file lookups read), replacing only the keys they name; returns
    the path. A config must hold exactly the four int fields (BLOCK_N, BLOCK_K, num_warps, num_stages); `source`
    names the entries in the error otherwise. An unreadable table at `path` is an error, never overwritten."""
    path = Path(path) if path is not None else table_path()
    for device, kernels in _levels(entries, source, "device"):
        for kernel, keys in _levels(kernels, f"{source}[{device!r}]", "kernel"):
            for key, config in _levels(keys, f"{source}[{device!r}][{kernel!r}]", "key"):
                if not (isinstance(config, dict) and set(config) == set(_CONFIG_FIELDS)
                        and all(type(config[f]) is int for f in _CONFIG_FIELDS)):
                    raise ValueError(f"{source}[{device!r}][{kernel!r}][{key!r}]: expected a config with the int "
                                     f"fields {list(_CONFIG_FIELDS)}, got {config!r}")
    _read(path)  # a damaged table stops the merge instead of being replaced
    _merge_into_cache(path, entries)
    _generation[0] += 1
    return path


def _levels(table, where: str, level: str):
    if not isinstance(table, dict):
        raise ValueError(f"{where}: expected a JSON object of {level} entries, got {type(table).__name__}")
    return table.items()


def forget_tuned_configs():
    """Drop this process's autotune choices and the files read so far (the next lookup rereads the JSON)."""
    _chosen.clear()
    _loaded.clear()
    _generation[0] += 1
