"""The measurements of the GPU check (bench/gpu_check.sh runs this after the build), in the order the README needs
them, within a time budget; one JSON of results, written after every phase so that a stopped run keeps what it had.

    python -m bench.gpu_check --json OUT.json [--budget-s S] [--dry-run] [--no-extension] [--warmup]

Phases, in order, with the seconds each is expected to take on one H200 (cold Triton cache: about 1.5 s per kernel
compile, ten kernel variants per tile config; do_bench 25 ms warm-up + 100 ms of repeats per measurement, 50 +
250 ms for the training shapes):
  training   ViT-L/14 layer at batch 256 (65,792 tokens), E 4, top-2, uniform routing: forward and forward+backward
             of every provider of bench/providers.py, with each one's peak memory. 128-row tiles: the triton
             rows load their weight tiles by TMA on sm_90 (CLIPMOE_TRITON_TMA=0 measures pointer loads).    40 s
  inference  ViT-B/16 batch 1 and 8, ViT-L/14 batch 1, text tower (ViT-B) batch 1, forward: eager and replayed
             as a CUDA graph (launch-bound shapes: the graph removes the launch gaps).                        25 s
  routing    E 8 uniform and E 4 skewed (Zipf) at the training shape, forward and forward+backward.          20 s
  e2e        a whole random-init ViT-B/16 CLIP, dense vs its E 4 top-2 upcycling on the naive and the triton
             backend: forward and one training step (bf16 autocast), batch 64. Needs open_clip (the wheels). 30 s
  encode     `clipmoe encode` throughput of the same models, dense vs upcycled on the torch and triton backends
             (bf16 autocast): encode_image of one batch of 256 (do_bench) and the whole pipeline (512 PNG files ->
             DataLoader, 8 workers -> float16 shards; median of 3 runs after a warm-up), in images/s.      10 s
  tuned      the training shape once more with the triton provider autotuned over its candidate configs
             instead of the pinned one (the table's "tuned" rows; about 30 extra compiles).                   60 s
A phase starts only while its expected time is left in the budget (a running autotune cannot be cut short); a
skipped phase is recorded with the reason.

Numbers: bf16, median and 20th/80th percentiles of triton.testing.do_bench (CUDA events, L2 flushed between
repeats); peak memory = the most memory one call allocated beyond what its inputs held. Tile configs are pinned per
shape (TILE_CONFIGS, through CLIPMOE_TRITON_CONFIG) so that compiles stay few; only the tuned phase autotunes. Every
provider's forward is checked against the naive loop in fp32 (TF32 off) before it is timed; a provider that fails
the check or raises is recorded with its error, never dropped.

--dry-run: the same phases on tiny shapes on the CPU under the Triton interpreter (TRITON_INTERPRET=1, fp32, each
run once, no timings kept): it finds a broken script before a GPU is there. --no-extension: clipmoe_kernels._C was
not built for CUDA, so nothing that would fall back to the host-synchronising routing (the triton and torch
providers, the triton backend) is measured. --warmup: compile the measured Triton kernels (one run of each, no
checks, no output); the shell script runs it beside the extension build, which leaves most cores idle.
"""
import argparse
import contextlib
import copy
import datetime
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from bench import configs, providers
from bench.configs import Case
from bench.utils import capture_cuda_graph, clip_train_step

TRAINING = ("vit_l14", 256)
INFERENCE = (("vit_b16", 1), ("vit_b16", 8), ("vit_l14", 1), ("text_b", 1))
ROUTING_VARIANTS = ((8, "uniform"), (4, "skewed"))
E2E_MODEL, E2E_BATCH, E2E_EXPERTS = "ViT-B-16", 64, 4
ENCODE_VARIANTS = ("dense", "torch", "triton")
ENCODE_BATCH, ENCODE_ITEMS, ENCODE_WORKERS, ENCODE_REPEATS = 256, 512, 8, 3
# Pinned tile configs (CLIPMOE_TRITON_CONFIG): wide output tiles where every expert has thousands of rows, narrow
# ones where few rows leave the 132 SMs short of programs. One config per regime: each is a set of compiles.
TILE_CONFIGS = {"large": "BLOCK_N=128,BLOCK_K=64,num_warps=8,num_stages=3",
                "small": "BLOCK_N=64,BLOCK_K=64,num_warps=4,num_stages=3"}
