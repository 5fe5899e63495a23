"""Diversified Multiplet Upcycling end to end, and the paper's baselines.

1. MCL stages (`run_mcl`): stage 0 is the base model (its FFNs = expert 0). After stage j, embed the training set with
   stage j's model, cluster image and text embeddings separately (k per modality, k² joint clusters) and accumulate
   the labels (mixed radix). Stage s fine-tunes only the FFNs of both towers with every global batch drawn from one
   accumulated cluster of stages < s, starting from the base (official code) or from stage s−1 (paper wording).
2. Assembly (`build_clip_moe`): every block's MLP becomes an MoEFFN whose expert j is stage j's FFN.
3. Router training (`train_router`): contrastive + α·balance loss, random batches, routers only (paper) or routers
   and experts.
Baselines (`finetune_baseline`): direct FFN fine-tuning, sparse upcycling (E copies, experts and routers trained),
and "w/o MCL" (a 2-expert MoE of the base FFN and a directly fine-tuned FFN, then router training).
"""
import copy
import json
from pathlib import Path
from typing import Dict, List, Optional

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from clipmoe.data.sampler import ClusterBatchSampler
from clipmoe.fileio import atomic_torch_save, atomic_write
from clipmoe.train.cluster import accumulate_labels, cluster_stage
from clipmoe.train.contrastive import ContrastiveLoss
from clipmoe.train.distributed import DistInfo, all_gather_rows, barrier
from clipmoe.train.loop import TrainConfig, train
from clipmoe.upcycle import dense_mlps, upcycle

FFN_FILE = "ffn.safetensors"
START_FROM = ("base", "previous")
BASELINES = ("direct", "sparse_upcycling", "wo_mcl")


def ffn_state_dicts(model) -> Dict[str, Dict[str, torch.Tensor]]:
    """{MLP module name: its state dict} for every dense MLP of `model` (the FFNs an MCL stage trains)."""
    return {name: {k: v.detach().cpu().clone() for k, v in mlp.state_dict().items()}
            for name, mlp in dense_mlps(model).items()}


def save_ffns(ffns: Dict[str, Dict[str, torch.Tensor]], path):
    flat = {f"{name}.{key}": t.contiguous() for name, sd in ffns.items() for key, t in sd.items()}
    atomic_write(path, lambda tmp: save_file(flat, tmp))


def load_ffns(path, model) -> Dict[str, Dict[str, torch.Tensor]]:
    """Read an ffn.safetensors written by `save_ffns`, split per MLP of `model` (validating the names)."""
    flat = load_file(str(path))
    ffns = {}
    for name, mlp in dense_mlps(model).items():
        keys = list(mlp.state_dict())
        missing = [k for k in keys if f"{name}.{k}" not in flat]
        if missing:
            raise ValueError(f"{path}: no weights for {name}.{missing[0]}; the file holds the FFNs of another "
                             f"architecture")
        ffns[name] = {k: flat[f"{name}.{k}"] for k in keys}
    return ffns


def build_clip_moe(base_model, stage_ffns: List[Dict[str, Dict[str, torch.Tensor]]], top_k: int = 2, **moe_kwargs):
    """A CLIP-MoE from a dense model and one FFN set per stage: expert j of every block = stage j's FFN (stage 0 =
    the base FFN); routers randomly initialised. `base_model` is left untouched; moe_kwargs go to `upcycle`."""
    if not stage_ffns:
        raise ValueError("stage_ffns must hold at least one stage's FFNs")
    model = copy.deepcopy(base_model)
    names = list(dense_mlps(model))
    for j, stage in enumerate(stage_ffns):
        missing = [n for n in names if n not in stage]
        if missing:
            raise ValueError(f"stage_ffns[{j}] lacks the FFN of {missing[0]} (and {len(missing) - 1} more)")
    experts = {name: [stage[name] for stage in stage_ffns] for name in names}
    return upcycle(model, num_experts=len(stage_ffns), top_k=min(top_k, len(stage_ffns)), experts=experts,
                   **moe_kwargs)


