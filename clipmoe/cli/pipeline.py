"""The pipeline sub-commands of `clipmoe`: mcl, build, train-router, upcycle (all stages), finetune (baselines).

Every command runs as one process or under torchrun (DDP; nccl on GPUs, gloo on CPU). One output folder holds one
run (a non-empty one needs --resume or --overwrite); its layout:
  <out>/args.json                       the run's resolved arguments and data fingerprint (checked by --resume)
  <out>/mcl/stage_{s}/ffn.safetensors   FFNs of stage s (stage 0 = the base model)
  <out>/mcl/stage_{s}/metrics.jsonl     per-step metrics; train_state.pt: the resumable checkpoint
  <out>/mcl/labels_{s}.pt               accumulated cluster labels after clustering s
  <out>/mcl/pipeline.jsonl              per-stage cluster counts and dropped samples
  <out>/mcl/mcl_run.json                the run record: run id, labels and stages done (what `build` uses)
  <out>/clip_moe/                       the assembled model (clipmoe_model.safetensors + clipmoe_config.json)
  <out>/router/                         router-training metrics and resumable checkpoint
  <out>/final/                          the router-trained CLIP-MoE (same two files)
The training flags are generated from TrainConfig and MoEConfig (TRAIN_FLAGS, RUN_FLAGS, MOE_FLAGS): one place.
"""
import argparse
import hashlib
import logging
import os
import time
from pathlib import Path

import torch

import clipmoe
from clipmoe.checkpoint import load_checkpoint, save_checkpoint
from clipmoe.cli.common import (
    ConfigFlag,
    UsageError,
    add_config_flags,
    check_output_dir,
    check_resume,
    config_from_args,
    device_arg,
    logit_scale_arg,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
    remove_outputs,
    run_record,
    write_args_json,
)
from clipmoe.config import MoEConfig
from clipmoe.fileio import atomic_torch_save
from clipmoe.models import create_model
from clipmoe.train.distributed import DEFAULT_TIMEOUT_SECONDS, barrier, init_distributed, sum_over_ranks
from clipmoe.train.dmu import (
    BASELINES,
    START_FROM,
    build_clip_moe,
    finetune_baseline,
    recorded_stage_ffns,
    run_mcl,
    train_router,
)
from clipmoe.train.loop import AUTO, PRECISIONS, TrainConfig

logger = logging.getLogger(__name__)
SYNTHETIC_DEFAULT_SIZE = 4096

# Flags of a training phase (upcycle and finetune have a second, router phase with the prefix "router-").
TRAIN_FLAGS = (
    ConfigFlag("lr", "lr", "AdamW learning rate", {"type": positive_float}),
    ConfigFlag("wd", "weight_decay", "AdamW weight decay", {"type": non_negative_float}),
    ConfigFlag("epochs", "epochs", "epochs", {"type": positive_int}),
    ConfigFlag("max-steps", "max_steps", "stop after this many steps (overrides the epochs)", {"type": positive_int}),
    ConfigFlag("warmup", "warmup_steps", "linear warm-up steps, then cosine decay to 0", {"type": non_negative_int}),
)
# Flags shared by every phase of a run: the recipe and the run's mechanics.
RUN_FLAGS = (
    ConfigFlag("batch-size", "batch_size", "global batch size, split across ranks (CLIP-MoE used 800)",
               {"type": positive_int}),
    ConfigFlag("logit-scale", "logit_scale", "the fixed logit scale (1/temperature): 'auto' keeps the model's own "
               "learned one (100 for real CLIP bases, as the official code fixes it), a number sets it",
               {"type": logit_scale_arg}),
    ConfigFlag("label-smoothing", "label_smoothing", "label smoothing of the contrastive loss (CLIP-MoE: 0.1)",
               {"type": probability}),
    ConfigFlag("precision", "precision", "auto = amp_bf16 on CUDA, fp32 on CPU", {"choices": ("auto",) + PRECISIONS}),
    ConfigFlag("workers", "workers", "DataLoader workers per rank (any number gives the same batches)",
               {"type": non_negative_int}),
    ConfigFlag("seed", "seed", "seed of sampling, initialisation and augmentation", {"type": non_negative_int}),
    ConfigFlag("checkpoint-every", "checkpoint_every", "steps between resumable checkpoints", {"type": positive_int}),
    ConfigFlag("deterministic", "deterministic", "torch deterministic algorithms (bit-exact runs and resumes)",
               {"action": "store_true"}),
)
BALANCE_FLAG = ConfigFlag("balance-alpha", "balance_alpha", "weight of the load-balancing loss",
                          {"type": non_negative_float})
