"""`clipmoe demo` at a tiny scale (every task of the full demo runs: pre-training, baselines, MCL at both budgets,
the random-negative control, the sweep; tables and files written), its pre-training collapse check, and the
parameter counts of its table."""
import json
import math
from dataclasses import replace

import numpy as np
import pytest

from clipmoe.cli import main
from clipmoe.cli.demo import METHODS, method_labels
from clipmoe.cli.experiment import SCALES, check_pretraining, parameter_counts, run_task
from clipmoe.models import create_model
from clipmoe.upcycle import upcycle


def test_demo_tiny_cli(tmp_path, capsys):
    assert main(["demo", "--scale", "tiny", "--jobs", "1", "--output-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    scale = SCALES["tiny"]
    for label in method_labels(scale).values():
        assert label in printed
    for heading in ("Main table", "Paired bootstrap", "Zero-shot top-1 per attribute", "MCL clusterings",
                    "Routing", "Sweep", "wall time"):
        assert heading in printed
    assert (tmp_path / "results.md").read_text().strip() in printed
    results = json.loads((tmp_path / "results.json").read_text())
    assert sorted(results["models"]) == ["0", "1"]
    seed0 = results["models"]["0"]
    assert set(METHODS) | {"stage1", "stage2", "stage3", "sweep_e2_k1", "sweep_e2_k2", "sweep_e4_k1"} <= set(seed0)
    assert seed0["dmu_stage"]["parameters"]["total"] > seed0["dmu_stage"]["parameters"]["active"]
    assert len(seed0["dmu_stage"]["routing"]["visual"]) == scale.num_experts
    assert len(results["clusters"]["0"]) == max(scale.sweep_experts) - 1  # seed 0 runs the sweep's stages
    hits = np.load(tmp_path / "hits.npz")
    assert hits["seed1/dmu_stage/full_t2i_R@1"].shape == (scale.test_samples,)
    assert (tmp_path / "sweep.png").stat().st_size > 0
    # --resume loads every saved task and prints the same tables
    assert main(["demo", "--scale", "tiny", "--jobs", "1", "--output-dir", str(tmp_path), "--resume"]) == 0
    again = capsys.readouterr().out
    assert again.count("loaded ") == len(list((tmp_path / "tasks").glob("*.npz"))) and "  done " not in again
    assert (tmp_path / "results.md").read_text().strip() in again
    assert again.split("\n\n", 1)[1].rsplit("written:", 1)[0] == printed.split("\n\n", 1)[1].rsplit("written:", 1)[0]


def test_tasks_repeat_exactly(tmp_path):
    """The same task twice gives the same per-sample outcomes (one torch thread per task, seeded)."""
    scale = SCALES["tiny"]
    (tmp_path / "seed0").mkdir()
    first, _, _ = run_task("pretrain", (scale, 0, tmp_path))
    second, _, _ = run_task("pretrain", (scale, 0, tmp_path))
    for key, value in first["models"]["base"]["hits"].items():
        assert np.array_equal(value, second["models"]["base"]["hits"][key]), key


def test_collapse_check():
    batch = 64
    assert check_pretraining([4.2] * 10 + [1.5] * 20, batch) == pytest.approx(1.5)
    with pytest.raises(ValueError, match=r"collapsed: its final loss 4\.15.*ln\(batch\) = 4\.159"):
        check_pretraining([4.16] * 5 + [4.15] * 20, batch)
    with pytest.raises(ValueError, match="no loss"):
        check_pretraining([], batch)
    assert 0.9 * math.log(batch) < 4.15  # the threshold used above


def test_collapsed_pretraining_stops_the_demo(tmp_path):
    (tmp_path / "seed0").mkdir()
    with pytest.raises(ValueError, match="seed 0: pre-training collapsed"):  # lr 0.05: the towers collapse
        run_task("pretrain", (replace(SCALES["tiny"], pretrain_lr=0.05), 0, tmp_path))
    assert not (tmp_path / "seed0" / "base.pt").exists()


def test_demo_bad_arguments(capsys):
    assert main(["demo", "--seeds", "0"]) == 2
    assert "--seeds must be >= 1" in capsys.readouterr().err


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
