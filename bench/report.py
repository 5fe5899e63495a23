"""Turn a pytest-benchmark JSON of the clipmoe suite into Markdown tables and a PNG plot.

    python -m bench.report bench/results/<file>.json [--plot out.png] [--summary]

Per group (one shape, providers side by side): median and IQR in ms, speed-up over `naive` (naive median / median),
share of the `dense_equal_flops` bound (dense median / median), TFLOP/s (expert FLOPs 4·T·k·D·F forward, three times
that forward+backward, as defined in bench/configs.py), peak CUDA memory; end-to-end groups give items/s. Tests that
failed or were skipped are listed, never dropped. The plot: one panel per tower and mode, median time against
tokens, a line per provider with its interquartile band, the bound (dense_equal_flops) dashed.
"""
import argparse
import json
import math
from collections import OrderedDict


def _fmt(x, spec):
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def load(path):
    with open(path) as f:
        data = json.load(f)
    groups = OrderedDict()
    for b in data["benchmarks"]:
        groups.setdefault(b["group"], []).append(b)
    return data, groups


def group_rows(benches):
    medians = {b["extra_info"]["provider"]: b["stats"]["median"] for b in benches}
    naive = medians.get("naive", medians.get("moe_naive"))  # layer groups / end-to-end groups
    dense = medians.get("dense_equal_flops", medians.get("dense"))
    rows = []
    for b in benches:
        info, stats = b["extra_info"], b["stats"]
        median = stats["median"]
        peak = info.get("peak_mem_bytes")
        rows.append({
            "provider": info["provider"],
            "median_ms": median * 1e3,
            "iqr_ms": stats["iqr"] * 1e3,
            "vs_naive": naive / median if naive else None,
            "vs_dense": dense / median if dense else None,
            "tflops": info["flops"] / median / 1e12 if "flops" in info else None,
            "items_per_s": info["items"] / median if "items" in info else None,
            "peak_mib": peak / 2**20 if peak else None,
        })
    return rows


def markdown(data, groups) -> str:
    m = data["machine_info"]
    lines = [f"Machine: {m.get('gpu') or m.get('cpu', {}).get('brand_raw', 'cpu')}, torch {m.get('torch')}, "
             f"triton {m.get('triton')}, {m.get('torch_threads')} threads, git {str(m.get('git_sha'))[:10]}, "
             f"{data.get('datetime', '')[:19]}", ""]
    for group, benches in groups.items():
        rows = sorted(group_rows(benches), key=lambda r: r["median_ms"])
        e2e = benches[0]["extra_info"].get("kind") == "e2e"
        lines.append(f"**{group}**")
        lines.append("")
        if e2e:
            lines += ["| variant | median ms | IQR ms | items/s | vs moe_naive | vs dense | peak MiB |",
                      "|---|---:|---:|---:|---:|---:|---:|"]
            for r in rows:
                lines.append(f"| {r['provider']} | {r['median_ms']:.1f} | {r['iqr_ms']:.1f} | "
                             f"{_fmt(r['items_per_s'], '.1f')} | {_fmt(r['vs_naive'], '.2f')}x | "
                             f"{_fmt(r['vs_dense'], '.2f')} | {_fmt(r['peak_mib'], '.0f')} |")
        else:
            lines += ["| provider | median ms | IQR ms | vs naive | vs dense_equal_flops | TFLOP/s | peak MiB |",
                      "|---|---:|---:|---:|---:|---:|---:|"]
            for r in rows:
                lines.append(f"| {r['provider']} | {r['median_ms']:.2f} | {r['iqr_ms']:.2f} | "
                             f"{_fmt(r['vs_naive'], '.2f')}x | {_fmt(r['vs_dense'], '.2f')} | "
                             f"{_fmt(r['tflops'], '.3f')} | {_fmt(r['peak_mib'], '.0f')} |")
        lines.append("")
    not_timed = data.get("not_timed", [])
    if not_timed:
        lines += ["**Not timed** (failed or skipped)", ""]
        lines += [f"- `{t['test']}`: {t['outcome']}: {str(t['reason']).strip().splitlines()[-1][:160]}"
                  for t in not_timed]
    return "\n".join(lines)