MOE_FLAGS = (
    ConfigFlag("top-k", "top_k", "experts per token", {"type": positive_int}),
    ConfigFlag("expert-dropout", "dropout", "dropout inside the experts (CLIP-MoE: 0.1)", {"type": probability}),
)
NUM_EXPERTS_FLAG = ConfigFlag("num-experts", "num_experts", "experts of sparse upcycling", {"type": positive_int})
MOE_DEFAULTS = {"dropout": 0.1}  # CLIP-MoE trains its experts with dropout 0.1
RUN_DEFAULTS = {"batch_size": 256, "precision": "auto"}
# What each command writes in its output folder (--overwrite removes these).
OUTPUTS = {"mcl": ("mcl",), "build": ("clip_moe",), "train-router": ("router", "final"),
           "upcycle": ("mcl", "clip_moe", "router", "final"), "finetune": BASELINES + ("final",)}


def add_data_args(p):
    p.add_argument("--train-data", required=True,
                   help="a CSV/TSV file (image path + caption columns), webdataset shards ('data/{000..009}.tar', "
                        "read by index from a cached per-shard offset index), or 'synthetic[:N]' (clipmoe's synthetic "
                        "attribute dataset)")
    p.add_argument("--csv-img-key", default="filepath", help="CSV column of image paths (open_clip convention)")
    p.add_argument("--csv-caption-key", default="title", help="CSV column of captions")
    p.add_argument("--csv-separator", default="\t", help="CSV separator (one character)")
    p.add_argument("--data-seed", type=non_negative_int, default=0, help="seed of the synthetic dataset")


def add_model_args(p):
    p.add_argument("--model", default="ViT-B-32", help="open_clip model name (or clipmoe-tiny)")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag (e.g. openai) or a checkpoint path")


def add_folder_args(p, resumable=True):
    p.add_argument("--output-dir", required=True, help="folder of this run: checkpoints, metrics, the final model")
    again = p.add_mutually_exclusive_group()
    if resumable:
        again.add_argument("--resume", action="store_true",
                           help="continue the run in --output-dir from its checkpoints (refused if a setting that "
                                "changes results differs)")
    again.add_argument("--overwrite", action="store_true",
                       help="replace the outputs of an earlier run in a non-empty --output-dir")
    p.add_argument("--device", type=device_arg, default="auto", help="auto: cuda when available; cpu, cuda, cuda:N")


def add_run_args(p):
    add_folder_args(p)
    add_config_flags(p, TrainConfig, RUN_FLAGS, defaults=RUN_DEFAULTS)
    p.add_argument("--dist-timeout", type=positive_float, default=DEFAULT_TIMEOUT_SECONDS,
                   help="seconds a rank waits for the others under torchrun before the run fails")


def add_train_args(p, lr, wd, prefix=""):
    suffix = " (router training)" if prefix else ""
    add_config_flags(p, TrainConfig, TRAIN_FLAGS, prefix=prefix, defaults={"lr": lr, "weight_decay": wd},
                     help_suffix=suffix)


def add_mcl_args(p):
    p.add_argument("--stages", type=positive_int, default=3, help="MCL fine-tuning stages = experts - 1")
    p.add_argument("--clusters", type=positive_int, default=3,
                   help="k-means clusters per modality and stage (k² joint clusters)")
    p.add_argument("--start-from", choices=START_FROM, default="base",
                   help="each stage starts from the base model (official code) or the previous stage")
    p.add_argument("--small-cluster", choices=("drop", "remainder"), default="drop",
                   help="clusters smaller than a global batch: drop them (official) or emit a remainder batch")


def add_router_args(p):
    add_config_flags(p, MoEConfig, MOE_FLAGS, defaults=MOE_DEFAULTS)
    p.add_argument("--trainable", choices=("router", "router_experts"), default="router",
                   help="router training trains the routers only (paper) or routers and experts")
    add_config_flags(p, TrainConfig, (BALANCE_FLAG,))