def rank_block(n: int, info: DistInfo) -> range:
    """The contiguous block of dataset indices that this rank embeds: blocks in rank order tile [0, n)."""
    return range(n * info.rank // info.world_size, n * (info.rank + 1) // info.world_size)


@torch.no_grad()
def embed_dataset(model, dataset, info: DistInfo, batch_size: int = 256, precision: str = "fp32",
                  workers: int = 0, desc: str = "embed", *, dtype: torch.dtype = torch.float16,
                  gather: bool = True):
    """L2-normalised image and text embeddings of the dataset, each [rows, D] of `dtype` on the model's device.

    Each rank embeds its block `rank_block(len(dataset), info)`. gather=False returns this rank's rows (for
    clustering in place); gather=True all rows in dataset order on every rank. fp16 halves the memory of the
    features; the k-means upcasts per chunk (its inertia stays within 1 % of fp32 features: tests/test_multinode.py).
    """
    n = len(dataset)
    if n < info.world_size:
        raise ValueError(f"{desc}: {n} samples for {info.world_size} ranks; every rank needs at least one")
    was_training = model.training
    model.eval()
    block = rank_block(n, info)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=block, num_workers=workers)
    autocast = (torch.autocast(info.device.type, dtype=torch.bfloat16) if precision == "amp_bf16"
                else torch.autocast(info.device.type, dtype=torch.float16) if precision == "amp_fp16"
                else torch.autocast(info.device.type, enabled=False))
    image_features = text_features = None
    done = 0
    for image, text in tqdm(loader, desc=desc, disable=not info.is_main, dynamic_ncols=True):
        with autocast:
            image_rows = model.encode_image(image.to(info.device), normalize=True)
            text_rows = model.encode_text(text.to(info.device), normalize=True)
        if image_features is None:  # filled in place: no list of batches and no concatenated copy
            image_features = torch.empty(len(block), image_rows.shape[1], dtype=dtype, device=info.device)
            text_features = torch.empty(len(block), text_rows.shape[1], dtype=dtype, device=info.device)
        image_features[done:done + len(image_rows)] = image_rows
        text_features[done:done + len(text_rows)] = text_rows
        done += len(image_rows)
    model.train(was_training)
    if done != len(block):
        raise RuntimeError(f"{desc}: the data loader returned {done} of {len(block)} samples (a collate_fn that "
                           f"drops bad samples? use on_error='substitute')")
    if gather:
        image_features, text_features = all_gather_rows(image_features, info), all_gather_rows(text_features, info)
    return image_features, text_features


def cluster_dataset(model, dataset, info: DistInfo, *, clusters: int, seed: int, batch_size: int = 256,
                    precision: str = "fp32", workers: int = 0, desc: str = "embed") -> torch.Tensor:
    """One MCL clustering of the whole dataset with `model`: every rank embeds its block (fp16), the k-means runs
    distributed over the blocks in place (no rank holds all features), and the joint labels [N] int64 are gathered
    to every rank on the CPU, in dataset order."""
    image_features, text_features = embed_dataset(model, dataset, info, batch_size, precision, workers, desc=desc,
                                                  gather=False)
    labels = cluster_stage(image_features, text_features, k=clusters, seed=seed, distributed=info.enabled)
    del image_features, text_features
    return all_gather_rows(labels, info).cpu()


def per_rank_batch(cfg: TrainConfig, info: DistInfo) -> int:
    if cfg.batch_size % info.world_size:
        raise ValueError(f"batch_size (global) {cfg.batch_size} must be divisible by the world size "
                         f"{info.world_size}")
    return cfg.batch_size // info.world_size


def contrastive_loss(cfg: TrainConfig) -> ContrastiveLoss:
    return ContrastiveLoss(logit_scale=cfg.logit_scale, label_smoothing=cfg.label_smoothing)


