"""`clipmoe demo` at a micro scale: every method trains, is evaluated, and the table and files are written."""
import json

import pytest

from clipmoe.cli.demo import (
    METHODS,
    DemoScale,
    parameter_counts,
    results_table,
    run_demo,
)
from clipmoe.models import create_model
from clipmoe.upcycle import upcycle

MICRO = DemoScale(train_samples=256, test_samples=64, pretrain_steps=4, batch_size=32, finetune_steps=8)


@pytest.mark.slow
def test_demo_micro_run(tmp_path):
    results = run_demo(MICRO, tmp_path, seed=0)
    assert list(results["methods"]) == list(METHODS)
    for method, m in results["methods"].items():
        assert set(m["retrieval"]) >= {"i2t_R@1", "i2t_R@10", "t2i_R@5"}
        assert set(m["zero_shot"]) == {"colour", "size", "shape", "texture", "count", "position"}
        moe = method in ("sparse_upcycling", "wo_mcl", "dmu")
        assert (m["parameters"]["total"] > m["parameters"]["active"]) == (method in ("sparse_upcycling", "dmu"))
        assert (m["parameters"]["total"] > results["methods"]["base"]["parameters"]["total"]) == moe
    for name in ("results.json", "results.md", "attributes.png", "routing_dmu.png"):
        assert (tmp_path / name).stat().st_size > 0
    table = results_table(json.loads((tmp_path / "results.json").read_text()))
    assert table.count("\n") == len(METHODS) + 1 and "CLIP-MoE (DMU)" in table


def test_parameter_counts_active_experts():
    model = create_model("clipmoe-tiny")[0]
    dense = parameter_counts(model)
    assert dense["total"] == dense["active"]
    upcycle(model, 4, 2)
    moe = parameter_counts(model)
    # 4 MoE layers (2 per tower) of width 128, hidden 512: each expert holds 2*128*512 + 512 + 128 parameters.
    per_expert = 2 * 128 * 512 + 512 + 128
    routers = 4 * 4 * 128
    assert moe["total"] == dense["total"] + 4 * 3 * per_expert + routers
    assert moe["active"] == moe["total"] - 4 * 2 * per_expert