# ------------------------------------------------------------------------------------------------ checks, run folder
def check_args(args) -> None:
    """The cross-flag checks of every pipeline command, before anything runs (single flags: argparse types)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if hasattr(args, "batch_size") and args.batch_size % world_size:
        raise UsageError(f"--batch-size {args.batch_size}: must be divisible by the world size {world_size} "
                         f"(torchrun processes)")
    experts = {"upcycle": lambda: args.stages + 1,
               "finetune": lambda: {"sparse_upcycling": args.num_experts, "wo_mcl": 2}.get(args.method)}
    num_experts = experts.get(args.command, lambda: None)()
    if num_experts is not None and args.top_k > num_experts:
        raise UsageError(f"--top-k {args.top_k}: more than the {num_experts} experts of this model")
    spec = getattr(args, "train_data", None)
    if spec is not None and spec.startswith("synthetic:"):
        positive_int_or_usage("--train-data synthetic:N", spec.partition(":")[2])
    if hasattr(args, "csv_separator") and len(args.csv_separator) != 1:
        raise UsageError(f"--csv-separator {args.csv_separator!r}: expected one character")
    for flag in ("mcl_dir", "checkpoint"):
        path = getattr(args, flag, None)
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"--{flag.replace('_', '-')} {path}: no such file or folder")


def positive_int_or_usage(flag: str, text: str) -> int:
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError as exc:
        raise UsageError(f"{flag}: {exc}") from None


def data_fingerprint(args, dataset) -> dict:
    """What identifies the training data: its sample count and a hash of the file(s) --train-data names (the CSV,
    or the shards; not the images a CSV refers to). The synthetic data is identified by its spec and --data-seed."""
    spec = args.train_data
    files = []
    if not spec.startswith("synthetic"):
        from clipmoe.data.webdataset import expand_urls
        files = expand_urls(spec) if ".tar" in spec else [spec]
    digest = hashlib.sha256()
    for name in files:
        path = name.removeprefix("file://")
        digest.update(f"{os.path.basename(path)}\0".encode())
        if os.path.isfile(path):
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
    return {"samples": len(dataset), "sha256": digest.hexdigest() if files else None}


def _setup(args):
    check_args(args)
    info = init_distributed(args.device, getattr(args, "dist_timeout", DEFAULT_TIMEOUT_SECONDS))
    out = Path(args.output_dir)
    check_output_dir(out, resume=getattr(args, "resume", False), overwrite=args.overwrite)
    barrier(info)  # every rank has looked at the folder before the main one changes it
    if info.is_main:
        if args.overwrite and out.is_dir():
            remove_outputs(out, OUTPUTS[args.command])
        out.mkdir(parents=True, exist_ok=True)
    barrier(info)
    torch.manual_seed(getattr(args, "seed", 0))
    return info, out


def _start_run(args, info, out, dataset=None):
    """Record the run in out/args.json; on --resume first refuse a result-changing difference from the record."""
    record = argparse.Namespace(**vars(args), world_size=info.world_size, version=clipmoe.__version__)
    record.device = info.device.type
    if hasattr(args, "precision"):
        record.precision = resolve_precision(args)
    if dataset is not None:
        record.data_fingerprint = data_fingerprint(args, dataset)
    if getattr(args, "resume", False) and (out / "args.json").exists():
        check_resume(out, run_record(record))
        logger.info("resuming the run in %s (its settings match)", out)
    barrier(info)
    if info.is_main:
        write_args_json(out, record)
    return time.time()


def _finish(args, out, start, info, train_data=None, embed_data=None, final=None):
    """The end-of-run summary (a result: stdout, from the main rank), with the bad samples the data readers skipped
    or substituted, summed over ranks (every rank calls this)."""
    readers = [(d, what) for d, what in ((train_data, "training reads"), (embed_data, "embedding reads"))
               if d is not None]
    counts = sum_over_ranks([getattr(d, "num_skipped", 0) for d, _ in readers], info)
    if not info.is_main:
        return
    skipped = [f"{n} in {what}" for n, (_, what) in zip(counts, readers, strict=True)]
    print(f"clipmoe {args.command}: done in {time.time() - start:.1f} s; output {final or out}"
          + (f"; bad samples skipped or substituted: {', '.join(skipped)}" if skipped else ""))


def resolve_precision(args) -> str:
    if args.precision != "auto":
        return args.precision
    return "amp_bf16" if torch.cuda.is_available() and args.device != "cpu" else "fp32"


def train_config(args, prefix="", balance_alpha=0.0) -> TrainConfig:
    """The TrainConfig of one phase: its TRAIN_FLAGS (with `prefix`) and the run's RUN_FLAGS."""
    run = {flag.field: getattr(args, flag.dest()) for flag in RUN_FLAGS}
    run["precision"] = resolve_precision(args)
    return config_from_args(TrainConfig, TRAIN_FLAGS, args, prefix=prefix, **run, balance_alpha=balance_alpha)