LARGE_ROWS_PER_EXPERT = 4096
USES_MOE_ALIGN = ("triton", "torch")  # providers whose routing metadata comes from the extension's moe_align
AUTOTUNE = "autotune"  # the tuned rows' config: CLIPMOE_TRITON_CONFIG unset
PHASE_SECONDS = {"training": 40, "inference": 25, "routing": 20, "e2e": 30, "encode": 10, "tuned": 60}
BENCH_MS = {"warmup": 25, "rep": 100}          # do_bench milliseconds: thousands of repeats of a small shape
BENCH_MS_LARGE = {"warmup": 50, "rep": 250}    # shapes over LARGE_FLOPS: 10-50 ms calls still get 5-25 repeats
LARGE_FLOPS = 1e11
E2E_BENCH_MS = {"warmup": 100, "rep": 400}
TINY_CLIP = dict(embed_dim=32, vision_cfg={"image_size": 32, "patch_size": 8, "width": 64, "layers": 1,
                                           "head_width": 32},
                 text_cfg={"context_length": 16, "vocab_size": 100, "width": 64, "heads": 2, "layers": 1})
SCHEMA = "clipmoe-gpu-check/1"


def tile_config(case) -> str:
    rows_per_expert = case.tokens * case.top_k / case.num_experts
    return TILE_CONFIGS["large" if rows_per_expert >= LARGE_ROWS_PER_EXPERT else "small"]


@contextlib.contextmanager
def pinned(config):
    """CLIPMOE_TRITON_CONFIG=config for the block (None: unset, i.e. autotune); restored afterwards."""
    old = os.environ.get("CLIPMOE_TRITON_CONFIG")
    if config is None:
        os.environ.pop("CLIPMOE_TRITON_CONFIG", None)
    else:
        os.environ["CLIPMOE_TRITON_CONFIG"] = config
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("CLIPMOE_TRITON_CONFIG", None)
        else:
            os.environ["CLIPMOE_TRITON_CONFIG"] = old


class Check:
    """State of one run: device, dtype, deadline, the results so far, and where they are written."""

    def __init__(self, args):
        self.dry_run, self.json_path = args.dry_run, args.json
        self.device = "cpu" if args.dry_run else "cuda"
        self.dtype = torch.float32 if args.dry_run else torch.bfloat16
        self.extension = not args.no_extension
        self.deadline = time.monotonic() + args.budget_s
        self.results = {"schema": SCHEMA, "dry_run": args.dry_run, "machine": machine_info(self.device),
                        "budget_s": args.budget_s, "phases": [], "layer": [], "e2e": [], "encode": []}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def case(self, tower, batch, experts=4, routing="uniform", mode="forward"):
        return Case(tower, batch, experts, routing, mode, tiny=self.dry_run)

    def save(self):
        if not self.json_path:
            return
        tmp = f"{self.json_path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.results, f, indent=1)
        os.replace(tmp, self.json_path)

    def unavailable(self, provider):
        """Why `provider` is not measured here, or None."""
        if provider in USES_MOE_ALIGN and not self.extension:
            return "not measured: clipmoe_kernels._C has no CUDA ops (build failed), the routing would fall back " \
                   "to the host-synchronising moe_align_ref"
        return None


def machine_info(device):
    import clipmoe_kernels
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "git": git_sha(), "ops": clipmoe_kernels.available_ops(), "device": device,
            "weight_loads": os.environ.get("CLIPMOE_TRITON_TMA") or "auto"}  # TMA or pointer loads (docs/kernels.md)
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    else:
        info["gpu"] = None
        info["cpu"] = platform.processor() or platform.machine()
    return info


