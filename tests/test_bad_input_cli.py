"""What the pipeline commands refuse, and how: one test per example, each a command line a user could type.

Every refusal is exit status 2 with one line on stderr that names the flag or the file and what was expected (no
traceback). Single flags are checked by the argparse types of clipmoe.cli.common, combinations by
clipmoe.cli.pipeline.check_args, run folders by clipmoe.cli.common (args.json, --resume, --overwrite).
"""
import json
import shutil
from pathlib import Path

import pytest
import torch

from clipmoe.cli import main

# A tiny MCL run: one stage, one step (seconds on a CPU).
MCL = ["mcl", "--model", "clipmoe-tiny", "--train-data", "synthetic:32", "--batch-size", "8", "--stages", "1",
       "--clusters", "2", "--max-steps", "1", "--warmup", "1", "--device", "cpu", "--small-cluster", "remainder"]


def refused(capsys, *argv) -> str:
    """Run the CLI (-q: no info lines) in this process; assert it refused with exit status 2 and one line on stderr;
    return that line."""
    try:
        status = main(["-q", *argv])
    except SystemExit as exc:  # argparse's own refusals
        status = exc.code
    err = capsys.readouterr().err.strip()
    assert status == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main([*MCL, "--output-dir", str(out / "run")]) == 0
    return out / "run"