def open_dataset(args, preprocess, tokenizer):
    """The training data named by --train-data, as a map-style dataset of (image, tokens)."""
    from clipmoe.data.datasets import CsvCaptionDataset
    from clipmoe.data.shards import ShardCaptionDataset
    from clipmoe.data.synthetic import SyntheticShapes
    spec = args.train_data
    if spec == "synthetic" or spec.startswith("synthetic:"):
        n = int(spec.partition(":")[2] or SYNTHETIC_DEFAULT_SIZE)
        return SyntheticShapes(n, split="train", seed=args.data_seed, preprocess=preprocess, tokenizer=tokenizer)
    if ".tar" in spec:  # read by index from the shards (an offset index is built once and cached beside them)
        return ShardCaptionDataset(spec, preprocess, tokenizer, on_error="substitute")
    if not Path(spec).exists():
        raise FileNotFoundError(f"--train-data {spec}: no such file (expected a CSV/TSV file, .tar shards or "
                                f"'synthetic[:N]')")
    # "substitute" keeps every batch full when an image is unreadable (all ranks need equal batches); counted.
    return CsvCaptionDataset(spec, preprocess, tokenizer, img_key=args.csv_img_key, caption_key=args.csv_caption_key,
                             sep=args.csv_separator, on_error="substitute")


def _base_and_data(args, info):
    model, preprocess_train, preprocess_val, tokenizer = create_model(args.model, args.pretrained)
    train_data = open_dataset(args, preprocess_train, tokenizer)
    embed_data = open_dataset(args, preprocess_val, tokenizer)
    if info.is_main:
        logger.info("%s: %.1fM parameters; train data %s: %d samples; world size %d on %s", args.model,
                    sum(p.numel() for p in model.parameters()) / 1e6, args.train_data, len(train_data),
                    info.world_size, info.device)
        _log_recipe(args, model)
    return model, train_data, embed_data


def _log_recipe(args, model):
    own = float(model.logit_scale.detach().exp())
    scale = f"{own:.4g} (auto: the model's own)" if args.logit_scale == AUTO else f"{args.logit_scale:g} (fixed)"
    logger.info("recipe: logit scale %s, label smoothing %g", scale, args.label_smoothing)


def _save(model, path, info, architecture):
    if info.is_main:
        save_checkpoint(model, path, architecture=architecture)
        logger.info("saved %s", path)
    barrier(info)


def cmd_mcl(args):
    info, out = _setup(args)
    model, train_data, embed_data = _base_and_data(args, info)
    start = _start_run(args, info, out, train_data)
    run_mcl(model, train_data, train_config(args), out / "mcl", info, stages=args.stages, clusters=args.clusters,
            start_from=args.start_from, small_cluster=args.small_cluster, resume=args.resume, embed_data=embed_data)
    _finish(args, out, start, info, train_data, embed_data, out / "mcl")
    return 0


def cmd_build(args):
    info, out = _setup(args)
    start = _start_run(args, info, out)
    model = create_model(args.model, args.pretrained)[0]
    stages = recorded_stage_ffns(args.mcl_dir, model, args.num_experts)  # only the recorded run's stages
    if args.top_k > len(stages):
        raise UsageError(f"--top-k {args.top_k}: more than the {len(stages)} experts in --mcl-dir {args.mcl_dir}")
    torch.manual_seed(args.seed)  # the router initialisation
    moe = build_clip_moe(model, stages, top_k=args.top_k, dropout=args.expert_dropout)
    _save(moe, out / "clip_moe", info, args.model)
    _finish(args, out, start, info, final=out / "clip_moe")
    return 0


def cmd_train_router(args):
    info, out = _setup(args)
    moe = load_checkpoint(args.checkpoint, device="cpu")  # keeps its architecture for the save below
    _, preprocess_train, _, tokenizer = create_model(args.model, None)
    data = open_dataset(args, preprocess_train, tokenizer)
    if info.is_main:
        _log_recipe(args, moe)
    start = _start_run(args, info, out, data)
    train_router(moe, data, train_config(args, balance_alpha=args.balance_alpha), out / "router", info,
                 trainable=args.trainable, resume=args.resume)
    _save(moe, out / "final", info, None)
    _finish(args, out, start, info, data, final=out / "final")
    return 0