def git_sha():
    """The commit measured: CLIPMOE_GIT_SHA when set (a copied tree may have no .git), else git's HEAD."""
    if os.environ.get("CLIPMOE_GIT_SHA"):
        return os.environ["CLIPMOE_GIT_SHA"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device, leaves=(), dry_run=False, bench_ms=BENCH_MS):
    """{median_ms, p20_ms, p80_ms} of `fn` (do_bench, CUDA events); a dry run calls it once and keeps no time."""
    if dry_run:
        fn()
        return {"median_ms": None, "p20_ms": None, "p80_ms": None}
    import triton.testing
    times = sorted(triton.testing.do_bench(fn, warmup=bench_ms["warmup"], rep=bench_ms["rep"],
                                           grad_to_none=list(leaves) or None, return_mode="all"))

    def q(p):
        return times[min(len(times) - 1, round(p * (len(times) - 1)))]
    return {"median_ms": q(0.5), "p20_ms": q(0.2), "p80_ms": q(0.8), "repeats": len(times)}


def peak_mib(fn, device, leaves=()):
    """MiB one call of `fn` allocated beyond what was allocated before it (None on the CPU: no counter)."""
    if device != "cuda":
        return None
    for t in leaves:
        t.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def graph_replay(fn):
    """`fn` captured in a CUDA graph (after two warm-up calls on a side stream); returns (replay, graph)."""
    graph, _ = capture_cuda_graph(fn)
    return graph.replay, graph


def short_error(exc) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return " ".join(text)[:400]


def run_recorded(check, rec, measure, reason=None):
    """`measure()` for a result record, unless `reason` (or a spent budget) skips it; an exception becomes the
    record's error (printed, and shown in the tables: nothing is dropped)."""
    if reason is None and check.left() <= 0:
        reason = "not measured: the time budget ran out"
    if reason is not None:
        rec.update(status="skipped", error=reason)
        return
    try:
        measure()
    except Exception as exc:
        rec.update(status="error", error=short_error(exc))
        traceback.print_exc()
    finally:
        if check.device == "cuda":
            torch.cuda.empty_cache()


def layer_record(check, phase, case, provider, graph, config):
    return {"phase": phase, "case": case.id, "tower": case.tower, "batch": case.batch, "tokens": case.tokens,
            "d_model": case.d_model, "hidden": case.hidden, "num_experts": case.num_experts, "top_k": case.top_k,
            "routing": case.routing, "mode": case.mode, "provider": provider, "graph": graph,
            "tile_config": config if provider == "triton" else None, "dtype": str(check.dtype).split(".")[-1],
            "flops": case.flops(), "status": "ok", "error": None, "median_ms": None, "p20_ms": None,
            "p80_ms": None, "peak_mib": None, "check_rel_err": None}


def measure_layer(check, phase, case, provider_names=providers.PROVIDERS, graphs=False, config=None,
                  reference=None):
    """Every provider on `case` (eager; then, where `graphs`, each as a CUDA graph: all eager rows are in before
    the first capture is tried), appended to the results."""
    config = tile_config(case) if config is None else config
    if reference is None:
        reference = providers.reference_output(case, check.device)
    for graph in (False, True) if graphs else (False,):
        for provider in provider_names:
            rec = layer_record(check, phase, case, provider, graph, config)
            check.results["layer"].append(rec)
            reason = check.unavailable(provider)
            if reason is None and graph and check.device != "cuda":
                reason = "not measured: CUDA graphs need a GPU"
            if reason is None and graph and provider in providers.HOST_SYNCING:
                reason = f"not capturable: {providers.HOST_SYNCING[provider]}"

            def measure(rec=rec, provider=provider, graph=graph):
                with pinned(None if config == AUTOTUNE else config):
                    run_provider(check, rec, provider, case, graph, reference)
            run_recorded(check, rec, measure, reason)
            if rec["status"] != "skipped":
                print_record(rec)


