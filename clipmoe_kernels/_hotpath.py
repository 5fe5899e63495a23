"""Cheap forms of two lookups the launch path makes several times per forward.

At batch 1 the host time around the launches sets the layer time (bench/test_host_overhead.py), and two innocent
reads cost a sizeable share of it:
- os.environ.get of an unset variable, about 1 µs (Mapping.get catches a KeyError; set ones cost a quarter), six
  per forward for the kernel settings (_backend.py lists them). `env_value` looks the key, encoded once, up in the
  mapping under os.environ, which os.environ's writes (and monkeypatch.setenv) keep current: the same answer, read
  at every call.
- torch.device.type, about 0.4 µs (a new string each time). `device_type` remembers it per device.
"""
import os

import torch

_encoded_keys: dict = {}
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


def device_type(device: torch.device) -> str:
    """device.type ("cuda", "cpu", ...)."""
    kind = _device_types.get(device)
    if kind is None:
        kind = _device_types[device] = device.type
    return kind