def summary(groups) -> str:
    """One row per group: each provider's median (ms) and its speed-up over naive, side by side."""
    providers = ("naive", "torch", "triton", "dense_equal_flops")
    lines = ["| shape (tokens, experts, routing, mode) | " + " | ".join(providers) + " |",
             "|---|" + "---:|" * len(providers)]
    e2e = []
    for group, benches in groups.items():
        rows = {r["provider"]: r for r in group_rows(benches)}
        if benches[0]["extra_info"].get("kind") == "e2e":
            e2e.append((group, rows))
            continue
        cells = [f"{rows[p]['median_ms']:.1f} ({rows[p]['vs_naive']:.2f}x)" if p in rows and rows[p]["vs_naive"]
                 else f"{rows[p]['median_ms']:.1f}" if p in rows else "–" for p in providers]
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    if e2e:
        variants = ("dense", "moe_naive", "moe_torch", "moe_triton")
        lines += ["", "| end to end (items/s) | " + " | ".join(variants) + " |", "|---|" + "---:|" * len(variants)]
        for group, rows in e2e:
            lines.append(f"| {group} | " + " | ".join(
                f"{rows[v]['items_per_s']:.1f}" if v in rows else "–" for v in variants) + " |")
    return "\n".join(lines)


BOUND_PROVIDERS = ("bound", "dense_equal_flops")  # drawn dashed: what a MoE layer of that shape can approach


def bench_points(groups):
    """Layer medians of a pytest-benchmark JSON as plot_lines points (E 4, uniform routing; seconds -> ms)."""
    points = []
    for benches in groups.values():
        for b in benches:
            info, stats = b["extra_info"], b["stats"]
            if info.get("kind") == "layer" and info.get("num_experts") == 4 and info.get("routing") == "uniform":
                points.append({"tower": info["tower"], "mode": info["mode"], "tokens": info["tokens"],
                               "provider": info["provider"], "median": stats["median"] * 1e3,
                               "lo": stats["q1"] * 1e3, "hi": stats["q3"] * 1e3})
    return points


def plot_lines(points, path, title="clipmoe MoE FFN layer"):
    """Small multiples: one panel per tower (columns) and mode (rows), time (ms, log) against tokens (log), one
    line per provider with its spread band (lo..hi), the bound dashed. Returns the path, or None with no points."""
    if not points:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    towers = sorted({p["tower"] for p in points})
    modes = [m for m in ("forward", "forward_backward") if any(p["mode"] == m for p in points)]
    providers = sorted({p["provider"] for p in points}, key=lambda name: (name in BOUND_PROVIDERS, name))
    colors = {name: f"C{i}" for i, name in enumerate(providers)}
    fig, axes = plt.subplots(len(modes), len(towers), figsize=(3.2 * len(towers) + 1, 2.8 * len(modes) + 0.8),
                             squeeze=False, sharey="row")
    for i, mode in enumerate(modes):
        for j, tower in enumerate(towers):
            ax = axes[i][j]
            for name in providers:
                pts = sorted((p for p in points if p["tower"] == tower and p["mode"] == mode
                              and p["provider"] == name), key=lambda p: p["tokens"])
                if not pts:
                    continue
                x = [p["tokens"] for p in pts]
                bound = name in BOUND_PROVIDERS
                ax.plot(x, [p["median"] for p in pts], "--" if bound else "-", marker="o", markersize=3,
                        color="black" if bound else colors[name], label=name, linewidth=1.2)
                if not bound:
                    ax.fill_between(x, [p["lo"] for p in pts], [p["hi"] for p in pts], color=colors[name],
                                    alpha=0.2, linewidth=0)
            ax.set_xscale("log")
            ax.set_yscale("log")
            for axis in (ax.xaxis, ax.yaxis):
                axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                axis.set_major_formatter(plain)
                axis.set_minor_formatter(NullFormatter())
            ax.grid(True, which="both", linewidth=0.3, alpha=0.5)
            ax.set_title(f"{tower}, {mode.replace('_', '+')}", fontsize=9)
            if i == len(modes) - 1:
                ax.set_xlabel("tokens")
            if j == 0:
                ax.set_ylabel("median ms (band: spread)")
    handles = {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, h)
    fig.legend(list(handles.values()), list(handles), loc="upper right", fontsize=8, ncol=len(handles))
    fig.suptitle(f"{title} (E 4, top-2, uniform routing)", fontsize=10, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json_file")
    parser.add_argument("--plot", default=None, help="PNG path (default: the JSON path with .png)")
    parser.add_argument("--summary", action="store_true",
                        help="one compact table: provider medians in ms (speed-up over naive) per group")
    args = parser.parse_args(argv)
    data, groups = load(args.json_file)
    print(summary(groups) if args.summary else markdown(data, groups))
    out = plot_lines(bench_points(groups), args.plot or args.json_file.rsplit(".", 1)[0] + ".png")
    if out:
        print(f"\nplot: {out}")


if __name__ == "__main__":
    main()