def run_provider(check, rec, provider, case, graph, reference):
    prepared = providers.prepare(provider, case, check.device, check.dtype, reference)
    rec["check_rel_err"] = prepared.check_err
    fn, graph_obj = prepared.run, None
    if graph:
        fn, graph_obj = graph_replay(prepared.run)  # replays allocate nothing: the eager row has the memory
    else:
        rec["peak_mib"] = peak_mib(fn, check.device, prepared.leaves)
    bench_ms = BENCH_MS_LARGE if case.flops() >= LARGE_FLOPS else BENCH_MS
    rec.update(time_ms(fn, check.device, prepared.leaves, check.dry_run, bench_ms))
    del graph_obj


def print_record(rec):
    where = f"{rec['case']}{' graph' if rec['graph'] else ''} {rec['provider']}"
    if rec["status"] != "ok":
        print(f"  {where}: {rec['status'].upper()}: {rec['error']}", flush=True)
        return
    timing = "run once (dry run)" if rec["median_ms"] is None else \
        f"{rec['median_ms']:.3f} ms [{rec['p20_ms']:.3f}, {rec['p80_ms']:.3f}]"
    extra = "" if rec["peak_mib"] is None else f", peak {rec['peak_mib']:.0f} MiB"
    err = "" if rec["check_rel_err"] is None else f", check {rec['check_rel_err']:.1e}"
    print(f"  {where}: {timing}{extra}{err}", flush=True)


def phase_training(check):
    reference = providers.reference_output(check.case(*TRAINING), check.device)  # the same for both modes
    for mode in configs.MODES:
        measure_layer(check, "training", check.case(*TRAINING, mode=mode), reference=reference)


def phase_inference(check):
    for tower, batch in INFERENCE:
        measure_layer(check, "inference", check.case(tower, batch), graphs=True)


def phase_routing(check):
    for experts, routing in ROUTING_VARIANTS:
        reference = providers.reference_output(check.case(*TRAINING, experts, routing), check.device)
        for mode in configs.MODES:
            measure_layer(check, "routing", check.case(*TRAINING, experts, routing, mode), reference=reference)


def phase_tuned(check):
    if check.dry_run:
        raise Skip("autotuning cannot run under the Triton interpreter")
    os.environ["TRITON_PRINT_AUTOTUNING"] = "1"  # the chosen configs go to the log (for a config cache)
    try:
        reference = providers.reference_output(check.case(*TRAINING), check.device)
        for mode in configs.MODES:
            measure_layer(check, "tuned", check.case(*TRAINING, mode=mode), ("triton",), config=AUTOTUNE,
                          reference=reference)
    finally:
        os.environ.pop("TRITON_PRINT_AUTOTUNING", None)
        # The chosen configs, in the format of clipmoe_kernels/tuned_configs.json: bench.fold_readme merges them
        # into the shipped one, which is committed, so later processes on this device start tuned (docs/kernels.md).
        from clipmoe_kernels.tuned_configs import save_tuned_configs
        save_tuned_configs(Path(check.json_path).with_name(Path(check.json_path).stem + "-tuned_configs.json"))


class Skip(Exception):
    """A phase that cannot run here, with the reason."""


def import_open_clip():
    try:
        import open_clip
    except ImportError as exc:
        raise Skip(f"open_clip is missing ({exc}): make the wheels with bash bench/gpu_wheels.sh and carry "
                   f"bench/wheels") from None
    return open_clip


def clip_pair(check, open_clip):
    """(dense random-init CLIP, its E2E_EXPERTS top-2 upcycling with copied experts, name), in eval mode: ViT-B/16,
    or a tiny CLIP in a dry run."""
    import clipmoe
    torch.manual_seed(0)
    if check.dry_run:
        dense, name = open_clip.CLIP(**TINY_CLIP).to(check.device), "tiny CLIP"
    else:
        dense, name = open_clip.create_model(E2E_MODEL, pretrained=None, device=check.device), E2E_MODEL
    dense.eval()
    return dense, clipmoe.upcycle(copy.deepcopy(dense), num_experts=E2E_EXPERTS, top_k=configs.TOP_K), name


