"""Scale benchmark of MCL on webdataset shards (a script, not a timed test): peak RSS per rank and wall time of
`clipmoe mcl --max-steps 1` on synthetic 224-px JPEG shards at several sizes, on one and two ranks (torchrun,
gloo, CPU), plus the offset index (build time, bytes) and the k-means on one rank's share of a 1.2 M-pair set.

    PYTHONPATH=$PWD python bench/scale_mcl.py                       # 1k, 4k, 16k samples; 1 and 2 ranks
    PYTHONPATH=$PWD python bench/scale_mcl.py --sizes 1000 4000 --ranks 1 --code /path/to/other/checkout

Memory growth per sample = the least-squares slope of peak RSS (max over ranks) against the number of samples, i.e.
what the data adds per sample on top of the fixed cost (torch, the model); `--render FILE.json` recomputes it and
rewrites the .md of an earlier run. Writes bench/results/scale-<date>.json
and .md. The model is clipmoe-tiny (the cost measured is the data pipeline's, not the model's).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MCL_ARGS = ["mcl", "--model", "clipmoe-tiny", "--stages", "1", "--max-steps", "1", "--batch-size", "64",
            "--warmup", "1", "--device", "cpu", "--workers", "0", "--small-cluster", "remainder"]


def peak_rss_kb() -> int:
    """This process's peak RSS (VmHWM: per address space, so not inherited across exec as ru_maxrss can be)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def child(report: str, args) -> int:
    """Run one `clipmoe` command in this process, then record this rank's peak RSS."""
    from clipmoe.cli import main

    code = main(args)
    rank = os.environ.get("RANK", "0")
    with open(f"{report}.rank{rank}", "w") as f:
        json.dump({"rank": int(rank), "peak_rss_kb": peak_rss_kb()}, f)
    return code


def make_shards(directory: Path, n: int) -> str:
    """n samples of clipmoe's synthetic data at 224 px with pixel noise (sigma 12), JPEG quality 98: about 40 KiB
    per image, as web photos are (the noise-free renders compress to 6 KiB), 1000 samples per shard."""
    import io

    import numpy as np
    import webdataset as wds
    from PIL import Image

    from clipmoe.data.synthetic import SyntheticShapes

    pattern_file = directory / "pattern.txt"
    if pattern_file.exists():
        return pattern_file.read_text()
    data = SyntheticShapes(n, seed=0, image_size=224)
    rng = np.random.default_rng(0)
    shards = -(-n // 1000)
    with wds.ShardWriter(str(directory / "train-%06d.tar"), maxcount=1000, verbose=0) as sink:
        for i in range(n):
            pixels = np.asarray(data.image(i), dtype=np.float32) + rng.normal(0, 12, (224, 224, 3))
            buf = io.BytesIO()
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=98)
            sink.write({"__key__": f"{i:09d}", "jpg": buf.getvalue(), "txt": data.captions[i]})
    pattern = str(directory / (f"train-{{000000..{shards - 1:06d}}}.tar" if shards > 1 else "train-000000.tar"))
    pattern_file.write_text(pattern)
    return pattern


def drop_indexes(directory: Path) -> None:
    for path in directory.glob("*.idx.npz"):
        path.unlink()


def run_mcl(pattern: str, ranks: int, work: Path, code: Path, repeat: int) -> dict:
    """The run `repeat` times (cold index each time): the smallest peak RSS and wall time (less allocator noise)."""
    runs = [run_mcl_once(pattern, ranks, work, code) for _ in range(repeat)]
    return {"wall_s": min(r["wall_s"] for r in runs),
            "peak_rss_mb_per_rank": min((r["peak_rss_mb_per_rank"] for r in runs), key=max), "repeats": repeat}


def run_mcl_once(pattern: str, ranks: int, work: Path, code: Path) -> dict:
    drop_indexes(Path(pattern).parent)
    out = Path(tempfile.mkdtemp(dir=work))
    report = str(out / "rss")
    script = [str(Path(__file__).resolve()), "--child", report, "--"]
    cmd = [sys.executable, *script] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), *script]
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    result = subprocess.run([*cmd, *MCL_ARGS, "--train-data", pattern, "--output-dir", str(out / "run")], env=env,
                            capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode:
        raise RuntimeError(f"mcl failed ({result.returncode}):\n{result.stderr[-3000:]}")
    rss = [json.loads(Path(f"{report}.rank{r}").read_text())["peak_rss_kb"] for r in range(ranks)]
    shutil.rmtree(out)
    return {"wall_s": round(wall, 2), "peak_rss_mb_per_rank": [round(kb / 1024, 1) for kb in rss]}


def index_cost(pattern: str, directory: Path) -> dict:
    from clipmoe.data.shards import ShardCaptionDataset

    drop_indexes(directory)
    start = time.perf_counter()
    data = ShardCaptionDataset(pattern)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    ShardCaptionDataset(pattern)
    warm = time.perf_counter() - start
    disk = sum(p.stat().st_size for p in directory.glob("*.idx.npz"))
    shards = sum(p.stat().st_size for p in directory.glob("*.tar"))
    return {"samples": len(data), "build_s": round(cold, 3), "load_s": round(warm, 4), "index_disk_bytes": disk,
            "index_memory_bytes": data.index_bytes, "shard_bytes": shards}


def kmeans_cost(rows: int, dim: int = 768, k: int = 3) -> dict:
    """The k-means of one MCL clustering on one rank's fp16 features (image and text: two runs)."""
    import torch
    import torch.nn.functional as F

    from clipmoe.train.cluster import cluster_stage

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(k, dim, generator=g), dim=1)
    image = F.normalize(centres[torch.randint(k, (rows,), generator=g)] + torch.randn(rows, dim, generator=g) /
                        dim ** 0.5, dim=1).half()
    text = F.normalize(image.float() + 0.5 * torch.randn(rows, dim, generator=g) / dim ** 0.5, dim=1).half()
    start = time.perf_counter()
    cluster_stage(image, text, k=k, seed=0)
    return {"rows": rows, "dim": dim, "k": k, "threads": 1, "seconds": round(time.perf_counter() - start, 2),
            "features_mb": round(2 * image.numel() * image.element_size() / 2 ** 20, 1)}


