"""`clipmoe demo`: the CLIP-MoE paper's comparison in miniature, on CPU in minutes (runner: clipmoe.cli.experiment).

Prints and saves (results.md, results.json, hits.npz, sweep.png): the main table (mean ± std over seeds), paired
bootstrap intervals of DMU against direct fine-tuning, against the random-negative control and against "w/o MCL",
the per-attribute zero-shot table (each MCL stage model alone: the paper's Table 1 in spirit), the clustering
diagnostics (ARI of consecutive clusterings, NMI with every attribute, a warning when two agree), routing shares per
expert, and the experts x top-k sweep.
"""
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from clipmoe.cli.common import UsageError
from clipmoe.cli.experiment import SCALES, run_all, summary

ARI_WARNING = 0.9
METHODS = ("base", "direct", "sparse_upcycling", "wo_mcl_compute", "control_compute", "dmu_compute",
           "wo_mcl_stage", "control_stage", "dmu_stage")
COMPARISONS = (("dmu_stage", "direct"), ("dmu_stage", "control_stage"), ("dmu_stage", "wo_mcl_stage"),
               ("dmu_stage", "base"), ("dmu_compute", "direct"), ("dmu_compute", "control_compute"),
               ("control_stage", "direct"), ("sparse_upcycling", "direct"))
MAIN_METRICS = (("full_t2i_R@1", "T2I R@1"), ("full_t2i_R@10", "T2I R@10"), ("full_i2t_R@1", "I2T R@1"),
                ("full_i2t_R@10", "I2T R@10"), ("zs_easy", "zero-shot easy"), ("zs_hard", "zero-shot hard"),
                ("short_t2i_R@1", "pre-train task T2I R@1"))
INTERVAL_METRICS = (("full_t2i_R@1", "T2I R@1"), ("full_i2t_R@1", "I2T R@1"), ("zs_mean", "zero-shot mean"),
                    ("zs_hard", "zero-shot hard"), ("short_t2i_R@1", "pre-train task T2I R@1"))


def method_labels(scale) -> dict:
    f, r, stages = scale.finetune_steps, scale.router_steps, scale.num_experts - 1
    cs = (f - r) // stages
    return {"base": "base (pre-trained, short captions)", "direct": f"direct fine-tune ({f})",
            "sparse_upcycling": f"sparse upcycling ({f})",
            "wo_mcl_compute": f"w/o MCL, compute ({f - r}+{r})",
            "control_compute": f"random-negative control, compute ({stages}x{cs}+{r})",
            "dmu_compute": f"CLIP-MoE (DMU), compute ({stages}x{cs}+{r})",
            "wo_mcl_stage": f"w/o MCL, stage ({f}+{r})",
            "control_stage": f"random-negative control, stage ({stages}x{f}+{r})",
            "dmu_stage": f"CLIP-MoE (DMU), stage ({stages}x{f}+{r})"}


def _table(head, rows) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def _per_seed(results, model, metric, attributes):
    return [summary(results["models"][seed][model]["hits"], attributes)[metric] for seed in results["models"]
            if model in results["models"][seed]]


def _pooled(results, model, metric, attributes):
    """Per-sample outcome (%) averaged over the seeds that ran `model`: the input of the bootstrap."""
    rows = []
    for seed in results["models"]:
        if model in results["models"][seed]:
            hits = results["models"][seed][model]["hits"]
            if metric.startswith("zs_") and metric[3:] in ("mean", "easy", "hard"):
                from clipmoe.cli.experiment import ZS_EASY
                names = {"mean": attributes, "easy": ZS_EASY,
                         "hard": [a for a in attributes if a not in ZS_EASY]}[metric[3:]]
                rows.append(np.mean([hits[f"zs_{a}"] for a in names], axis=0))
            else:
                rows.append(hits[metric].astype(float))
    return 100.0 * np.mean(rows, axis=0)


