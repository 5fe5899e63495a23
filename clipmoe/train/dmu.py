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
import logging
import uuid
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from clipmoe.data.sampler import ClusterBatchSampler
from clipmoe.fileio import atomic_torch_save, atomic_write
from clipmoe.progress import progress_bar
from clipmoe.runtime import autocast
from clipmoe.train.cluster import accumulate_labels, cluster_stage
from clipmoe.train.contrastive import ContrastiveLoss
from clipmoe.train.distributed import DistInfo, all_gather_rows, barrier
from clipmoe.train.loop import AUTO, TrainConfig, train
from clipmoe.upcycle import dense_mlps, upcycle

logger = logging.getLogger(__name__)
FFN_FILE = "ffn.safetensors"
MCL_RUN_FILE = "mcl_run.json"  # the record of one MCL run: its id and the labels / stages it finished
START_FROM = ("base", "previous")
BASELINES = ("direct", "sparse_upcycling", "wo_mcl")


def ffn_state_dicts(model) -> dict[str, dict[str, torch.Tensor]]:
    """{MLP module name: its state dict} for every dense MLP of `model` (the FFNs an MCL stage trains)."""
    return {name: {k: v.detach().cpu().clone() for k, v in mlp.state_dict().items()}
            for name, mlp in dense_mlps(model).items()}


def save_ffns(ffns: dict, path, run_id: str | None = None):
    """Write one stage's FFNs; `run_id` (stored in the file's metadata) ties the file to the MCL run that made it."""
    flat = {f"{name}.{key}": t.contiguous() for name, sd in ffns.items() for key, t in sd.items()}
    metadata = {"mcl_run": run_id} if run_id else None
    atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=metadata))


def ffn_file_run(path) -> str | None:
    """The MCL run id stored in an ffn.safetensors (None for files without one)."""
    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("mcl_run")


def read_mcl_run(mcl_dir) -> dict | None:
    """The run record of an MCL folder (see `run_mcl`), or None when it has none."""
    path = Path(mcl_dir) / MCL_RUN_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable MCL run record: {exc}") from exc
    if not isinstance(record, dict) or not isinstance(record.get("run_id"), str) \
            or not all(isinstance(record.get(k), list) for k in ("labels", "started", "done")):
        raise ValueError(f"{path}: not an MCL run record (expected run_id and the lists labels, started, done)")
    return record


