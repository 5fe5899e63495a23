"""`clipmoe upcycle` / `finetune` as users run them: a tiny model on the synthetic data, on CPU, killed mid-stage and
resumed to the same final checkpoint; clear errors on bad input."""
import dataclasses
import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from clipmoe import MoEFFN, load_checkpoint

UPCYCLE = ["upcycle", "--model", "clipmoe-tiny", "--train-data", "synthetic:256", "--batch-size", "16",
           "--stages", "2", "--max-steps", "12", "--router-max-steps", "4", "--warmup", "2", "--router-warmup", "2",
           "--lr", "1e-4", "--router-lr", "1e-3", "--checkpoint-every", "2", "--deterministic", "--device", "cpu",
           "--small-cluster", "remainder"]


def clipmoe_cmd(*args):
    return [sys.executable, "-c", "import sys; from clipmoe.cli import main; sys.exit(main())", *args]


def run(*args, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(clipmoe_cmd(*args), capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    whole = run(*UPCYCLE, "--output-dir", str(out))
    assert whole.returncode == 0, whole.stderr[-2000:]
    return out


@pytest.mark.slow
def test_upcycle_assembles_stage_experts(uninterrupted):
    model = load_checkpoint(uninterrupted / "final")
    moes = [m for m in model.modules() if isinstance(m, MoEFFN)]
    assert len(moes) == 4 and all(m.num_experts == 3 for m in moes)  # stage 0 + 2 MCL stages


@pytest.mark.slow
@pytest.mark.parametrize("stage,steps,workers", [("mcl/stage_2", 12, 0), ("router", 4, 0), ("mcl/stage_2", 12, 2)])
def test_upcycle_killed_mid_stage_resumes_to_the_same_checkpoint(uninterrupted, tmp_path, stage, steps, workers):
    """Killed after a checkpoint, resumed: the final model equals the uninterrupted run's (that ran with 0 workers:
    samples are drawn with per-draw seeds, so the DataLoader worker count changes nothing)."""
    out = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    argv = [*UPCYCLE, "--output-dir", str(out), "--workers", str(workers)]
    proc = subprocess.Popen(clipmoe_cmd(*argv), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / stage / "train_state.pt"
    deadline = time.time() + 300
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert state.exists(), f"the run ended before {stage} wrote a checkpoint"
    done = out / ("final" if stage == "router" else stage + "/ffn.safetensors")
    assert not done.exists(), f"killed too late: {stage} had finished"
    assert torch.load(state, weights_only=True)["step"] < steps

    resumed = run(*argv, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    want = load_file(uninterrupted / "final" / "clipmoe_model.safetensors")
    got = load_file(out / "final" / "clipmoe_model.safetensors")
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


@pytest.mark.slow
def test_finetune_baseline_cli(tmp_path):
    result = run("finetune", "--method", "sparse_upcycling", "--model", "clipmoe-tiny", "--train-data",
                 "synthetic:64", "--batch-size", "16", "--max-steps", "2", "--device", "cpu", "--num-experts", "2",
                 "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "final" / "clipmoe_model.safetensors").exists()


@pytest.mark.parametrize("args,words", [
    (["--train-data", "missing.csv"], "--train-data missing.csv: no such file"),
    (["--train-data", "synthetic:64", "--pretrained", "nothere.pt"], "--pretrained nothere.pt: no such checkpoint"),
    (["--train-data", "synthetic:64", "--model", "ViT-Z-99"], "--model 'ViT-Z-99' is not an open_clip model"),
])
def test_bad_input_gives_a_clear_error(tmp_path, args, words):
    result = run("mcl", "--model", "clipmoe-tiny", "--output-dir", str(tmp_path), "--device", "cpu",
                 *[a for a in args if a != "--model"] if "--model" not in args else args)
    assert result.returncode == 2
    assert words in result.stderr and "Traceback" not in result.stderr


def test_checkpoint_of_another_architecture(tmp_path):
    from clipmoe.models import create_model
    torch.save(create_model("clipmoe-tiny")[0].state_dict(), tmp_path / "tiny.pt")
    result = run("mcl", "--model", "ViT-B-32", "--pretrained", str(tmp_path / "tiny.pt"), "--train-data",
                 "synthetic:64", "--output-dir", str(tmp_path / "out"), "--device", "cpu")
    assert result.returncode == 2
    assert f"--pretrained {tmp_path / 'tiny.pt'}: not a checkpoint of ViT-B-32" in result.stderr


# ------------------------------------------------------------------------------------------- the CLI's conventions
def parse(*argv):
    from clipmoe.cli import build_parser
    return build_parser().parse_args(list(argv))


def test_training_flags_cover_every_train_config_field():
    from clipmoe.cli.pipeline import BALANCE_FLAG, RUN_FLAGS, TRAIN_FLAGS
    from clipmoe.train.loop import TrainConfig
    covered = [f.field for f in TRAIN_FLAGS + RUN_FLAGS + (BALANCE_FLAG,)]
    assert sorted(covered) == sorted(f.name for f in dataclasses.fields(TrainConfig))


def test_flag_defaults_are_the_config_defaults():
    from clipmoe.cli.pipeline import train_config
    from clipmoe.config import MoEConfig
    from clipmoe.train.loop import TrainConfig
    args = parse("upcycle", "--train-data", "synthetic", "--output-dir", "x", "--device", "cpu")
    mcl, router, default = train_config(args), train_config(args, "router_", args.balance_alpha), TrainConfig()
    for field in ("epochs", "max_steps", "warmup_steps", "label_smoothing", "logit_scale", "checkpoint_every",
                  "workers", "seed", "deterministic"):
        assert getattr(mcl, field) == getattr(router, field) == getattr(default, field), field
    assert (mcl.lr, mcl.weight_decay, router.lr, router.weight_decay) == (1e-5, 0.2, 1e-6, 0.01)  # CLIP-MoE's
    assert router.balance_alpha == default.balance_alpha and mcl.balance_alpha == 0
    assert args.top_k == MoEConfig().top_k


@pytest.mark.parametrize("command", [["mcl"], ["train-router", "--checkpoint", "ckpt"], ["upcycle"],
                                     ["finetune", "--method", "direct"]])
def test_every_training_command_takes_the_recipe_flags(command):
    from clipmoe.cli.pipeline import train_config
    args = parse(*command, "--train-data", "synthetic", "--output-dir", "x", "--logit-scale", "50",
                 "--label-smoothing", "0")
    cfg = train_config(args)
    assert (cfg.logit_scale, cfg.label_smoothing) == (50.0, 0.0)
    assert parse(*command, "--train-data", "synthetic", "--output-dir", "x").logit_scale == "auto"


@pytest.mark.parametrize("command", ["mcl", "build", "train-router", "upcycle", "finetune", "check-upcycle",
                                     "convert"])
def test_help_shows_defaults_and_no_typed_in_ones(command):
    help_text = " ".join(run(command, "--help").stdout.split())  # one line: the formatter wraps
    assert "(default: " in help_text
    typed_in = re.findall(r"\(([^()]+)\) \(default: \1\)", help_text)  # "warm-up steps (200) (default: 200)"
    assert not typed_in, typed_in


def test_one_progress_bar_policy(monkeypatch):
    from clipmoe.cli.common import configure_logging
    from clipmoe.progress import progress_bar, progress_enabled

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    configure_logging(0)
    assert progress_enabled() and not progress_bar(range(3)).disable
    configure_logging(-1)  # -q
    assert not progress_enabled() and progress_bar(range(3)).disable
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal
    configure_logging(0)
    assert not progress_enabled()
    configure_logging(0)


def test_skipped_samples_reach_the_metrics_and_the_summary(tmp_path, capsys):
    from PIL import Image

    from clipmoe.cli import main
    rows = []
    for i in range(120):
        if i != 7:  # row 7 names an image that is not there
            Image.new("RGB", (8, 8), (2 * i, 0, 0)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png\ta square number {i}")
    csv = tmp_path / "train.tsv"
    csv.write_text("filepath\ttitle\n" + "\n".join(rows) + "\n")
    out = tmp_path / "run"
    assert main(["-q", "mcl", "--model", "clipmoe-tiny", "--train-data", str(csv), "--batch-size", "8", "--stages",
                 "1", "--clusters", "1", "--warmup", "1", "--device", "cpu", "--output-dir", str(out)]) == 0
    metrics = [json.loads(line) for line in (out / "mcl" / "stage_1" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 15 and metrics[-1]["skipped_samples"] == 1
    assert "bad samples skipped or substituted: 1 in training reads, 1 in embedding reads" in capsys.readouterr().out