def report(results: dict, scale) -> str:
    from clipmoe.data.synthetic import SHIFT_ATTRIBUTES as attributes
    from clipmoe.eval.stats import bootstrap_interval, mean_std, paired_bootstrap
    labels = method_labels(scale)
    out = []

    def ms(model, metric):
        m, s = mean_std(_per_seed(results, model, metric, attributes))
        return f"{m:.1f} ± {s:.1f}"

    out.append(f"Main table: mean ± std over {scale.seeds} seeds, % on {scale.test_samples} held-out images; "
               f"retrieval with the full captions (the fine-tuning task); fine-tuning steps of batch "
               f"{scale.batch_size} in brackets")
    def params(model):
        p = results["models"][0][model]["parameters"]
        return f"{p['total'] / 1e6:.2f}/{p['active'] / 1e6:.2f}"

    out.append(_table(["method"] + [h for _, h in MAIN_METRICS] + ["params total/active (M)"],
                      [[labels[m]] + [ms(m, k) for k, _ in MAIN_METRICS] + [params(m)] for m in METHODS]))
    out.append(f"\nPaired bootstrap ({scale.bootstrap} resamples of the test images; per-sample outcomes averaged "
               f"over the seeds): difference A − B and its 95 % interval, in points")
    rows = []
    for a, b in COMPARISONS:
        cells = []
        for metric, _ in INTERVAL_METRICS:
            d, lo, hi = paired_bootstrap(_pooled(results, a, metric, attributes),
                                         _pooled(results, b, metric, attributes), num_resamples=scale.bootstrap)
            cells.append(f"{d:+.1f} [{lo:+.1f}, {hi:+.1f}]")
        rows.append([f"{labels[a]} − {labels[b]}"] + cells)
    out.append(_table(["A − B"] + [h for _, h in INTERVAL_METRICS], rows))

    stage_models = [f"stage{s}" for s in range(1, scale.num_experts)]
    zs_rows = [["base (expert 0)"] + [ms("base", f"zs_{a}") for a in attributes]]
    zs_rows += [[f"MCL stage {m[5:]} alone (expert {m[5:]})"] + [ms(m, f"zs_{a}") for a in attributes]
                for m in stage_models]
    zs_rows += [[labels[m]] + [ms(m, f"zs_{a}") for a in attributes] for m in METHODS[1:]]
    out.append("\nZero-shot top-1 per attribute (mean ± std over seeds; chance 33.3; the short pre-training "
               "captions name colour, size and position); MCL stage models of the stage-budget run")
    out.append(_table(["model"] + list(attributes), zs_rows))

    out.append("\nMCL clusterings of the stage-budget run (on the fine-tuning data, k = "
               f"{scale.clusters} per modality): ARI with the previous clustering, NMI of the image and the text "
               "clusters with each attribute (" + "/".join(attributes) + "); seed 0")
    rows, warnings = [], []
    for seed, clusterings in results["clusters"].items():
        for c in clusterings:
            if c["ari_previous"] is not None and c["ari_previous"] > ARI_WARNING:
                warnings.append(f"WARNING: seed {seed}: clusterings {c['clustering'] - 1} and {c['clustering']} agree "
                                f"(ARI {c['ari_previous']:.3f} > {ARI_WARNING}); stage {c['clustering'] + 1} "
                                f"samples the same negatives as stage {c['clustering']}")
    for c in results["clusters"].get(0, []):
        ari = "-" if c["ari_previous"] is None else f"{c['ari_previous']:.3f}"
        rows.append([c["clustering"], c["accumulated_clusters"], ari,
                     "/".join(f"{c['nmi_image'][a]:.2f}" for a in attributes),
                     "/".join(f"{c['nmi_text'][a]:.2f}" for a in attributes)])
    out.append(_table(["clustering (model)", "accumulated clusters", "ARI vs previous", "NMI image", "NMI text"],
                      rows))
    out.extend(warnings or [f"no two consecutive clusterings agree (ARI <= {ARI_WARNING} for every seed)"])

    out.append("\nRouting: share of tokens whose first choice is each expert, mean over layers and seeds, on the "
               "test evaluation (images, captions, prompts)")
    rows = []
    for m in ("dmu_stage", "dmu_compute", "control_stage", "wo_mcl_stage", "sparse_upcycling"):
        for tower in ("visual", "text"):
            shares = np.mean([results["models"][s][m]["routing"][tower] for s in results["models"]], axis=0)
            rows.append([labels[m], tower, " / ".join(f"{100 * x:.0f}" for x in shares)])
    out.append(_table(["model", "tower", "% per expert (0 = base FFN)"], rows))

    out.append(f"\nSweep (seed 0; routers on the first E − 1 stages of the stage-budget MCL run, {scale.router_steps} "
               f"steps each): value and 95 % bootstrap interval")
    rows = []
    for e in scale.sweep_experts:
        for k in scale.sweep_top_k:
            name = sweep_name(scale, e, k)
            if name is None:
                continue
            cells = []
            for metric in ("full_t2i_R@1", "full_i2t_R@1", "zs_mean"):
                m, lo, hi = bootstrap_interval(_pooled({"models": {0: results["models"][0]}}, name, metric,
                                                       attributes), num_resamples=scale.bootstrap)
                cells.append(f"{m:.1f} [{lo:.1f}, {hi:.1f}]")
            rows.append([e, k] + cells)
    out.append(_table(["experts", "top-k", "T2I R@1", "I2T R@1", "zero-shot mean"], rows))
    return "\n".join(out)


