"""Turn a pytest-benchmark JSON of the clipmoe suite into Markdown tables and a PNG plot.

    python -m bench.report bench/results/<file>.json [--plot out.png] [--summary]

Per group (one shape, providers side by side): median and IQR in ms, speed-up over `naive` (naive median / median),
share of the `dense_equal_flops` bound (dense median / median), TFLOP/s (expert FLOPs 4·T·k·D·F forward, three times
that forward+backward, as defined in bench/configs.py), peak CUDA memory; end-to-end groups give items/s. Tests that
failed or were skipped are listed, never dropped.
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


def plot(groups, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    layer = [(g, group_rows(b)) for g, b in groups.items() if b[0]["extra_info"].get("kind") != "e2e"]
    if not layer:
        return None
    providers = sorted({r["provider"] for _, rows in layer for r in rows})
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(layer) * len(providers) + 1.5))
    height = 0.8 / len(providers)
    for i, provider in enumerate(providers):
        ys, xs = [], []
        for j, (_, rows) in enumerate(layer):
            r = next((r for r in rows if r["provider"] == provider), None)
            if r and r["vs_naive"]:
                ys.append(j + i * height)
                xs.append(r["vs_naive"])
        ax.barh(ys, xs, height=height, label=provider)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks([j + 0.4 - height / 2 for j in range(len(layer))], [g for g, _ in layer], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up over the naive per-expert loop (naive median / median)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
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
    out = plot(groups, args.plot or args.json_file.rsplit(".", 1)[0] + ".png")
    if out:
        print(f"\nplot: {out}")


if __name__ == "__main__":
    main()
