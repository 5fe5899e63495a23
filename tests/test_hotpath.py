"""The launch path's cheap lookups answer exactly as the ones they replace (os.environ.get, torch.device.type)."""
import os

import pytest
import torch

from clipmoe_kernels._hotpath import device_type, env_value

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


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1", "meta"])
def test_device_type(device):
    device = torch.device(device)
    assert device_type(device) == device.type
    assert device_type(device) == device.type  # remembered