def sweep_name(scale, experts: int, top_k: int):
    if top_k > experts:
        return None
    return "dmu_stage" if (experts, top_k) == (scale.num_experts, scale.top_k) else f"sweep_e{experts}_k{top_k}"


def plot_sweep(results: dict, scale, path, metric: str = "full_t2i_R@1"):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from clipmoe.data.synthetic import SHIFT_ATTRIBUTES
    from clipmoe.eval.stats import bootstrap_interval
    fig, ax = plt.subplots(figsize=(6, 4))
    for k in scale.sweep_top_k:
        points = [(e, bootstrap_interval(_pooled({"models": {0: results["models"][0]}}, sweep_name(scale, e, k),
                                                 metric, SHIFT_ATTRIBUTES), num_resamples=scale.bootstrap))
                  for e in scale.sweep_experts if sweep_name(scale, e, k)]
        xs = [e for e, _ in points]
        (line,) = ax.plot(xs, [v[0] for _, v in points], marker="o", label=f"top-{k}")
        ax.fill_between(xs, [v[1] for _, v in points], [v[2] for _, v in points], alpha=0.2, color=line.get_color())
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(scale.sweep_experts), [str(e) for e in scale.sweep_experts])
    ax.set_xlabel("experts (base FFN + first E − 1 MCL stages)")
    ax.set_ylabel(f"{metric.replace('full_', 'full-caption ')} (%), held-out split")
    ax.set_title("clipmoe demo: experts x top-k (seed 0; bands: 95 % bootstrap)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save(results: dict, scale, table: str, out: Path):
    arrays = {f"seed{seed}/{model}/{metric}": v for seed, models in results["models"].items()
              for model, r in models.items() for metric, v in r["hits"].items()}
    np.savez_compressed(out / "hits.npz", **arrays)
    from clipmoe.data.synthetic import SHIFT_ATTRIBUTES
    light = {**results, "models": {
        seed: {model: {"metrics": summary(r["hits"], SHIFT_ATTRIBUTES), **{k: v for k, v in r.items() if k != "hits"}}
               for model, r in models.items()} for seed, models in results["models"].items()}}
    (out / "results.json").write_text(json.dumps(light, indent=1, default=str))
    (out / "results.md").write_text(table + "\n")
    plot_sweep(results, scale, out / "sweep.png")


def add_commands(sub):
    p = sub.add_parser("demo", help="the paper's comparison in miniature on synthetic data with a caption shift "
                                    "(base, direct fine-tune, sparse upcycling, w/o MCL, random-negative control, "
                                    "DMU at two budgets, experts x top-k sweep), printed as tables")
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu",
                   help="preset sizes: cpu (the demo, minutes on 2 cores) or tiny (a seconds-long smoke run)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (none: the preset's)")
    p.add_argument("--jobs", type=int, default=2,
                   help="worker processes (one torch thread each; the numbers do not depend on it)")
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--resume", action="store_true",
                   help="reuse the tasks an earlier run with the same preset saved in --output-dir/tasks")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args):
    scale = SCALES[args.scale]
    if args.seeds is not None:
        if args.seeds < 1:
            raise UsageError(f"--seeds must be >= 1, got {args.seeds}")
        scale = replace(scale, seeds=args.seeds)
    if args.jobs < 1:
        raise UsageError(f"--jobs must be >= 1, got {args.jobs}")
    out = Path(args.output_dir)
    start = time.time()
    print(f"clipmoe demo --scale {args.scale}: {scale.seeds} seeds, {args.jobs} processes of 1 torch thread; "
          f"recipe: label smoothing {scale.label_smoothing} in pre-training and fine-tuning, logit scale learned in "
          f"pre-training and then fixed at the base's value", flush=True)
    results = run_all(scale, out, jobs=args.jobs, resume=args.resume)
    scales = ", ".join(f"seed {s}: loss {p['final_loss']:.3f}, scale {p['logit_scale']:.1f}"
                       for s, p in sorted(results["pretrain"].items()))
    table = report(results, scale)
    header = (f"ShiftShapes: {scale.pretrain_samples} pre-training samples (short captions), "
              f"{scale.finetune_samples} NEW fine-tuning samples (full captions), {scale.test_samples} held-out; "
              f"pre-training {scale.pretrain_steps} steps ({scales})")
    text = header + "\n\n" + table
    print()
    print(text)
    save(results, scale, text, out)
    print(f"\nwritten: {out / 'results.md'}, results.json, hits.npz, sweep.png, logs/ "
          f"(wall time {time.time() - start:.0f} s; task seconds summed {sum(results['seconds'].values()):.0f})")
    return 0
