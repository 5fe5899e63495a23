"""Launch plans (_triton_utils.LaunchPlan): a launcher's second call with the same shapes replays the launch its
first call built. A replay must compute what a fresh build computes, and anything that changes a build (a pinned
config, a new autotune choice, other strides, another dropout rate) must give a new plan."""
import pytest
import torch

pytest.importorskip("triton")

from clipmoe_kernels import tuned_configs  # noqa: E402
from clipmoe_kernels._triton_utils import ENV_TRITON_CONFIG, block_m_for  # noqa: E402
from clipmoe_kernels.grouped_gemm import _ROWS_TO_SLOTS_PLANS  # noqa: E402
from clipmoe_kernels.grouped_up import _UP_PLANS, grouped_up_ref  # noqa: E402
from clipmoe_kernels.routing import moe_align  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402

pytestmark = pytest.mark.usefixtures("triton_interpreter")
ops = torch.ops.clipmoe
T, D, F, E, K = 11, 16, 32, 4, 2


@pytest.fixture
def launches(monkeypatch):
    """(kernel name, BLOCK_N) of every interpreted launch."""
    from triton.runtime.interpreter import InterpretedFunction
    seen, original = [], InterpretedFunction.run

    def run(self, *args, **kwargs):
        seen.append((self.fn.__name__, kwargs.get("BLOCK_N")))
        return original(self, *args, **kwargs)
    monkeypatch.setattr(InterpretedFunction, "run", run)
    _UP_PLANS.clear()
    _ROWS_TO_SLOTS_PLANS.clear()
    return seen


def _problem(seed):
    torch.manual_seed(seed)
    ids = torch.rand(T, E).argsort(dim=1)[:, :K]
    meta = moe_align(ids, E, block_m_for(ids.device, ids.numel(), E))
    table = (meta.sorted_to_flat, meta.expert_offsets, meta.tile_expert, meta.tile_row_start)
    w = torch.rand(T, K) + 0.1
    return table, w / w.sum(-1, keepdim=True), torch.randn(T, D), torch.randn(E, F, D) / 4, torch.randn(E, F) / 4, \
        torch.randn(E, D, F) / 4, torch.randn(E, D) / 4


def _up(table, x, w1, b1):
    return ops.grouped_up(x, w1, b1, *table, K, "gelu", True)


def test_a_replayed_launch_computes_what_a_built_one_does(launches):
    """Same shapes, new data: the second and third calls replay (one plan per launcher) and are still right."""
    for seed in range(3):
        table, w, x, w1, b1, w2, b2 = _problem(seed)
        a, h = _up(table, x, w1, b1)
        a_ref, h_ref = grouped_up_ref(x.double(), w1.double(), b1.double(), table[0], table[1], K, "gelu")
        assert_close(h, h_ref, torch.float32, "h")
        assert_close(a, a_ref, torch.float32, "a")
        y = ops.grouped_down(a, w2, b2, w, *table)
        y_ref = ops.grouped_down(a.clone(), w2.clone(), b2.clone(), w.clone(), *(t.clone() for t in table))
        assert torch.equal(y, y_ref)  # the same plan, other tensors of the same shapes
    assert len(_UP_PLANS) == 1 and len(_ROWS_TO_SLOTS_PLANS) == 1
    assert [name for name, _ in launches].count("_grouped_up_fwd_kernel") == 3


def test_a_pinned_config_and_a_new_autotune_choice_rebuild_the_plan(monkeypatch, launches):
    table, _, x, w1, b1, *_ = _problem(0)
    _up(table, x, w1, b1)
    monkeypatch.setenv(ENV_TRITON_CONFIG, "BLOCK_N=16,BLOCK_K=16,num_warps=4,num_stages=1")
    a16, _ = _up(table, x, w1, b1)
    monkeypatch.delenv(ENV_TRITON_CONFIG)
    config = {"BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1}
    tuned_configs.record(torch.device("cpu"), "another_kernel", "key", config)  # a new table generation
    try:
        a, _ = _up(table, x, w1, b1)
    finally:
        tuned_configs.forget_tuned_configs()
    widths = [block_n for name, block_n in launches if name == "_grouped_up_fwd_kernel"]
    assert widths == [64, 16, 64]  # INTERPRET_CONFIG, the pinned one, INTERPRET_CONFIG again
    assert len(_UP_PLANS) == 3
    assert_close(a16, a, torch.float32, "a")


@pytest.mark.parametrize("change", ["x strides", "dropout", "activation"])
def test_every_build_input_is_part_of_the_key(launches, change):
    table, _, x, w1, b1, *_ = _problem(0)
    seed = torch.zeros(1, dtype=torch.int64)
    ops.grouped_up(x, w1, b1, *table, K, "gelu", True)
    if change == "x strides":
        wide = torch.zeros(T, 2 * D)
        wide[:, ::2] = x
        a, h = ops.grouped_up(wide[:, ::2], w1, b1, *table, K, "gelu", True)
        a_ref, h_ref = grouped_up_ref(x.double(), w1.double(), b1.double(), table[0], table[1], K, "gelu")
        assert_close(h, h_ref, torch.float32, "h from a strided x")
    elif change == "dropout":
        ops.grouped_up(x, w1, b1, *table, K, "gelu", True, seed, 0.5)
    else:
        ops.grouped_up(x, w1, b1, *table, K, "quick_gelu", True)
    assert len(_UP_PLANS) == 2


@pytest.mark.parametrize("allow_tf32", [False, True])
def test_fp32_precision_follows_the_public_tf32_flag(allow_tf32):
    """dot_precision reads the flag without torch.backends' attribute path, and answers as that path does."""
    from clipmoe_kernels._triton_utils import dot_precision
    matmul, before = torch.backends.cuda.matmul, torch.backends.cuda.matmul.allow_tf32
    matmul.allow_tf32 = allow_tf32  # cuBLASModule's setattr (monkeypatch cannot see the attribute)
    try:
        assert matmul.allow_tf32 is allow_tf32
        assert dot_precision(torch.float32) == ("tf32" if allow_tf32 else "ieee")
        assert dot_precision(torch.float16) == dot_precision(torch.bfloat16) == "tf32"
    finally:
        matmul.allow_tf32 = before