def set_backend(model, backend):
    import clipmoe
    for m in model.modules():
        if isinstance(m, clipmoe.MoEFFN):
            m.backend = backend


def bf16_autocast(device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)


def image_tile_config(model, batch):
    """One pinned tile config for every MoE layer, chosen by the image tower's rows, so that a run compiles one."""
    tokens = batch * (model.visual.grid_size[0] * model.visual.grid_size[1] + 1)
    return TILE_CONFIGS["large" if tokens * configs.TOP_K / E2E_EXPERTS >= LARGE_ROWS_PER_EXPERT else "small"]


def phase_e2e(check):
    open_clip = import_open_clip()
    device = check.device
    dense, moe, name = clip_pair(check, open_clip)
    batch = 2 if check.dry_run else E2E_BATCH
    images = torch.randn(batch, 3, *dense.visual.image_size, device=device)
    texts = torch.randint(1, dense.vocab_size, (batch, dense.context_length), device=device)
    autocast = bf16_autocast(device)
    with torch.no_grad(), autocast:
        want = (dense.encode_image(images), dense.encode_text(texts))
    loss_fn = open_clip.ClipLoss()
    for variant in ("dense", "naive", "triton"):
        model = dense if variant == "dense" else moe
        set_backend(model, variant)
        for task in ("forward", "train_step"):
            rec = {"phase": "e2e", "model": name, "batch": batch, "experts": E2E_EXPERTS, "top_k": configs.TOP_K,
                   "variant": variant, "task": task, "status": "ok", "error": None, "median_ms": None,
                   "p20_ms": None, "p80_ms": None, "peak_mib": None, "check_rel_err": None, "tile_config": None}
            check.results["e2e"].append(rec)
            run_recorded(check, rec, functools.partial(run_e2e, check, rec, model, variant, task, images, texts, want,
                                                       autocast, loss_fn), check.unavailable(variant))
            print_e2e(rec)


def run_e2e(check, rec, model, variant, task, images, texts, want, autocast, loss_fn):
    rtol = 2e-2 if check.device == "cuda" else 1e-4
    config = image_tile_config(model, images.shape[0])
    if variant == "triton":
        rec["tile_config"] = config
    with pinned(config):
        model.eval()
        with torch.no_grad(), autocast:
            got = (model.encode_image(images), model.encode_text(texts))
        err = max(providers.relative_error(g.float(), w.float()) for g, w in zip(got, want, strict=True))
        rec["check_rel_err"] = err
        if not err <= rtol:
            raise AssertionError(f"{variant}: embeddings differ from the dense model's by {err:.2e} > {rtol:.0e}")
        if task == "forward":
            def run():
                with torch.no_grad(), autocast:
                    model(images, texts)
        else:
            model.train()
            run = clip_train_step(model, images, texts, loss_fn, lambda: autocast, moe=variant != "dense")
        rec["peak_mib"] = peak_mib(run, check.device)
        rec.update(time_ms(run, check.device, dry_run=check.dry_run, bench_ms=E2E_BENCH_MS))
        rec["items_per_s"] = None if rec["median_ms"] is None else images.shape[0] / rec["median_ms"] * 1e3


def print_outcome(where, rec, timings):
    """One line per record: its error or skip, the dry run's check, or `timings(rec)` and the check."""
    if rec["status"] != "ok":
        print(f"  {where}: {rec['status'].upper()}: {rec['error']}", flush=True)
    elif rec["median_ms"] is None:
        print(f"  {where}: run once (dry run), check {rec['check_rel_err']:.1e}", flush=True)
    else:
        print(f"  {where}: {timings(rec)}, check {rec['check_rel_err']:.1e}", flush=True)


