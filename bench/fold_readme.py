"""Fold a GPU check's results into the repository: its files into bench/results/, its ratio table into the README.

    python -m bench.fold_readme RESULTS.json [--readme README.md] [--results-dir bench/results]

RESULTS.json is the JSON bash bench/gpu_check.sh wrote (on the GPU machine under $OUT, fetched here). The files
beside it that share its name (.md, .png, .log, -tests.xml) are copied into --results-dir with it, and the README's
block between GPU_START and GPU_END (in its performance section) is replaced by the layer and whole-model tables
with the command that printed them, and by the measured layer next to the traffic model's figures for it
(gpu_table.model_table). When the tuned phase ran, its chosen tile configs (RESULTS-tuned_configs.json beside
the JSON) are merged into the autotune cache the package ships (--tuned-configs, default
clipmoe_kernels/tuned_configs.json; only the keys they name change). Then commit bench/results/, README.md and
that file. A dry run's JSON is refused (it holds no timings). Running it twice on the same JSON gives the same
files.
"""
import argparse
import glob
import json
import os
import shutil
import sys
import textwrap

from bench import gpu_table, traffic_model
from clipmoe_kernels import tuned_configs

GPU_START = "<!-- gpu-check:start (python -m bench.fold_readme rewrites this block) -->"
GPU_END = "<!-- gpu-check:end -->"


def readme_block(results, json_path) -> str:
    m = results["machine"]
    name = os.path.basename(json_path).rsplit(".", 1)[0]
    intro = (f"Measured on {m.get('gpu')} ({m['date']}, commit {m['git']}, torch {m['torch']}, triton "
             f"{m.get('triton')}, CUDA {m.get('cuda')}) by `bash bench/gpu_check.sh`, folded in by "
             f"`python -m bench.fold_readme {json_path}`. Full tables: `bench/results/{name}.md`, plot: "
             f"`bench/results/{name}.png`. bf16, median of `triton.testing.do_bench`; A / B = A's time over B's "
             f"(`triton / bound`: the fused kernels' time over the same GEMMs as dense cuBLAS matmuls; "
             f"`naive / triton` etc.: the speed-up of triton).")
    lines = textwrap.wrap(intro, width=118, break_on_hyphens=False) + [""]
    lines += gpu_table.layer_table(results)
    against_model = gpu_table.model_table(results)
    if against_model:
        intro = ("Measured against the traffic model (`bench/traffic_model.py`, the modelled section above) at "
                 "the same shapes: ms measured and modelled, the ratios to the bound, how far the measured ratio is "
                 f"from the modelled one, and the main-loop rate (fraction of the model's "
                 f"{traffic_model.PEAK_FLOPS / 1e12:.0f} TFLOP/s) at which the model gives the measured time.")
        lines += [""] + textwrap.wrap(intro, width=118, break_on_hyphens=False) + [""] + against_model
    for table in (gpu_table.e2e_table(results), gpu_table.encode_table(results)):
        if table:
            lines += [""] + table
    tests = results.get("tests")
    if tests:
        lines += ["", f"GPU tests in the same run: {tests['passed']} passed, {tests['failures']} failed, "
                      f"{tests['errors']} errors, {tests['skipped']} skipped."]
    missing = gpu_table.not_measured(results)
    if missing:
        lines += ["", f"{len(missing)} measurements or phases were skipped or failed; "
                      f"`bench/results/{name}.md` lists each with its reason."]
    return "\n".join(lines)


def fold(readme: str, block: str, where: str = "README.md") -> str:
    if readme.count(GPU_START) != 1 or readme.count(GPU_END) != 1:
        raise ValueError(f"{where}: expected one '{GPU_START}' and one '{GPU_END}' line (the GPU block of the "
                         f"performance section)")
    head, rest = readme.split(GPU_START)
    _, tail = rest.split(GPU_END)
    return f"{head}{GPU_START}\n{block}\n{GPU_END}{tail}"


def copy_results(json_path, results_dir):
    """The JSON and its sibling files (same name) into results_dir; returns the JSON's path there."""
    base = json_path.rsplit(".", 1)[0]
    os.makedirs(results_dir, exist_ok=True)
    for path in sorted({json_path, *glob.glob(glob.escape(base) + ".*"), *glob.glob(glob.escape(base) + "-*")}):
        target = os.path.join(results_dir, os.path.basename(path))
        if os.path.abspath(path) != os.path.abspath(target) and not path.endswith(".tmp"):
            shutil.copyfile(path, target)
            print(f"copied {path} -> {target}")
    return os.path.join(results_dir, os.path.basename(json_path))


def merge_tuned(json_path, table, parser):
    """The tuned phase's configs (RESULTS-tuned_configs.json beside the results, when the phase ran) merged into
    `table`; returns the table's path, or None when there were none."""
    chosen = json_path.rsplit(".", 1)[0] + "-tuned_configs.json"
    if not os.path.exists(chosen):
        print(f"no {os.path.basename(chosen)} beside the results (the tuned phase did not finish): {table} is "
              f"unchanged")
        return None
    try:
        with open(chosen) as f:
            entries = json.load(f)
        path = tuned_configs.merge_tuned_configs(entries, table, source=chosen)
    except (OSError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
        parser.error(f"{chosen}: {exc}" if isinstance(exc, json.JSONDecodeError) else str(exc))
    count = sum(len(keys) for kernels in entries.values() for keys in kernels.values())
    print(f"merged {count} tuned tile configs from {chosen} into {path}")
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json_file")
    parser.add_argument("--readme", default="README.md")
    parser.add_argument("--results-dir", default="bench/results")
    parser.add_argument("--tuned-configs", default=str(tuned_configs.SHIPPED),
                        help="the tile-config table the tuned phase's choices are merged into (default: the shipped "
                             "one)")
    args = parser.parse_args(argv)
    try:
        results = gpu_table.load(args.json_file)
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    if results["dry_run"]:
        parser.error(f"{args.json_file}: a dry run's results (tiny shapes, no timings) do not go into the README")
    stored = os.path.join(args.results_dir, os.path.basename(args.json_file))
    with open(args.readme) as f:
        readme = f.read()
    try:  # everything that can refuse runs before anything is written
        new = fold(readme, readme_block(results, stored), args.readme)
    except ValueError as exc:
        parser.error(str(exc))
    merged = merge_tuned(args.json_file, args.tuned_configs, parser)
    copy_results(args.json_file, args.results_dir)
    table = stored.rsplit(".", 1)[0] + ".md"
    if not os.path.exists(table):  # the run stopped before its tables: make them from the JSON
        with open(table, "w") as f:
            f.write(gpu_table.markdown(results))
    with open(args.readme, "w") as f:
        f.write(new)
    print(f"{args.readme}: GPU block rewritten from {stored}; now commit {args.results_dir}, {args.readme}"
          + (f" and {merged}" if merged else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
