"""The launch path's cheap lookups answer exactly as the ones they replace (os.environ.get, torch.device.type)."""
import os

import pytest
import torch

from clipmoe_kernels._hotpath import device_type, env_value, env_values

NAME = "CLIPMOE_TEST_HOTPATH_VARIABLE"


@pytest.mark.parametrize("value", [None, "", "1", "BLOCK_N=128,BLOCK_K=64", "ünïcödé", "a=b=c "])
def test_env_value_follows_os_environ(monkeypatch, value):
    if value is None:
        monkeypatch.delenv(NAME, raising=False)
    else:
        monkeypatch.setenv(NAME, value)
    assert env_value(NAME) == os.environ.get(NAME, "")
    assert env_value(NAME, "fallback") == os.environ.get(NAME, "fallback")


def test_env_value_sees_every_change_in_the_process(monkeypatch):
    monkeypatch.delenv(NAME, raising=False)
    assert env_value(NAME, "unset") == "unset"  # the key's encoding is now remembered
    os.environ[NAME] = "first"
    try:
        assert env_value(NAME) == "first"
        os.environ[NAME] = "second"
        assert env_value(NAME) == "second"
    finally:
        del os.environ[NAME]
    assert env_value(NAME, "unset") == "unset"


def test_env_values_tell_every_change_apart(monkeypatch):
    names = (NAME, NAME + "_2")
    seen = []
    for first, second in [(None, None), ("", None), ("1", None), (None, "1"), ("ünïcödé", "1"), ("1", "1")]:
        for name, value in zip(names, (first, second), strict=True):
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)
        values = env_values(names)
        assert [v is None for v in values] == [os.environ.get(n) is None for n in names]
        assert [os.environ.decodevalue(v) for v in values if v is not None] == \
            [os.environ[n] for n in names if n in os.environ]
        seen.append(values)
    assert len(set(seen)) == len(seen)  # as a memo key: six settings, six keys


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1", "meta"])
def test_device_type(device):
    device = torch.device(device)
    assert device_type(device) == device.type
    assert device_type(device) == device.type  # remembered