def _log(out_dir: Path, record: dict, info: DistInfo):
    if info.is_main:
        with open(out_dir / "pipeline.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def run_mcl(base_model, dataset, cfg: TrainConfig, out_dir, info: DistInfo, *, stages: int = 3,
            clusters: int = 3, start_from: str = "base", small_cluster: str = "drop", resume: bool = False,
            embed_data=None, embed_batch_size: int = 256) -> List[Dict[str, Dict[str, torch.Tensor]]]:
    """Stage 0 (the base) plus `stages` MCL stages; returns the FFN sets of stages 0..stages and writes
    out_dir/stage_{s}/ffn.safetensors, out_dir/labels_{s}.pt (accumulated labels after clustering s), metrics.
    `embed_data` (default `dataset`): the same samples with evaluation transforms, embedded for clustering."""
    if start_from not in START_FROM:
        raise ValueError(f"start_from must be one of {START_FROM}, got {start_from!r}")
    if stages < 1:
        raise ValueError(f"stages must be >= 1, got {stages}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base_model = base_model.to(info.device)
    ffns = [ffn_state_dicts(base_model)]
    if info.is_main:
        save_ffns(ffns[0], out_dir / "stage_0" / FFN_FILE)
    labels, previous = None, base_model
    for s in range(1, stages + 1):
        labels_path = out_dir / f"labels_{s - 1}.pt"
        if resume and labels_path.exists():
            labels = torch.load(labels_path, weights_only=True)
        else:
            stage_labels = cluster_dataset(previous, embed_data or dataset, info, clusters=clusters, seed=cfg.seed + s,
                                           batch_size=embed_batch_size, precision=cfg.precision, workers=cfg.workers,
                                           desc=f"embed stage {s - 1}")
            labels = accumulate_labels(labels, stage_labels, clusters * clusters)
            if info.is_main:
                atomic_torch_save(labels, labels_path)
        stage_dir = out_dir / f"stage_{s}"
        model = copy.deepcopy(base_model if start_from == "base" else previous)
        if resume and (stage_dir / FFN_FILE).exists():
            stage_ffns = load_ffns(stage_dir / FFN_FILE, model)
        else:
            sampler = ClusterBatchSampler(labels, per_rank_batch(cfg, info), world_size=info.world_size,
                                          rank=info.rank, seed=cfg.seed + s, small_cluster=small_cluster)
            summary = {"stage": s, "clusters": int(labels.unique().numel()), **sampler.summary()}
            _log(out_dir, summary, info)
            if info.is_main:
                print(f"MCL stage {s}: {summary['clusters']} accumulated clusters, {summary['num_kept_clusters']} "
                      f"of them hold a global batch; {summary['num_dropped']} of {summary['num_samples']} samples "
                      f"dropped this epoch ({small_cluster} policy)")
            summary = train(model, dataset, sampler, contrastive_loss(cfg), cfg, stage_dir, trainable="ffn",
                            info=info, resume=resume, desc=f"MCL stage {s}/{stages}")
            _log(out_dir, {"stage": s, "train": summary}, info)
            stage_ffns = ffn_state_dicts(model)
            if info.is_main:
                save_ffns(stage_ffns, stage_dir / FFN_FILE)
        with torch.no_grad():  # the stage model = base (or previous) with this stage's FFNs
            for name, mlp in dense_mlps(model).items():
                mlp.load_state_dict(stage_ffns[name])
        ffns.append(stage_ffns)
        previous = model
        barrier(info)
    return ffns


def train_router(moe_model, dataset, cfg: TrainConfig, out_dir, info: DistInfo, *, trainable: str = "router",
                 resume: bool = False) -> dict:
    """Router training of an assembled CLIP-MoE on random batches: contrastive + cfg.balance_alpha · balance."""
    sampler = ClusterBatchSampler(None, per_rank_batch(cfg, info), num_samples=len(dataset),
                                  world_size=info.world_size, rank=info.rank, seed=cfg.seed)
    return train(moe_model, dataset, sampler, contrastive_loss(cfg), cfg, out_dir, trainable=trainable, info=info,
                 resume=resume, desc="router training")


def finetune_baseline(method: str, base_model, dataset, cfg: TrainConfig, out_dir, info: DistInfo, *,
                      num_experts: int = 4, top_k: int = 2, router_cfg: Optional[TrainConfig] = None,
                      expert_dropout: float = 0.0, resume: bool = False):
    """The paper's baselines on the same data: returns the trained model.

    direct: the dense model with its FFNs fine-tuned on random batches (no MCL sampler).
    sparse_upcycling: E copies of the base FFN per block; experts and routers trained together.
    wo_mcl: 2 experts [base FFN, the `direct` FFN], then router training with `router_cfg` (default `cfg`).
    """
    if method not in BASELINES:
        raise ValueError(f"method must be one of {BASELINES}, got {method!r}")
    out_dir = Path(out_dir)
    sampler = ClusterBatchSampler(None, per_rank_batch(cfg, info), num_samples=len(dataset),
                                  world_size=info.world_size, rank=info.rank, seed=cfg.seed)
    if method == "sparse_upcycling":
        torch.manual_seed(cfg.seed)  # router initialisation independent of what ran before (resume-safe)
        model = upcycle(copy.deepcopy(base_model), num_experts=num_experts, top_k=top_k, dropout=expert_dropout)
        train(model, dataset, sampler, contrastive_loss(cfg), cfg, out_dir, trainable="router_experts", info=info,
              resume=resume, desc="sparse upcycling")
        return model
    direct = copy.deepcopy(base_model)
    train(direct, dataset, sampler, contrastive_loss(cfg), cfg, out_dir / "direct", trainable="ffn", info=info,
          resume=resume, desc="direct fine-tune")
    if method == "direct":
        return direct
    torch.manual_seed(cfg.seed)  # router initialisation independent of whether `direct` was resumed or trained
    model = build_clip_moe(base_model, [ffn_state_dicts(base_model), ffn_state_dicts(direct)], top_k=top_k,
                           dropout=expert_dropout)
    train_router(model, dataset, router_cfg or cfg, out_dir / "router", info, resume=resume)
    return model
