"""The pipeline sub-commands of `clipmoe`: mcl, build, train-router, upcycle (all stages), finetune (baselines).

Every command runs as one process or under torchrun (DDP; nccl on GPUs, gloo on CPU). Output folder layout:
  <out>/mcl/stage_{s}/ffn.safetensors   FFNs of stage s (stage 0 = the base model)
  <out>/mcl/stage_{s}/metrics.jsonl     per-step metrics; train_state.pt: the resumable checkpoint
  <out>/mcl/labels_{s}.pt               accumulated cluster labels after clustering s
  <out>/mcl/pipeline.jsonl              per-stage cluster counts and dropped samples
  <out>/clip_moe/                       the assembled model (model.safetensors + config.json)
  <out>/router/                         router-training metrics and resumable checkpoint
  <out>/final/                          the router-trained CLIP-MoE (model.safetensors + config.json)
"""
import json
from pathlib import Path

import torch

from clipmoe.checkpoint import load_checkpoint, save_checkpoint
from clipmoe.fileio import atomic_torch_save
from clipmoe.models import create_model
from clipmoe.train.distributed import barrier, init_distributed
from clipmoe.train.dmu import (
    BASELINES,
    START_FROM,
    build_clip_moe,
    finetune_baseline,
    load_ffns,
    run_mcl,
    train_router,
)
from clipmoe.train.loop import PRECISIONS, TrainConfig

SYNTHETIC_DEFAULT_SIZE = 4096


def add_data_args(p):
    p.add_argument("--train-data", required=True,
                   help="a CSV/TSV file (image path + caption columns), webdataset shards ('data/{000..009}.tar', "
                        "read once into memory), or 'synthetic[:N]' (clipmoe's synthetic attribute dataset)")
    p.add_argument("--csv-img-key", default="filepath", help="CSV column of image paths (open_clip convention)")
    p.add_argument("--csv-caption-key", default="title", help="CSV column of captions")
    p.add_argument("--csv-separator", default="\t", help="CSV separator (default: tab)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic dataset")


def add_model_args(p):
    p.add_argument("--model", default="ViT-B-32", help="open_clip model name (or clipmoe-tiny); default ViT-B-32")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag (e.g. openai) or a checkpoint path")


def add_train_args(p, lr, wd, prefix=""):
    dest = prefix.replace("-", "_")
    p.add_argument(f"--{prefix}lr", dest=f"{dest}lr", type=float, default=lr, help=f"AdamW learning rate ({lr})")
    p.add_argument(f"--{prefix}wd", dest=f"{dest}wd", type=float, default=wd, help=f"AdamW weight decay ({wd})")
    p.add_argument(f"--{prefix}epochs", dest=f"{dest}epochs", type=int, default=1, help="epochs (1)")
    p.add_argument(f"--{prefix}max-steps", dest=f"{dest}max_steps", type=int, default=None,
                   help="stop after this many steps (overrides epochs)")
    p.add_argument(f"--{prefix}warmup", dest=f"{dest}warmup", type=int, default=200, help="warm-up steps (200)")


def add_run_args(p):
    p.add_argument("--output-dir", required=True, help="folder for checkpoints, metrics and the final model")
    p.add_argument("--batch-size", type=int, default=256, help="global batch size, split across ranks (256; "
                                                               "CLIP-MoE used 800)")
    p.add_argument("--precision", default="auto", choices=("auto",) + PRECISIONS,
                   help="auto = amp_bf16 on CUDA, fp32 on CPU")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers per rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between resumable checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --output-dir")
    p.add_argument("--deterministic", action="store_true", help="deterministic algorithms (bit-exact resume)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))


def add_mcl_args(p):
    p.add_argument("--stages", type=int, default=3, help="MCL fine-tuning stages = experts - 1 (3)")
    p.add_argument("--clusters", type=int, default=3, help="k-means clusters per modality and stage (3: 9 joint)")
    p.add_argument("--start-from", choices=START_FROM, default="base",
                   help="each stage starts from the base model (official code) or the previous stage")
    p.add_argument("--small-cluster", choices=("drop", "remainder"), default="drop",
                   help="clusters smaller than a global batch: drop them (official) or emit a remainder batch")


def add_router_args(p):
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--trainable", choices=("router", "router_experts"), default="router",
                   help="router training trains the routers only (paper) or routers and experts")
    p.add_argument("--balance-alpha", type=float, default=0.01, help="weight of the load-balancing loss (0.01)")
    p.add_argument("--expert-dropout", type=float, default=0.1,
                   help="dropout inside the experts while the router trains (CLIP-MoE: 0.1)")


def train_config(args, prefix="", balance_alpha=0.0) -> TrainConfig:
    def get(name):
        return getattr(args, f"{prefix}{name}")
    precision = args.precision
    if precision == "auto":
        precision = "amp_bf16" if torch.cuda.is_available() and args.device != "cpu" else "fp32"
    return TrainConfig(lr=get("lr"), weight_decay=get("wd"), warmup_steps=get("warmup"), epochs=get("epochs"),
                       max_steps=get("max_steps"), batch_size=args.batch_size, precision=precision,
                       balance_alpha=balance_alpha, checkpoint_every=args.checkpoint_every, workers=args.workers,
                       seed=args.seed, deterministic=args.deterministic)


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


def _setup(args):
    info = init_distributed(args.device)
    torch.manual_seed(args.seed)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    return info, out


