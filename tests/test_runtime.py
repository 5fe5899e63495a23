"""clipmoe.runtime: the one rank/world helper and the one autocast helper."""
import pytest
import torch

from clipmoe.runtime import PRECISIONS, autocast, rank_world
from tests.dist_utils import run_gloo


def test_rank_world_single_process():
    assert not torch.distributed.is_initialized()
    assert rank_world() == (0, 1)


def _ranks(rank):
    return rank_world()


def test_rank_world_in_a_gloo_group(tmp_path):
    assert run_gloo(_ranks, 2, tmp_path) == [(0, 2), (1, 2)]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_autocast(precision):
    dtype = {"fp32": None, "amp_bf16": torch.bfloat16, "amp_fp16": torch.float16}[precision]
    with autocast(precision, torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu") == (dtype is not None)
        if dtype is not None:
            assert torch.get_autocast_dtype("cpu") == dtype
    assert not torch.is_autocast_enabled("cpu")


def test_autocast_bad_precision():
    with pytest.raises(ValueError, match="precision must be one of"):
        autocast("bf16", "cpu")
