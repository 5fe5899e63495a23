"""`clipmoe upcycle` / `finetune` as users run them: a tiny model on the synthetic data, on CPU, killed mid-stage and
resumed to the same final checkpoint; clear errors on bad input."""
import os
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
@pytest.mark.parametrize("stage,steps", [("mcl/stage_2", 12), ("router", 4)])
def test_upcycle_killed_mid_stage_resumes_to_the_same_checkpoint(uninterrupted, tmp_path, stage, steps):
    out = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(clipmoe_cmd(*UPCYCLE, "--output-dir", str(out)), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / stage / "train_state.pt"
    deadline = time.time() + 300
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert state.exists(), f"the run ended before {stage} wrote a checkpoint"
    done = out / ("final" if stage == "router" else stage + "/ffn.safetensors")
    assert not done.exists(), f"killed too late: {stage} had finished"
    assert torch.load(state, weights_only=False)["step"] < steps

    resumed = run(*UPCYCLE, "--output-dir", str(out), "--resume")
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