def growth(runs) -> dict:
    """Memory growth per sample per rank (KiB): the least-squares slope of peak RSS (max over ranks) against the
    samples, per rank count (allocator noise of a few tens of MiB per run makes a two-point slope unreliable)."""
    out = {}
    for ranks in sorted({r["ranks"] for r in runs}):
        points = [(r["samples"], max(r["peak_rss_mb_per_rank"])) for r in runs if r["ranks"] == ranks]
        if len({n for n, _ in points}) < 2:
            continue
        mean_n = sum(n for n, _ in points) / len(points)
        mean_m = sum(m for _, m in points) / len(points)
        slope = (sum((n - mean_n) * (m - mean_m) for n, m in points) /
                 sum((n - mean_n) ** 2 for n, _ in points))  # MiB per sample
        out[str(ranks)] = round(slope * 1024, 2)
    return out


def markdown(record: dict) -> str:
    lines = [f"Machine: {record['machine']}; git {record['git']}; {record['date']}", "",
             f"`clipmoe mcl {' '.join(MCL_ARGS[1:])}` on synthetic 224-px JPEG shards (about 40 KiB per image, "
             f"1000 samples per shard), the shard index (where the code has one) built in the run; smallest of "
             f"{record['runs'][0]['repeats']} runs; code: {record['code']}", "",
             "| samples | ranks | wall s | peak RSS MiB per rank (max) |", "|---:|---:|---:|---:|"]
    for row in record["runs"]:
        lines.append(f"| {row['samples']} | {row['ranks']} | {row['wall_s']} | {max(row['peak_rss_mb_per_rank'])} |")
    lines += ["", "| ranks | memory growth per sample per rank (KiB; least-squares slope over the sizes) |",
              "|---:|---:|"]
    for ranks, kib in record["growth_kib_per_sample"].items():
        lines.append(f"| {ranks} | {kib} |")
    if record["index"]:
        lines += ["", "Offset index (one process, cold build then cached load):", "",
                  "| samples | build s | load s | index on disk | index in memory | shards |",
                  "|---:|---:|---:|---:|---:|---:|"]
    for row in record["index"]:
        lines.append(f"| {row['samples']} | {row['build_s']} | {row['load_s']} | {row['index_disk_bytes']} B | "
                     f"{row['index_memory_bytes']} B | {row['shard_bytes'] / 2 ** 20:.0f} MiB |")
    if record.get("kmeans"):
        km = record["kmeans"]
        lines += ["", f"k-means of one MCL clustering (image + text, k={km['k']}) on {km['rows']} fp16 rows of "
                      f"{km['dim']} features ({km['features_mb']} MiB; one rank's share of 1.2 M on 8 ranks), "
                      f"{km['threads']} CPU thread: {km['seconds']} s"]
    return "\n".join(lines) + "\n"


def main() -> int:
    if "--child" in sys.argv:
        i = sys.argv.index("--child")  # clipmoe comes from PYTHONPATH (--code)
        return child(sys.argv[i + 1], sys.argv[sys.argv.index("--") + 1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--work", default=None, help="folder for the shards (kept between runs)")
    parser.add_argument("--code", default=str(ROOT), help="the checkout whose clipmoe runs (PYTHONPATH)")
    parser.add_argument("--repeat", type=int, default=2, help="runs per case; the smallest peak is reported")
    parser.add_argument("--kmeans-rows", type=int, default=150_000, help="0 skips the k-means row")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / f"scale-{date.today().isoformat()}"))
    parser.add_argument("--render", default=None, help="only recompute and rewrite the .md of this .json")
    args = parser.parse_args()
    if args.render:
        record = json.loads(Path(args.render).read_text())
        record["growth_kib_per_sample"] = growth(record["runs"])
        Path(args.render).write_text(json.dumps(record, indent=1) + "\n")
        Path(args.render).with_suffix(".md").write_text(markdown(record))
        print(markdown(record))
        return 0
    sys.path.insert(0, str(ROOT))
    work = Path(args.work or tempfile.mkdtemp(prefix="clipmoe-scale-"))
    import platform

    import torch
    git = subprocess.run(["git", "-C", args.code, "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip()
    record = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
                         f"{torch.__version__}", "git": git, "date": date.today().isoformat(), "code": args.code,
              "runs": [], "index": []}
    for n in args.sizes:
        directory = work / f"n{n}"
        directory.mkdir(parents=True, exist_ok=True)
        pattern = make_shards(directory, n)
        for ranks in args.ranks:
            row = {"samples": n, "ranks": ranks, **run_mcl(pattern, ranks, work, Path(args.code), args.repeat)}
            print(json.dumps(row), flush=True)
            record["runs"].append(row)
        if args.code == str(ROOT):
            record["index"].append(index_cost(pattern, directory))
            print(json.dumps(record["index"][-1]), flush=True)
    record["growth_kib_per_sample"] = growth(record["runs"])
    if args.kmeans_rows and args.code == str(ROOT):
        record["kmeans"] = kmeans_cost(args.kmeans_rows)
    Path(args.out + ".json").write_text(json.dumps(record, indent=1) + "\n")
    Path(args.out + ".md").write_text(markdown(record))
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