def print_e2e(rec):
    print_outcome(f"{rec['model']} b{rec['batch']} {rec['task']} {rec['variant']}", rec, lambda r: (
        f"{r['median_ms']:.2f} ms, {r['items_per_s']:.0f} items/s, peak {r['peak_mib']:.0f} MiB"))


def phase_encode(check):
    """`clipmoe encode` throughput: the model's encode_image on one batch, then the whole pipeline over PNG files."""
    open_clip = import_open_clip()
    import numpy as np
    from PIL import Image

    from clipmoe.eval.encode import read_items
    dense, moe, name = clip_pair(check, open_clip)
    preprocess = open_clip.image_transform(dense.visual.image_size, is_train=False)
    batch, count = (2, 3) if check.dry_run else (ENCODE_BATCH, ENCODE_ITEMS)
    autocast = bf16_autocast(check.device)
    with tempfile.TemporaryDirectory(prefix="clipmoe-encode-") as tmp:
        rng = np.random.default_rng(0)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(f"{tmp}/{i:05d}.png")
        items = read_items(tmp)
        images = torch.stack([preprocess(Image.open(item["image"]).convert("RGB")) for item in items]).to(check.device)
        with torch.inference_mode(), autocast:
            want = torch.nn.functional.normalize(dense.encode_image(images).float(), dim=-1)
        for variant in ENCODE_VARIANTS:
            model = dense if variant == "dense" else moe
            set_backend(model, variant)
            rec = {"phase": "encode", "model": name, "batch": batch, "items": count, "experts": E2E_EXPERTS,
                   "top_k": configs.TOP_K, "variant": variant, "status": "ok", "error": None, "check_rel_err": None,
                   "tile_config": None, "median_ms": None, "p20_ms": None, "p80_ms": None, "items_per_s": None,
                   "pipeline_s": [], "pipeline_items_per_s": None, "workers": 0 if check.dry_run else ENCODE_WORKERS}
            check.results["encode"].append(rec)
            run_recorded(check, rec, functools.partial(run_encode, check, rec, model, variant, items, images, want,
                                                       preprocess, autocast, Path(tmp)), check.unavailable(variant))
            print_encode(rec)


def run_encode(check, rec, model, variant, items, images, want, preprocess, autocast, tmp):
    from clipmoe.eval.encode import encode_dataset, read_shards
    rtol = 2e-2 if check.device == "cuda" else 1e-4
    config = rec["tile_config"] = image_tile_config(model, rec["batch"]) if variant == "triton" else None
    runs = iter(range(1000))

    def pipeline():
        out = tmp / f"out-{variant}-{next(runs)}"  # a fresh folder: nothing to resume
        encode_dataset(model, items, preprocess, None, out, settings={"model": variant}, shard_size=len(items),
                       batch_size=rec["batch"], num_workers=rec["workers"], device=check.device,
                       dtype="float32" if check.dry_run else "float16", amp_dtype=torch.bfloat16)
        synchronize(check.device)
        return out

    def forward():
        with torch.inference_mode(), autocast:
            model.encode_image(images[:rec["batch"]])

    with pinned(config):
        rows = torch.from_numpy(read_shards(pipeline())["image"]).float()  # also the pipeline's warm-up
        err = providers.relative_error(rows, want)  # float16 rows of the bf16 model against the dense model's
        rec["check_rel_err"] = err
        if not err <= rtol:
            raise AssertionError(f"{variant}: encoded rows differ from the dense model's by {err:.2e} > {rtol:.0e}")
        rec.update(time_ms(forward, check.device, dry_run=check.dry_run, bench_ms=E2E_BENCH_MS))
        rec["items_per_s"] = rec["median_ms"] and rec["batch"] / rec["median_ms"] * 1e3
        seconds = []
        for _ in range(1 if check.dry_run else ENCODE_REPEATS):
            start = time.perf_counter()
            pipeline()
            seconds.append(time.perf_counter() - start)
        if not check.dry_run:  # a dry run keeps no timings
            rec.update(pipeline_s=seconds, pipeline_items_per_s=len(items) / statistics.median(seconds))