def cmd_upcycle(args):
    info, out = _setup(args)
    model, train_data, embed_data = _base_and_data(args, info)
    start = _start_run(args, info, out, train_data)
    ffns = run_mcl(model, train_data, train_config(args), out / "mcl", info, stages=args.stages,
                   clusters=args.clusters, start_from=args.start_from, small_cluster=args.small_cluster,
                   resume=args.resume, embed_data=embed_data)
    torch.manual_seed(args.seed)  # the router initialisation, the same whether MCL stages ran or were resumed
    moe = build_clip_moe(model, ffns, top_k=args.top_k, dropout=args.expert_dropout)
    _save(moe, out / "clip_moe", info, args.model)
    train_router(moe, train_data, train_config(args, "router_", balance_alpha=args.balance_alpha), out / "router",
                 info, trainable=args.trainable, resume=args.resume)
    _save(moe, out / "final", info, args.model)
    _finish(args, out, start, info, train_data, embed_data, out / "final")
    return 0


def cmd_finetune(args):
    info, out = _setup(args)
    model, train_data, _ = _base_and_data(args, info)
    start = _start_run(args, info, out, train_data)
    trained = finetune_baseline(args.method, model, train_data, train_config(args), out / args.method, info,
                                num_experts=args.num_experts, top_k=args.top_k,
                                router_cfg=train_config(args, "router_", balance_alpha=args.balance_alpha),
                                expert_dropout=args.expert_dropout, resume=args.resume)
    if args.method == "direct":
        if info.is_main:
            path = out / "final" / "model.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_torch_save(trained.state_dict(), path)  # an open_clip state dict: --pretrained loads it
            logger.info("saved %s", path)
    else:
        _save(trained, out / "final", info, args.model)
    _finish(args, out, start, info, train_data, final=out / "final")
    return 0


def add_commands(sub):
    p = sub.add_parser("mcl", help="MCL stages: FFN-only fine-tuning with cluster-restricted negatives")
    add_model_args(p), add_data_args(p), add_run_args(p), add_mcl_args(p)
    add_train_args(p, lr=1e-5, wd=0.2)
    p.set_defaults(func=cmd_mcl)

    p = sub.add_parser("build", help="assemble a CLIP-MoE from the MCL stages (expert j = stage j's FFNs)")
    add_model_args(p)
    p.add_argument("--mcl-dir", required=True, help="the mcl folder of `clipmoe mcl` (<output-dir>/mcl)")
    p.add_argument("--num-experts", type=positive_int, default=None,
                   help="experts of the CLIP-MoE: the base and the first N-1 MCL stages of the run (none: all its "
                        "stages + 1)")
    add_folder_args(p, resumable=False)
    add_config_flags(p, MoEConfig, MOE_FLAGS, defaults=MOE_DEFAULTS)
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the router initialisation")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("train-router", help="train the routers of an assembled CLIP-MoE (contrastive + balance)")
    p.add_argument("--checkpoint", required=True, help="clipmoe checkpoint folder (e.g. <output-dir>/clip_moe)")
    p.add_argument("--model", default="ViT-B-32", help="open_clip name, for the transforms and tokenizer")
    add_data_args(p), add_run_args(p)
    p.add_argument("--trainable", choices=("router", "router_experts"), default="router")
    add_config_flags(p, TrainConfig, (BALANCE_FLAG,))
    add_train_args(p, lr=1e-6, wd=0.01)
    p.set_defaults(func=cmd_train_router)

    p = sub.add_parser("upcycle", help="all of DMU in one command: MCL stages, assembly, router training")
    add_model_args(p), add_data_args(p), add_run_args(p), add_mcl_args(p), add_router_args(p)
    add_train_args(p, lr=1e-5, wd=0.2)
    add_train_args(p, lr=1e-6, wd=0.01, prefix="router-")
    p.set_defaults(func=cmd_upcycle)

    p = sub.add_parser("finetune", help="the paper's baselines: direct FFN fine-tuning, sparse upcycling, w/o MCL")
    add_model_args(p), add_data_args(p), add_run_args(p), add_router_args(p)
    p.add_argument("--method", choices=BASELINES, required=True)
    add_config_flags(p, MoEConfig, (NUM_EXPERTS_FLAG,))
    add_train_args(p, lr=1e-5, wd=0.2)
    add_train_args(p, lr=1e-6, wd=0.01, prefix="router-")
    p.set_defaults(func=cmd_finetune)