def _write_mcl_run(mcl_dir: Path, record: dict, info: DistInfo):
    if info.is_main:
        text = json.dumps(record, indent=2) + "\n"
        atomic_write(mcl_dir / MCL_RUN_FILE, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def recorded_stage_ffns(mcl_dir, model, num_experts: int | None = None) -> list:
    """The FFN sets of stages 0..num_experts-1 of the MCL run recorded in `mcl_dir` (all its finished stages by
    default), for `build_clip_moe`. Only stages the run's record lists as done are used, and each file must carry
    the run's id: stage folders of an earlier run in the same folder are never picked up. Raises
    FileNotFoundError without a record and ValueError for a record that disagrees with the files or a
    num_experts above the finished stages + 1."""
    mcl_dir = Path(mcl_dir)
    record = read_mcl_run(mcl_dir)
    if record is None:
        raise FileNotFoundError(f"MCL folder {mcl_dir}: no {MCL_RUN_FILE}, the record of the run that wrote it "
                                f"(run `clipmoe mcl` first; stage folders without a record may be leftovers of "
                                f"another run, so they are not used)")
    done = sorted(set(record["done"]))
    if done != list(range(len(done))) or not done:
        raise ValueError(f"{mcl_dir / MCL_RUN_FILE}: the finished stages {done} are not 0..n; the record is damaged")
    planned = record.get("stages", len(done) - 1)
    if num_experts is None:
        if len(done) - 1 < planned:
            raise ValueError(f"MCL folder {mcl_dir}: the run finished {len(done) - 1} of its {planned} stages; resume "
                             f"it, or pass num_experts (--num-experts) <= {len(done)} to build from the finished ones")
        num_experts = len(done)
    if not isinstance(num_experts, int) or not 1 <= num_experts <= len(done):
        raise ValueError(f"num_experts (--num-experts) {num_experts!r}: the MCL run in {mcl_dir} finished "
                         f"{len(done) - 1} stage(s), which give 1..{len(done)} experts (expert 0 = the base model)")
    ffns = []
    for s in range(num_experts):
        path = mcl_dir / f"stage_{s}" / FFN_FILE
        if not path.is_file():
            raise ValueError(f"MCL folder {mcl_dir}: stage {s} is recorded as done but {path} is missing")
        if ffn_file_run(path) != record["run_id"]:
            raise ValueError(f"{path} was written by another MCL run (run id {ffn_file_run(path)}) than the one "
                             f"{MCL_RUN_FILE} records ({record['run_id']}); the folder mixes runs")
        ffns.append(load_ffns(path, model))
    return ffns


def load_ffns(path, model) -> dict[str, dict[str, torch.Tensor]]:
    """Read an ffn.safetensors written by `save_ffns`, split per MLP of `model` (validating the names)."""
    try:
        flat = load_file(str(path))
    except Exception as exc:  # safetensors reports a truncated or foreign file without its name
        raise ValueError(f"{path}: cannot be read as a safetensors file of FFN weights ({exc})") from exc
    ffns = {}
    for name, mlp in dense_mlps(model).items():
        keys = list(mlp.state_dict())
        missing = [k for k in keys if f"{name}.{k}" not in flat]
        if missing:
            raise ValueError(f"{path}: no weights for {name}.{missing[0]}; the file holds the FFNs of another "
                             f"architecture")
        ffns[name] = {k: flat[f"{name}.{k}"] for k in keys}
    return ffns


def build_clip_moe(base_model, stage_ffns: list[dict[str, dict[str, torch.Tensor]]], top_k: int = 2, **moe_kwargs):
    """A CLIP-MoE from a dense model and one FFN set per stage: expert j of every block = stage j's FFN (stage 0 =
    the base FFN); routers randomly initialised. `base_model` is left untouched; moe_kwargs go to `upcycle`."""
    if not stage_ffns:
        raise ValueError("stage_ffns must hold at least one stage's FFNs")
    if not 1 <= top_k <= len(stage_ffns):
        raise ValueError(f"top_k must be in [1, {len(stage_ffns)}] (the number of experts = stages + 1), got {top_k}")
    model = copy.deepcopy(base_model)
    names = list(dense_mlps(model))
    for j, stage in enumerate(stage_ffns):
        missing = [n for n in names if n not in stage]
        if missing:
            raise ValueError(f"stage_ffns[{j}] lacks the FFN of {missing[0]} (and {len(missing) - 1} more)")
    experts = {name: [stage[name] for stage in stage_ffns] for name in names}
    return upcycle(model, num_experts=len(stage_ffns), top_k=top_k, experts=experts,
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
    image_features = text_features = None
    done = 0
    for image, text in progress_bar(loader, desc=desc, enabled=None if info.is_main else False):
        with autocast(precision, info.device):
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
    # train() fixes the model's own scale (cfg.logit_scale "auto" or a number) and passes it to the loss per call.
    fixed = None if cfg.logit_scale in (None, AUTO) else cfg.logit_scale
    return ContrastiveLoss(logit_scale=fixed, label_smoothing=cfg.label_smoothing)


def load_labels(path, num_samples: int) -> torch.Tensor:
    """The accumulated cluster labels a resumed MCL run wrote (weights_only: no code runs from the file)."""
    try:
        labels = torch.load(path, weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: cannot be read as cluster labels ({type(exc).__name__}); delete it or drop "
                         f"--resume") from exc
    if not (isinstance(labels, torch.Tensor) and labels.dtype == torch.long and labels.shape == (num_samples,)):
        got = f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"{path}: expected the cluster labels of {num_samples} samples (int64 [{num_samples}]), got "
                         f"{got}; delete it or drop --resume")
    return labels


def _log(out_dir: Path, record: dict, info: DistInfo):
    if info.is_main:
        with open(out_dir / "pipeline.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def run_mcl(base_model, dataset, cfg: TrainConfig, out_dir, info: DistInfo, *, stages: int = 3,
            clusters: int = 3, start_from: str = "base", small_cluster: str = "drop", resume: bool = False,
            embed_data=None, embed_batch_size: int = 256) -> list[dict[str, dict[str, torch.Tensor]]]:
    """Stage 0 (the base) plus `stages` MCL stages; returns the FFN sets of stages 0..stages and writes
    out_dir/stage_{s}/ffn.safetensors, out_dir/labels_{s}.pt (accumulated labels after clustering s), metrics, and
    out_dir/mcl_run.json, the run record: a run id (also stored in every ffn file) and the labels and stages this
    run started and finished. A run without `resume` starts a new record; a resumed one reuses only the labels,
    stage files and train states its record lists, so stale files of an earlier run in out_dir are never used.
    `embed_data` (default `dataset`): the same samples with evaluation transforms, embedded for clustering."""
    if start_from not in START_FROM:
        raise ValueError(f"start_from must be one of {START_FROM}, got {start_from!r}")
    if stages < 1:
        raise ValueError(f"stages must be >= 1, got {stages}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The run record: what this run finished, so that a resume or `build` never uses the files of another run.
    previous_record = read_mcl_run(out_dir) if resume else None
    barrier(info)  # every rank has read the record before the main rank rewrites it
    record = previous_record or {"format": "clipmoe-mcl", "run_id": uuid.uuid4().hex, "labels": [], "started": [],
                                 "done": []}
    settings = {"clusters": clusters, "start_from": start_from, "small_cluster": small_cluster}
    for key, value in settings.items():
        if previous_record is not None and previous_record.get(key, value) != value:
            raise ValueError(f"resume: the MCL run in {out_dir} ran with {key}={previous_record[key]!r}, not "
                             f"{value!r}; resume it with the same value, or start a new run without resume")
    record.update(stages=stages, **settings)

    def mark(field, s):
        if s not in record[field]:
            record[field].append(s)
        _write_mcl_run(out_dir, record, info)

    base_model = base_model.to(info.device)
    ffns = [ffn_state_dicts(base_model)]
    if info.is_main:
        save_ffns(ffns[0], out_dir / "stage_0" / FFN_FILE, record["run_id"])
    mark("done", 0)
    labels, previous = None, base_model
    for s in range(1, stages + 1):
        labels_path = out_dir / f"labels_{s - 1}.pt"
        if resume and s - 1 in record["labels"] and labels_path.exists():
            labels = load_labels(labels_path, len(dataset))
        else:
            stage_labels = cluster_dataset(previous, embed_data or dataset, info, clusters=clusters, seed=cfg.seed + s,
                                           batch_size=embed_batch_size, precision=cfg.precision, workers=cfg.workers,
                                           desc=f"embed stage {s - 1}")
            labels = accumulate_labels(labels, stage_labels, clusters * clusters)
            if info.is_main:
                atomic_torch_save(labels, labels_path)
            mark("labels", s - 1)
        stage_dir = out_dir / f"stage_{s}"
        model = copy.deepcopy(base_model if start_from == "base" else previous)
        if resume and s in record["done"] and (stage_dir / FFN_FILE).exists():
            stage_ffns = load_ffns(stage_dir / FFN_FILE, model)
        else:
            sampler = ClusterBatchSampler(labels, per_rank_batch(cfg, info), world_size=info.world_size,
                                          rank=info.rank, seed=cfg.seed + s, small_cluster=small_cluster)
            summary = {"stage": s, "clusters": int(labels.unique().numel()), **sampler.summary()}
            _log(out_dir, summary, info)
            if info.is_main:
                logger.info("MCL stage %d: %d accumulated clusters, %d of them hold a global batch; %d of %d "
                            "samples dropped this epoch (%s policy)", s, summary["clusters"],
                            summary["num_kept_clusters"], summary["num_dropped"], summary["num_samples"],
                            small_cluster)
            resume_stage = resume and s in record["started"]  # never continue another run's train state
            mark("started", s)
            summary = train(model, dataset, sampler, contrastive_loss(cfg), cfg, stage_dir, trainable="ffn",
                            info=info, resume=resume_stage, desc=f"MCL stage {s}/{stages}")
            _log(out_dir, {"stage": s, "train": summary}, info)
            stage_ffns = ffn_state_dicts(model)
            if info.is_main:
                save_ffns(stage_ffns, stage_dir / FFN_FILE, record["run_id"])
            mark("done", s)
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
                      num_experts: int = 4, top_k: int = 2, router_cfg: TrainConfig | None = None,
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
