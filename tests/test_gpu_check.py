"""The GPU check's parts that run without a GPU: the grouped_mm provider and the bound, the ratio table, folding the
results into the README, the plot, and that the `gpu` tests collect where open_clip, ftfy and webdataset are absent.
(The whole check end to end: `bash bench/gpu_check.sh --dry-run`, run by CI.)"""
import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

from bench import fold_readme, gpu_check, gpu_table, providers
from bench.configs import Case
from bench.report import plot_lines
from clipmoe_kernels import expert_ffn_torch
from tests.tolerances import assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_tests_collect_without_open_clip_ftfy_webdataset():
    """As on the GPU machine: every test file collects (none imports a missing package unguarded)."""
    out = subprocess.run([sys.executable, "-m", "pytest", "-p", "bench.without_extras", "tests", "-m", "gpu",
                          "--collect-only", "-q", "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "error" not in out.stdout.splitlines()[-1].lower(), out.stdout[-2000:]


@pytest.mark.skipif(providers.GROUPED_MM is None, reason="this torch has no grouped_mm")
@pytest.mark.parametrize("routing", ["uniform", "skewed", "all_to_one"])  # all_to_one: empty experts
def test_grouped_mm_provider_matches_the_reference(routing):
    case = Case("vit_b32", 2, 4, routing, "forward_backward", tiny=True)
    inputs = providers.make_inputs(case, "cpu", torch.float32)
    names = ("x", "topk_weights", "w1", "b1", "w2", "b2")
    g = torch.randn(case.tokens, case.d_model)
    results = []
    for fn in (providers.expert_ffn_grouped_mm, expert_ffn_torch):
        leaves = {n: inputs[n].detach().clone().requires_grad_() for n in names}
        y = fn(leaves["x"], inputs["topk_ids"], leaves["topk_weights"], leaves["w1"], leaves["b1"], leaves["w2"],
               leaves["b2"], "quick_gelu")
        results.append((y, torch.autograd.grad(y, list(leaves.values()), g)))
    (y, grads), (y_ref, grads_ref) = results
    assert_close(y, y_ref, torch.float32, "y")
    for name, got, want in zip(names, grads, grads_ref, strict=True):
        assert_close(got, want, torch.float32, f"d{name}")


def test_bound_runs_the_six_gemms_of_the_layer():
    case = Case("vit_b32", 2, 4, "uniform", "forward_backward", tiny=True)
    bound = providers.prepare("bound", case, "cpu", torch.float64)
    assert bound.check_err is None and bound.leaves == []
    bound.run()  # shapes: TK x D, D x F, ...; a wrong one raises
    assert case.flops() == 3 * 4 * case.tokens * case.top_k * case.d_model * case.hidden


def test_a_provider_that_fails_its_check_raises():
    case = Case("vit_b32", 2, 4, "uniform", "forward", tiny=True)
    wrong = providers.reference_output(case, "cpu") * 1.1
    with pytest.raises(AssertionError, match="failed its check"):
        providers.prepare("torch", case, "cpu", torch.float32, wrong)


def test_without_the_extension_triton_is_not_measured_and_errors_are_recorded():
    check = gpu_check.Check(argparse.Namespace(dry_run=True, json=None, no_extension=True, budget_s=60))
    case = check.case("vit_l14", 256, mode="forward")
    gpu_check.measure_layer(check, "training", case, ("triton", "torch", "naive", "no_such_provider"))
    rows = {r["provider"]: r for r in check.results["layer"]}
    for provider in ("triton", "torch"):  # both route with the extension's moe_align
        assert rows[provider]["status"] == "skipped" and "host-synchronising" in rows[provider]["error"]
    assert rows["naive"]["status"] == "ok" and rows["naive"]["check_rel_err"] < 1e-6
    assert rows["no_such_provider"]["status"] == "error" and "no_such_provider" in rows["no_such_provider"]["error"]
    assert gpu_check.failures(check.results) == [rows["no_such_provider"]]


def layer_row(provider, median, mode="forward_backward", phase="training", peak=100.0, status="ok", graph=False):
    return {"phase": phase, "case": f"vit_l14-b256-E4-uniform-{mode}", "tower": "vit_l14", "batch": 256,
            "tokens": 65792, "d_model": 1024, "hidden": 4096, "num_experts": 4, "top_k": 2, "routing": "uniform",
            "mode": mode, "provider": provider, "graph": graph, "tile_config": None, "dtype": "bfloat16",
            "flops": 3 * 4 * 65792 * 2 * 1024 * 4096, "status": status,
            "error": None if status == "ok" else "not capturable: reason", "median_ms": median,
            "p20_ms": median and median * 0.9, "p80_ms": median and median * 1.1, "peak_mib": peak,
            "check_rel_err": 1e-3}


def results_json(dry_run=False):
    layer = [layer_row("triton", 10.0, peak=1000.0), layer_row("torch", 15.0), layer_row("naive", 30.0, peak=3000.0),
             layer_row("grouped_mm", 12.5), layer_row("bound", 5.0, peak=None),
             layer_row("naive", None, mode="forward", phase="inference", status="skipped", graph=True),
             layer_row("triton", 8.0, phase="tuned")]
    e2e = [{"phase": "e2e", "model": "ViT-B-16", "batch": 64, "variant": v, "task": "train_step", "status": "ok",
            "error": None, "median_ms": ms, "p20_ms": ms, "p80_ms": ms, "peak_mib": 2048.0, "check_rel_err": 1e-3,
            "items_per_s": 64 / ms * 1e3} for v, ms in (("dense", 100.0), ("naive", 200.0), ("triton", 125.0))]
    encode = [encode_row(v, ms, pipeline) for v, ms, pipeline in (("dense", 10.0, 2.0), ("torch", 20.0, 2.5),
                                                                   ("triton", 16.0, 2.2))]
    encode.append(encode_row("naive", None, None, status="skipped"))
    return {"schema": "clipmoe-gpu-check/1", "dry_run": dry_run, "budget_s": 200,
            "machine": {"gpu": "NVIDIA H200", "torch": "2.11.0", "triton": "3.6.0", "cuda": "13.0",
                        "python": "3.12.3", "git": "abc1234", "date": "2026-12-01 12:00 UTC"},
            "phases": [{"name": "training", "expected_s": 40, "wall_s": 33.0, "status": "ok", "note": None},
                       {"name": "tuned", "expected_s": 60, "wall_s": None, "status": "skipped", "note": "no time"}],
            "layer": layer, "e2e": e2e, "encode": encode}


def encode_row(variant, ms, pipeline_s, status="ok"):
    return {"phase": "encode", "model": "ViT-B-16", "batch": 256, "items": 512, "experts": 4, "top_k": 2,
            "variant": variant, "status": status, "error": None if status == "ok" else "no time",
            "check_rel_err": 1e-3, "tile_config": None, "median_ms": ms, "p20_ms": ms and ms * 0.9,
            "p80_ms": ms and ms * 1.1, "items_per_s": ms and 256 / ms * 1e3,
            "pipeline_s": [pipeline_s] * 3 if pipeline_s else [],
            "pipeline_items_per_s": pipeline_s and 512 / pipeline_s, "workers": 8}


def cells(line):
    return [c.strip() for c in line.strip("|").split("|")]


def test_ratio_table_divides_the_medians():
    lines = gpu_table.layer_table(results_json())
    header = cells(lines[0])
    training = cells(next(x for x in lines if x.startswith("| training")))
    row = dict(zip(header, training, strict=True))
    assert row["triton / bound"] == "2.00" and row["naive / triton"] == "3.00"
    assert row["torch / triton"] == "1.50" and row["grouped_mm / triton"] == "1.25"
    assert row["naive / triton MiB"] == "3.00" and row["triton MiB"] == "1000"
    assert row["triton TFLOP/s"] == f"{3 * 4 * 65792 * 2 * 1024 * 4096 / 10e-3 / 1e12:.0f}"
    tuned = dict(zip(header, cells(next(x for x in lines if x.startswith("| tuned"))), strict=True))
    assert tuned["triton / bound"] == "1.60" and tuned["naive / triton"] == "3.75"  # the training run's bound, naive
    e2e = gpu_table.e2e_table(results_json())
    e2e_row = dict(zip(cells(e2e[0]), cells(e2e[2]), strict=True))
    assert e2e_row["naive / triton"] == "1.60" and e2e_row["triton / dense"] == "1.25"
    encode = {cells(line)[1]: dict(zip(cells(gpu_table.encode_table(results_json())[0]), cells(line), strict=True))
              for line in gpu_table.encode_table(results_json())[2:]}
    assert encode["dense"]["images/s"] == "25600" and encode["torch"]["images/s / dense"] == "0.50"
    assert encode["triton"]["pipeline images/s (512 PNGs, 8 workers)"] == "233"
    assert encode["triton"]["pipeline / dense"] == f"{2.0 / 2.2:.2f}" and encode["naive"]["images/s / dense"] == "–"
    missing = "\n".join(gpu_table.not_measured(results_json()))
    assert "not capturable: reason" in missing and "phase tuned: skipped: no time" in missing
    assert "encode ViT-B-16 `naive`: skipped: no time" in missing
    assert gpu_table.encode_table({"encode": []}) == [] and gpu_table.not_measured({**results_json(), "encode": []})


def test_encode_phase_runs_every_variant_on_the_cpu(triton_interpreter, capsys):
    """The encode phase of a dry run: tiny CLIP, the pipeline over real PNG files, each variant checked against the
    dense model; without the extension the variants that route with moe_align are skipped, not failed."""
    pytest.importorskip("open_clip")
    for extension in (True, False):
        check = gpu_check.Check(argparse.Namespace(dry_run=True, json=None, no_extension=not extension, budget_s=60))
        gpu_check.phase_encode(check)
        rows = {r["variant"]: r for r in check.results["encode"]}
        assert list(rows) == list(gpu_check.ENCODE_VARIANTS) and gpu_check.failures(check.results) == []
        assert rows["dense"]["status"] == "ok" and rows["dense"]["check_rel_err"] < 1e-6
        for variant in ("torch", "triton"):
            assert rows[variant]["status"] == ("ok" if extension else "skipped"), rows[variant]
            if extension:
                assert 0.0 < rows[variant]["check_rel_err"] < 1e-5  # the MoE layers ran, copied experts agree
    gpu_check.print_encode(encode_row("triton", 16.0, 2.2))
    assert "encode ViT-B-16 triton: encode_image b256 16.00 ms (16000 images/s); pipeline 512 images 233 images/s" \
        in capsys.readouterr().out


def model_columns(lines, run, mode):
    header = cells(lines[0])
    row = next(x for x in lines if x.startswith(f"| {run} | {mode} |"))
    return dict(zip(header, cells(row), strict=True))


def test_model_table_puts_the_traffic_model_next_to_the_measured_layer():
    from bench import traffic_model
    results = results_json()  # training forward_backward: triton 10 ms, bound 5 ms
    shape = traffic_model.Shape(tokens=65792)
    kernels = traffic_model.modelled_kernels(shape)
    model_ms = sum(k.time_s for k in kernels) * 1e3
    modelled_ratio = model_ms / (traffic_model.bound_s(shape) * 1e3)
    lines = gpu_table.model_table(results)
    row = model_columns(lines, "training", "forward_backward")
    assert row["triton ms (model)"] == f"{model_ms:.3f}" and row["triton / bound"] == "2.00"
    assert row["triton / bound (model)"] == f"{modelled_ratio:.2f}"
    assert row["measured / model - 1"] == f"{2.0 / modelled_ratio - 1:+.0%}"
    rate = float(row["main-loop rate reproducing triton ms"])
    assert traffic_model.layer_time_s(kernels, rate) == pytest.approx(10e-3, rel=0.01)
    text = "\n".join(lines)
    assert "training forward_backward: the model is" in text and "over the 20% tolerance" in text
    assert "measured bound / triton = 0.50" in text
    tuned = model_columns(lines, "tuned (autotune)", "forward_backward")  # the training run's bound
    assert tuned["triton / bound"] == "1.60"

    # A measurement the model predicts within the tolerance is said to agree; rows the model does not describe
    # (CUDA graphs, fp32, skewed routing) and rows without a timed bound are left out.
    agreeing = results_json()
    for r in agreeing["layer"]:
        if r["provider"] == "triton" and r["phase"] == "training":
            r["median_ms"] = 5.0 * modelled_ratio * 1.1
    assert "the model is within 20% (+10%)" in "\n".join(gpu_table.model_table(agreeing))
    for change in ({"graph": True}, {"dtype": "float32"}, {"routing": "skewed"}):
        other = results_json()
        other["layer"] = [{**r, **change} for r in other["layer"]]
        assert gpu_table.model_table(other) == []
    untimed = results_json()
    untimed["layer"] = [r for r in untimed["layer"] if r["provider"] != "bound"]
    assert gpu_table.model_table(untimed) == []


def test_tests_summary_reads_junit(tmp_path):
    xml = tmp_path / "t.xml"
    xml.write_text('<testsuites><testsuite tests="4" failures="1" errors="0" skipped="1" time="2.5">'
                   '<testcase classname="tests.a" name="ok"/><testcase classname="tests.a" name="bad">'
                   '<failure message="x"/></testcase><testcase classname="tests.a" name="s"><skipped/></testcase>'
                   '<testcase classname="tests.b" name="ok2"/></testsuite></testsuites>')
    s = gpu_table.tests_summary(str(xml))
    assert (s["passed"], s["failures"], s["skipped"], s["failed"]) == (2, 1, 1, ["tests.a::bad"])


def test_fold_readme_rewrites_only_the_gpu_block(tmp_path, capsys):
    run = tmp_path / "out"
    run.mkdir()
    path = run / "gpu-20261201-120000.json"
    path.write_text(json.dumps(results_json()))
    (run / "gpu-20261201-120000.log").write_text("log")
    readme = tmp_path / "README.md"
    before, after = "# x\n\n## Performance\n\ntext\n", "\n\n## CLI\nrest\n"
    readme.write_text(f"{before}{fold_readme.GPU_START}\nNot measured yet.\n{fold_readme.GPU_END}{after}")
    key = "D=1024,F=4096,ROWS_BUCKET=32768,dtype=bfloat16"
    chosen = {"NVIDIA H200": {"_grouped_up_fwd_kernel": {key: {"BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8,
                                                               "num_stages": 3}}}}
    (run / "gpu-20261201-120000-tuned_configs.json").write_text(json.dumps(chosen))
    table = tmp_path / "tuned_configs.json"  # the shipped table, holding another device's choice
    other = {"NVIDIA H100": {"_rows_to_slots_kernel": {key: {"BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4,
                                                             "num_stages": 4}}}}
    table.write_text(json.dumps(other))
    argv = [str(path), "--readme", str(readme), "--results-dir", str(tmp_path / "results"),
            "--tuned-configs", str(table)]
    assert fold_readme.main(argv) == 0
    assert json.loads(table.read_text()) == {**other, **chosen}
    text = readme.read_text()
    assert text.startswith(before) and text.endswith(after) and "Not measured yet" not in text
    row = "| training | vit_l14 b256 T65792 E4 uniform | forward_backward | no | 10.000 [9.000, 11.000] | 2.00 |"
    assert row in text
    assert "| ViT-B-16 | torch | 20.00 [18.00, 22.00] | 12800 | 0.50 | 205 | 0.80 |" in text  # the encode table
    assert "Measured against the traffic model" in text and "| training | forward_backward | 10.000 |" in text
    assert "python -m bench.fold_readme" in text
    stored = sorted(os.listdir(tmp_path / "results"))
    assert stored == ["gpu-20261201-120000-tuned_configs.json", "gpu-20261201-120000.json",
                      "gpu-20261201-120000.log", "gpu-20261201-120000.md"]
    merged = table.read_text()
    assert fold_readme.main(argv) == 0 and readme.read_text() == text  # twice: the same files
    assert table.read_text() == merged

    for bad, words in (("{not json", "Expecting property name"), (json.dumps({"NVIDIA H200": {"k": {key: {
            "BLOCK_N": 128}}}}), "expected a config with the int fields")):
        (run / "gpu-20261201-120000-tuned_configs.json").write_text(bad)
        with pytest.raises(SystemExit):
            fold_readme.main(argv)
        err = capsys.readouterr().err
        assert "gpu-20261201-120000-tuned_configs.json" in err and words in err, err
        assert table.read_text() == merged  # a bad file changes nothing
    (run / "gpu-20261201-120000-tuned_configs.json").unlink()

    dry = run / "dry-run.json"
    dry.write_text(json.dumps(results_json(dry_run=True)))
    with pytest.raises(SystemExit):
        fold_readme.main([str(dry), "--readme", str(readme)])
    assert "dry run" in capsys.readouterr().err
    readme.write_text("# no markers\n")
    with pytest.raises(SystemExit):
        fold_readme.main(argv)
    assert "gpu-check:start" in capsys.readouterr().err


def test_plot_lines_small_multiples(tmp_path):
    points = [{"tower": t, "mode": m, "tokens": n, "provider": p, "median": ms, "lo": ms * 0.9, "hi": ms * 1.1}
              for t in ("vit_b16", "vit_l14") for m in ("forward", "forward_backward") for n in (197, 1576, 65792)
              for p, ms in (("triton", n / 1e3), ("naive", n / 5e2), ("bound", n / 2e3))]
    out = plot_lines(points, str(tmp_path / "p.png"))
    assert out and os.path.getsize(out) > 10_000
    assert plot_lines([], str(tmp_path / "none.png")) is None and not (tmp_path / "none.png").exists()
