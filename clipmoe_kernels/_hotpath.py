"""Cheap forms of two lookups the launch path makes several times per forward.

At batch 1 the host time around the launches sets the layer time (bench/test_host_overhead.py), and two innocent
reads cost a sizeable share of it:
- os.environ.get of an unset variable, about 1 µs (Mapping.get catches a KeyError; set ones cost a quarter), for
  the kernel settings (_backend.py lists them) at every launch. `env_value` looks the key, encoded once, up in the
  mapping under os.environ, which os.environ's writes (and monkeypatch.setenv) keep current: the same answer, read
  at every call; `env_values` reads several at once, raw, for memo keys.
- torch.device.type, about 0.4 µs (a new string each time). `device_type` remembers it per device.
"""
import os

import torch

_encoded_keys: dict = {}
_encoded_key_tuples: dict = {}
_device_types: dict = {}


def env_value(name: str, default: str = "") -> str:
    """os.environ.get(name, default)."""
    environ = os.environ
    data = getattr(environ, "_data", None)
    if data is None:  # not CPython's os._Environ
        return environ.get(name, default)
    key = _encoded_keys.get(name)
    if key is None:
        key = _encoded_keys[name] = environ.encodekey(name)
    raw = data.get(key)
    return default if raw is None else environ.decodevalue(raw)


def env_values(names: tuple) -> tuple:
    """The values of the environment variables `names` as one tuple, None for unset ones, raw (not decoded: what
    memo keys need is only that a change shows). One lookup per name into the mapping under os.environ, where
    env_value per name cost about 1.4k instructions each (callgrind)."""
    data = getattr(os.environ, "_data", None)
    if data is None:  # not CPython's os._Environ
        return tuple(map(os.environ.get, names))
    keys = _encoded_key_tuples.get(names)
    if keys is None:
        keys = _encoded_key_tuples[names] = tuple(map(os.environ.encodekey, names))
    return tuple(map(data.get, keys))


def device_type(device: torch.device) -> str:
    """device.type ("cuda", "cpu", ...)."""
    kind = _device_types.get(device)
    if kind is None:
        kind = _device_types[device] = device.type
    return kind