def _base_and_data(args, info):
    model, preprocess_train, preprocess_val, tokenizer = create_model(args.model, args.pretrained)
    train_data = open_dataset(args, preprocess_train, tokenizer)
    embed_data = open_dataset(args, preprocess_val, tokenizer)
    if info.is_main:
        print(f"{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; train data "
              f"{args.train_data}: {len(train_data)} samples; world size {info.world_size} on {info.device}")
    return model, train_data, embed_data


def _save(model, path, info, architecture):
    if info.is_main:
        save_checkpoint(model, path, architecture=architecture)
        print(f"saved {path}")
    barrier(info)


def cmd_mcl(args):
    info, out = _setup(args)
    model, train_data, embed_data = _base_and_data(args, info)
    run_mcl(model, train_data, train_config(args), out / "mcl", info, stages=args.stages, clusters=args.clusters,
            start_from=args.start_from, small_cluster=args.small_cluster, resume=args.resume, embed_data=embed_data)
    return 0


def _stage_ffns(model, mcl_dir):
    mcl_dir = Path(mcl_dir)
    paths = sorted(mcl_dir.glob("stage_*/ffn.safetensors"), key=lambda p: int(p.parent.name.split("_")[1]))
    if not paths:
        raise FileNotFoundError(f"--mcl-dir {mcl_dir}: no stage_*/ffn.safetensors (run `clipmoe mcl` first)")
    return [load_ffns(p, model) for p in paths]


def cmd_build(args):
    info, out = _setup(args)
    model = create_model(args.model, args.pretrained)[0]
    torch.manual_seed(args.seed)  # the router initialisation
    moe = build_clip_moe(model, _stage_ffns(model, args.mcl_dir), top_k=args.top_k, dropout=args.expert_dropout)
    _save(moe, out / "clip_moe", info, args.model)
    return 0


def cmd_train_router(args):
    info, out = _setup(args)
    moe = load_checkpoint(args.checkpoint, device="cpu")
    architecture = json.loads((Path(args.checkpoint) / "config.json").read_text())["architecture"] \
        if Path(args.checkpoint).is_dir() else None
    _, preprocess_train, _, tokenizer = create_model(args.model, None)
    data = open_dataset(args, preprocess_train, tokenizer)
    train_router(moe, data, train_config(args, balance_alpha=args.balance_alpha), out / "router", info,
                 trainable=args.trainable, resume=args.resume)
    _save(moe, out / "final", info, architecture)
    return 0


def cmd_upcycle(args):
    info, out = _setup(args)
    model, train_data, embed_data = _base_and_data(args, info)
    ffns = run_mcl(model, train_data, train_config(args), out / "mcl", info, stages=args.stages,
                   clusters=args.clusters, start_from=args.start_from, small_cluster=args.small_cluster,
                   resume=args.resume, embed_data=embed_data)
    torch.manual_seed(args.seed)  # the router initialisation, the same whether MCL stages ran or were resumed
    moe = build_clip_moe(model, ffns, top_k=args.top_k, dropout=args.expert_dropout)
    _save(moe, out / "clip_moe", info, args.model)
    train_router(moe, train_data, train_config(args, "router_", balance_alpha=args.balance_alpha), out / "router",
                 info, trainable=args.trainable, resume=args.resume)
    _save(moe, out / "final", info, args.model)
    return 0


def cmd_finetune(args):
    info, out = _setup(args)
    model, train_data, _ = _base_and_data(args, info)
    trained = finetune_baseline(args.method, model, train_data, train_config(args), out / args.method, info,
                                num_experts=args.num_experts, top_k=args.top_k,
                                router_cfg=train_config(args, "router_", balance_alpha=args.balance_alpha),
                                expert_dropout=args.expert_dropout, resume=args.resume)
    if args.method == "direct":
        if info.is_main:
            path = out / "final" / "model.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_torch_save(trained.state_dict(), path)  # an open_clip state dict: --pretrained loads it
            print(f"saved {path}")
    else:
        _save(trained, out / "final", info, args.model)
    return 0


def add_commands(sub):
    p = sub.add_parser("mcl", help="MCL stages: FFN-only fine-tuning with cluster-restricted negatives")
    add_model_args(p), add_data_args(p), add_run_args(p), add_mcl_args(p)
    add_train_args(p, lr=1e-5, wd=0.2)
    p.set_defaults(func=cmd_mcl)

    p = sub.add_parser("build", help="assemble a CLIP-MoE from the MCL stages (expert j = stage j's FFNs)")
    add_model_args(p)
    p.add_argument("--mcl-dir", required=True, help="the mcl folder of `clipmoe mcl` (<output-dir>/mcl)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-dropout", type=float, default=0.1, help="dropout inside the experts (CLIP-MoE: 0.1)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--seed", type=int, default=0, help="seed of the router initialisation")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("train-router", help="train the routers of an assembled CLIP-MoE (contrastive + balance)")
    p.add_argument("--checkpoint", required=True, help="clipmoe checkpoint folder (e.g. <output-dir>/clip_moe)")
    p.add_argument("--model", default="ViT-B-32", help="open_clip name, for the transforms and tokenizer")
    add_data_args(p), add_run_args(p)
    p.add_argument("--trainable", choices=("router", "router_experts"), default="router")
    p.add_argument("--balance-alpha", type=float, default=0.01)
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
    p.add_argument("--num-experts", type=int, default=4, help="experts of sparse upcycling (4)")
    add_train_args(p, lr=1e-5, wd=0.2)
    add_train_args(p, lr=1e-6, wd=0.01, prefix="router-")
    p.set_defaults(func=cmd_finetune)