def copy_of(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    return copy


# ------------------------------------------------------------------------------------------------------ single flags
def test_max_steps_minus_one(capsys, tmp_path):
    err = refused(capsys, *MCL, "--output-dir", str(tmp_path), "--max-steps", "-1")
    assert "argument --max-steps: expected an integer >= 1, got '-1'" in err


def test_max_steps_zero(capsys, tmp_path):  # it used to mean "a full epoch"
    assert "argument --max-steps: expected an integer >= 1, got '0'" in refused(
        capsys, *MCL, "--output-dir", str(tmp_path), "--max-steps", "0")


def test_balance_alpha_nan(capsys, tmp_path):
    err = refused(capsys, "finetune", "--method", "wo_mcl", "--train-data", "synthetic:32", "--output-dir",
                  str(tmp_path), "--balance-alpha", "nan")
    assert "argument --balance-alpha: expected a finite number >= 0, got 'nan'" in err


@pytest.mark.parametrize("flag,value,expected", [
    ("--logit-scale", "0", "'auto' or a finite number > 0"),
    ("--label-smoothing", "1", "a probability in [0, 1)"),
    ("--expert-dropout", "1.5", "a probability in [0, 1)"),
    ("--lr", "inf", "a finite number > 0"),
    ("--batch-size", "0", "an integer >= 1"),
    ("--workers", "-1", "an integer >= 0"),
    ("--clusters", "0", "an integer >= 1"),
    ("--dist-timeout", "0", "a finite number > 0"),
    ("--device", "gpu", "auto, cpu, cuda or cuda:N"),
])
def test_other_flag_values(capsys, tmp_path, flag, value, expected):
    err = refused(capsys, "upcycle", "--train-data", "synthetic:32", "--output-dir", str(tmp_path), flag, value)
    assert f"argument {flag}: expected {expected}, got '{value}'" in err


# ------------------------------------------------------------------------------------------------- flag combinations
def test_top_k_more_than_the_experts(capsys, tmp_path):  # it used to be clamped silently
    err = refused(capsys, "upcycle", "--train-data", "synthetic:32", "--stages", "1", "--top-k", "5",
                  "--output-dir", str(tmp_path))
    assert "--top-k 5: more than the 2 experts of this model" in err


def test_top_k_more_than_the_experts_of_wo_mcl(capsys, tmp_path):
    err = refused(capsys, "finetune", "--method", "wo_mcl", "--train-data", "synthetic:32", "--top-k", "3",
                  "--output-dir", str(tmp_path))
    assert "--top-k 3: more than the 2 experts" in err


def test_build_top_k_more_than_the_stages(capsys, tmp_path, finished_run):
    err = refused(capsys, "build", "--model", "clipmoe-tiny", "--mcl-dir", str(finished_run / "mcl"), "--top-k", "5",
                  "--output-dir", str(tmp_path / "built"))
    assert f"--top-k 5: more than the 2 experts in --mcl-dir {finished_run / 'mcl'}" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_device_cuda_without_a_gpu(capsys, tmp_path):
    err = refused(capsys, *MCL, "--output-dir", str(tmp_path), "--device", "cuda")
    assert "argument --device: cuda: no CUDA GPU is available to torch here" in err


def test_synthetic_size_not_a_number(capsys, tmp_path):
    err = refused(capsys, "mcl", "--train-data", "synthetic:many", "--output-dir", str(tmp_path))
    assert "--train-data synthetic:N: expected an integer >= 1, got 'many'" in err


def test_csv_separator_of_two_characters(capsys, tmp_path):
    err = refused(capsys, "mcl", "--train-data", "x.csv", "--csv-separator", ",,", "--output-dir", str(tmp_path))
    assert "--csv-separator ',,': expected one character" in err


def test_missing_mcl_dir(capsys, tmp_path):
    err = refused(capsys, "build", "--mcl-dir", str(tmp_path / "nothere"), "--output-dir", str(tmp_path / "o"))
    assert f"--mcl-dir {tmp_path / 'nothere'}: no such file or folder" in err


# -------------------------------------------------------------------------------------------------------- run folders
def test_output_dir_that_is_a_file(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    err = refused(capsys, *MCL, "--output-dir", str(tmp_path / "file"))
    assert f"--output-dir {tmp_path / 'file'}: is a file, expected a folder" in err


def test_non_empty_output_dir_without_resume(capsys, finished_run):
    err = refused(capsys, *MCL, "--output-dir", str(finished_run))
    assert "not empty (holds args.json, mcl); add --resume to continue the run in it or --overwrite" in err


def test_resume_and_overwrite_together(capsys, tmp_path):
    err = refused(capsys, *MCL, "--output-dir", str(tmp_path), "--resume", "--overwrite")
    assert "argument --overwrite: not allowed with argument --resume" in err


def test_overwrite_replaces_the_run(tmp_path, finished_run):
    out = copy_of(finished_run, tmp_path)
    (out / "notes.txt").write_text("mine")
    (out / "mcl" / "stage_7").mkdir()  # a stale folder of an earlier, longer run
    assert main([*MCL, "--output-dir", str(out), "--overwrite", "--seed", "3"]) == 0
    assert not (out / "mcl" / "stage_7").exists() and (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "args.json").read_text())["seed"] == 3


def test_resume_of_a_folder_without_args_json(capsys, tmp_path):
    (tmp_path / "something").write_text("x")
    err = refused(capsys, *MCL, "--output-dir", str(tmp_path), "--resume")
    assert f"--resume: {tmp_path} holds no args.json" in err


def with_flags(argv, flags: dict) -> list:
    argv = list(argv)
    for flag, value in flags.items():
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    return argv


@pytest.mark.parametrize("change,named", [
    ({"--lr": "0.5"}, "--lr: 1e-05 in the run, 0.5 now"),
    ({"--seed": "1"}, "--seed: 0 in the run, 1 now"),
    ({"--batch-size": "16"}, "--batch-size: 8 in the run, 16 now"),
    ({"--label-smoothing": "0"}, "--label-smoothing: 0.1 in the run, 0.0 now"),
    ({"--train-data": "synthetic:40"}, "the training data (sample count and file hash): {'samples': 32"),
])
def test_resume_with_a_result_changing_difference(capsys, finished_run, change, named):
    err = refused(capsys, *with_flags(MCL, change), "--output-dir", str(finished_run), "--resume")
    assert f"--resume: {finished_run} holds a run with other settings that change results: " in err
    assert named in err


def test_resume_with_display_only_differences(finished_run, tmp_path):
    out = copy_of(finished_run, tmp_path)
    assert main([*MCL, "--output-dir", str(out), "--resume", "--workers", "1", "--checkpoint-every", "7"]) == 0


def test_resume_with_a_csv_that_changed(capsys, tmp_path):
    from PIL import Image
    rows = []
    for i in range(8):
        Image.new("RGB", (8, 8), (i * 30, 0, 0)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png\ta red square number {i}")
    csv = tmp_path / "train.tsv"
    csv.write_text("filepath\ttitle\n" + "\n".join(rows) + "\n")
    argv = ["mcl", "--model", "clipmoe-tiny", "--train-data", str(csv), "--batch-size", "4", "--stages", "1",
            "--clusters", "1", "--max-steps", "1", "--device", "cpu", "--output-dir", str(tmp_path / "run")]
    assert main(["-q", *argv]) == 0
    csv.write_text("filepath\ttitle\n" + "\n".join(rows[::-1]) + "\n")  # same rows, another order
    err = refused(capsys, *argv, "--resume")
    assert "the training data (sample count and file hash)" in err


# -------------------------------------------------------------------------------------- files of a run, on --resume
def resumable_copy(finished_run, tmp_path) -> Path:
    """A copy of the run whose stage 1 resumes from its train_state.pt (its FFN file removed)."""
    out = copy_of(finished_run, tmp_path)
    (out / "mcl" / "stage_1" / "ffn.safetensors").unlink()
    return out


class RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code ran')",)


def test_train_state_that_would_run_code(capsys, tmp_path, finished_run):
    out = resumable_copy(finished_run, tmp_path)
    marker = tmp_path / "pwned"
    state = out / "mcl" / "stage_1" / "train_state.pt"
    torch.save({"step": 0, "payload": RunsCode(marker)}, state)
    err = refused(capsys, *MCL, "--output-dir", str(out), "--resume")
    assert not marker.exists(), "unpickling the train state ran code"
    assert f"{state}: cannot be read as a clipmoe train state" in err


def test_corrupt_train_state(capsys, tmp_path, finished_run):
    out = resumable_copy(finished_run, tmp_path)
    state = out / "mcl" / "stage_1" / "train_state.pt"
    state.write_bytes(state.read_bytes()[:200])  # truncated
    assert f"{state}: cannot be read as a clipmoe train state" in refused(
        capsys, *MCL, "--output-dir", str(out), "--resume")


def test_corrupt_labels(capsys, tmp_path, finished_run):
    out = copy_of(finished_run, tmp_path)
    labels = out / "mcl" / "labels_0.pt"
    labels.write_bytes(b"not a tensor file")
    assert f"{labels}: cannot be read as cluster labels" in refused(capsys, *MCL, "--output-dir", str(out), "--resume")


def test_corrupt_ffn_file(capsys, tmp_path, finished_run):
    out = copy_of(finished_run, tmp_path)
    ffn = out / "mcl" / "stage_1" / "ffn.safetensors"
    ffn.write_bytes(ffn.read_bytes()[:100])
    err = refused(capsys, *MCL, "--output-dir", str(out), "--resume")
    assert f"{ffn}: cannot be read as a safetensors file of FFN weights" in err


def test_metrics_with_a_torn_last_line_resumes(tmp_path, finished_run):
    out = resumable_copy(finished_run, tmp_path)
    metrics = out / "mcl" / "stage_1" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 2, "lo')  # killed while writing a line
    assert main([*MCL, "--output-dir", str(out), "--resume"]) == 0
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1]


def test_metrics_with_a_bad_line_in_the_middle(capsys, tmp_path, finished_run):
    out = resumable_copy(finished_run, tmp_path)
    metrics = out / "mcl" / "stage_1" / "metrics.jsonl"
    metrics.write_text("garbage\n" + metrics.read_text())
    assert f"{metrics}: line 1 is not a metrics record" in refused(capsys, *MCL, "--output-dir", str(out), "--resume")