def print_encode(rec):
    print_outcome(f"encode {rec['model']} {rec['variant']}", rec, lambda r: (
        f"encode_image b{r['batch']} {r['median_ms']:.2f} ms ({r['items_per_s']:.0f} images/s); pipeline "
        f"{r['items']} images {r['pipeline_items_per_s']:.0f} images/s "
        f"(runs {', '.join(f'{t:.2f}' for t in r['pipeline_s'])} s)"))


PHASES = (("training", phase_training), ("inference", phase_inference), ("routing", phase_routing),
          ("e2e", phase_e2e), ("encode", phase_encode), ("tuned", phase_tuned))


def run_phases(check):
    for name, phase in PHASES:
        expected = PHASE_SECONDS[name]
        entry = {"name": name, "expected_s": expected, "wall_s": None, "status": "ok", "note": None}
        check.results["phases"].append(entry)
        left = check.left()
        if left < expected and not check.dry_run:
            entry.update(status="skipped", note=f"{left:.0f} s left of the budget, the phase expects {expected} s")
            print(f"== phase {name}: SKIPPED ({entry['note']})", flush=True)
            check.save()
            continue
        print(f"== phase {name} (expected {expected} s, {left:.0f} s left)", flush=True)
        start = time.monotonic()
        try:
            phase(check)
        except Skip as skip:
            entry.update(status="skipped", note=str(skip))
            print(f"   SKIPPED: {skip}", flush=True)
        except Exception as exc:
            entry.update(status="error", note=short_error(exc))
            traceback.print_exc()
        entry["wall_s"] = round(time.monotonic() - start, 1)
        print(f"== phase {name}: {entry['wall_s']} s", flush=True)
        check.save()


def failures(results):
    """Measurements and phases that errored (skips are not failures: they say why in the table)."""
    bad = [p for p in results["phases"] if p["status"] == "error"]
    bad += [r for r in results["layer"] + results["e2e"] + results["encode"] if r["status"] == "error"]
    return bad


def warmup(check):
    """One forward+backward of the triton provider per measured shape and config: fills Triton's disk cache."""
    cases = [check.case(*TRAINING, mode="forward_backward"), check.case(INFERENCE[0][0], INFERENCE[0][1])]
    cases += [check.case(*TRAINING, e, r, "forward_backward") for e, r in ROUTING_VARIANTS]
    for case in cases:
        for mode in ("forward", "forward_backward"):
            c = Case(case.tower, case.batch, case.num_experts, case.routing, mode, tiny=case.tiny)
            with pinned(tile_config(c)):
                providers.prepare("triton", c, check.device, check.dtype).run()
    synchronize(check.device)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="results JSON to write (rewritten after every phase)")
    parser.add_argument("--budget-s", type=float, default=sum(PHASE_SECONDS.values()),
                        help="seconds for all phases; a phase starts only while its expected time is left")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, Triton interpreter")
    parser.add_argument("--no-extension", action="store_true",
                        help="the extension has no CUDA ops: measure nothing that would use the host-sync fallback")
    parser.add_argument("--warmup", action="store_true", help="only compile the measured Triton kernels")
    args = parser.parse_args(argv)
    if args.budget_s <= 0:
        parser.error(f"--budget-s must be > 0, got {args.budget_s}")
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    elif not torch.cuda.is_available():
        print("FAILED: no CUDA device (use --dry-run on a machine without one)", file=sys.stderr)
        return 2
    check = Check(args)
    if args.warmup:
        warmup(check)
        return 0
    torch.manual_seed(0)
    run_phases(check)
    check.save()
    bad = failures(check.results)
    for b in bad:
        print(f"ERROR: {b.get('name') or b.get('case') or b.get('model')} {b.get('provider') or b.get('variant') or ''}"
              f": {b.get('note') or b.get('error')}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
