"""The training loop shared by MCL stages, router training and the baselines: which parameters train, AdamW with
warmup + cosine, optional autocast, DDP under torchrun, a progress bar, JSON-lines metrics, and resumable
checkpoints written atomically.

Resume contract: the batch order of an epoch is a function of (seed, epoch) only (the batch samplers' `set_epoch`);
each sample is read with the RNGs seeded from (seed, step, position in the global batch), so random augmentation
depends on which draw it is, not on the rank, process or DataLoader worker that makes it (N ranks draw what one
process with their global batch draws); the DataLoader gets its own generator so creating it draws nothing from the
global RNG; and a checkpoint stores the trainable tensors, optimizer, scheduler, step and RNG states. A run killed
after a checkpoint and resumed therefore takes the same steps as an uninterrupted one, with any number of DataLoader
workers (bit-exact in deterministic mode on CPU).

The checkpoint (train_state.pt) holds only tensors, numbers, strings, lists and dicts: it is read with
torch.load(weights_only=True), so a crafted file cannot run code.
"""
import itertools
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from clipmoe.fileio import atomic_torch_save, atomic_write
from clipmoe.moe_ffn import collect_aux_losses
from clipmoe.progress import progress_bar
from clipmoe.runtime import PRECISIONS, autocast
from clipmoe.train.distributed import DistInfo

logger = logging.getLogger(__name__)

TRAINABLE = ("ffn", "router", "router_experts", "all")
STATE_FILE = "train_state.pt"
STATE_KEYS = ("step", "trainable", "params", "optimizer", "scheduler", "scaler", "rng", "config")
METRICS_FILE = "metrics.jsonl"
AUTO = "auto"


@dataclass
class TrainConfig:
    lr: float = 1e-5                  # CLIP-MoE: 1e-5 for MCL stages, 1e-6 for router training
    weight_decay: float = 0.2         # CLIP-MoE: 0.2 for MCL stages, 0.01 for router training
    warmup_steps: int = 200           # linear warm-up, then cosine decay to 0
    epochs: int = 1                   # CLIP-MoE: 1 epoch per stage
    max_steps: int | None = None   # stop after this many steps (overrides epochs when set)
    batch_size: int = 800             # global batch (split across ranks); CLIP-MoE: 100 per GPU x 8
    precision: str = "fp32"           # "fp32", "amp_bf16" or "amp_fp16" (autocast; fp16 adds a GradScaler)
    label_smoothing: float = 0.1      # CLIP-MoE uses 0.1 in both directions
    # The logit scale (multiplier, 1/temperature), frozen while training: "auto" keeps the model's own learned scale
    # (the official fixed 100 for real CLIP bases, whose learned scale is 100); a number fixes it; None trains it.
    logit_scale: float | str | None = AUTO
    balance_alpha: float = 0.01       # weight of the load-balancing loss of MoE layers (0 for dense models)
    checkpoint_every: int = 100       # steps between resumable checkpoints
    workers: int = 0                  # DataLoader worker processes
    seed: int = 0
    deterministic: bool = False       # torch.use_deterministic_algorithms, for bit-exact resume tests

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        for name in ("epochs", "batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be None or >= 1, got {self.max_steps}")
        for name in ("warmup_steps", "workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "weight_decay", "balance_alpha"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        scale = self.logit_scale
        if not (scale is None or scale == AUTO or (isinstance(scale, (int, float)) and math.isfinite(scale)
                                                     and scale > 0)):
            raise ValueError(f"logit_scale must be 'auto', None or a finite number > 0, got {scale!r}")


def is_trainable(name: str, which: str) -> bool:
    """Official CLIP-MoE rules: MCL stages train parameters whose name contains 'mlp' (both towers' FFNs); router
    training trains only the gates. 'router_experts' trains whole MoE layers (sparse upcycling)."""
    if which not in TRAINABLE:
        raise ValueError(f"trainable must be one of {TRAINABLE}, got {which!r}")
    in_ffn = ".mlp." in f".{name}"
    return {"all": True, "ffn": in_ffn, "router_experts": in_ffn,
            "router": in_ffn and name.endswith("router.weight")}[which]


def set_trainable(model: torch.nn.Module, which: str) -> list:
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(is_trainable(name, which))
        if p.requires_grad:
            names.append(name)
    if not names:
        raise ValueError(f"trainable={which!r} selects no parameter of this model")
    return names


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def _rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _check_state(state, path: Path) -> dict:
    if not isinstance(state, dict) or any(k not in state for k in STATE_KEYS):
        raise ValueError(f"{path}: not a clipmoe train state (expected a dict with keys {list(STATE_KEYS)}); "
                         f"delete it or drop --resume")
    return state


def load_state(path, device) -> dict:
    """Read a train_state.pt: weights_only=True (no code runs from the file); a corrupt file names itself."""
    path = Path(path)
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # truncated zip, pickle garbage, objects weights_only refuses (code to run)
        raise ValueError(f"{path}: cannot be read as a clipmoe train state ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); delete it or drop --resume") from exc
    return _check_state(state, path)


def read_metrics(path, up_to_step: int | None = None) -> list:
    """The records of a metrics.jsonl (those with step <= up_to_step). A torn last line (a run killed while writing
    it, always after its last checkpoint) is dropped; any other unreadable line is an error naming file and line."""
    path = Path(path)
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            step = record["step"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            if number == len(lines):
                logger.warning("%s: dropping its torn last line %d (the run was killed while writing it)",
                               path, number)
                break
            raise ValueError(f"{path}: line {number} is not a metrics record ({exc})") from exc
        if up_to_step is None or step <= up_to_step:
            records.append(record)
    return records


class SeededDraws(Dataset):
    """`dataset[index]` for keys (draw_seed, index), read with torch's and Python's RNGs seeded from draw_seed and
    restored afterwards: random transforms then give the same sample in any process or DataLoader worker.

    The DataLoader reads a batch of keys with one `__getitems__` call: the RNG states are saved and restored once
    per batch, and each draw seeds only the CPU generator (torch.manual_seed, on a CUDA build whose GPU is not
    initialised, formats the Python stack for its deferred GPU seed: 0.1-0.3 ms, growing with the stack depth; per
    sample that was about 40 % of a demo training step)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        return self.__getitems__([key])[0]

    def __getitems__(self, keys):
        torch_state, python_state = torch.get_rng_state(), random.getstate()
        try:
            samples = []
            for seed, index in keys:
                torch.default_generator.manual_seed(seed)  # what torch.manual_seed does to the CPU generator
                random.seed(seed)
                samples.append(self.dataset[index])
            if keys:
                # torch.manual_seed per draw (earlier versions) also reseeded the accelerators' generators, with the
                # batch's last draw seed sticking; a GPU run with workers=0 draws its dropout from there: kept, once.
                torch.manual_seed(keys[-1][0])
            return samples
        finally:
            torch.set_rng_state(torch_state)
            random.setstate(python_state)


def draw_seed(seed: int, step: int, slot: int) -> int:
    """A distinct seed per sample draw: (run seed, global step, slot in the global batch). No rank: the draw of a
    sample is the same whichever rank reads it. (The same numbers as the rank-0 seeds of earlier versions, so
    single-process runs draw what they drew before.)"""
    return ((seed * 1_000_003 * 1_000_000_007 + step) * 1_000_033 + slot) % (2 ** 63)


def draw_keys(local_batches, seed: int, first_step: int, rank: int):
    """SeededDraws keys (draw_seed, index) of this rank's batches of steps first_step, first_step + 1, ..., one
    batch at a time (a generator: no key exists before its batch is reached).

    A rank's batch is chunk `rank` of its global batch, all chunks of equal length (ClusterBatchSampler's split,
    which the loss's all-gather also assumes), so slot j of rank r is slot r·len(batch) + j of the global batch."""
    for b, batch in enumerate(local_batches):
        yield [(draw_seed(seed, first_step + b, rank * len(batch) + j), i) for j, i in enumerate(batch)]


class EpochDraws:
    """The DataLoader's batch sampler for the rest of an epoch: this rank's batches from batch `offset` of the
    epoch's plan on (a resumed run skips the batches it did), as draw_keys, made lazily so that memory per rank does
    not grow with the dataset (the plan itself is a tensor, ClusterBatchSampler.global_batches)."""

    def __init__(self, batch_sampler, offset: int, seed: int, first_step: int, rank: int):
        self.batch_sampler, self.offset = batch_sampler, offset
        self.seed, self.first_step, self.rank = seed, first_step, rank

    def __len__(self) -> int:
        return len(self.batch_sampler) - self.offset

    def __iter__(self):
        return draw_keys(itertools.islice(self.batch_sampler, self.offset, None), self.seed, self.first_step,
                         self.rank)


def resolve_logit_scale(cfg: TrainConfig, model) -> float | None:
    """The fixed logit scale this run trains with ("auto": the model's own learned one); None: trained."""
    if cfg.logit_scale == AUTO:
        return float(model.logit_scale.detach().exp())
    return None if cfg.logit_scale is None else float(cfg.logit_scale)


def train(model, dataset, batch_sampler, loss_fn, cfg: TrainConfig, out_dir, *, trainable: str, info: DistInfo,
          resume: bool = False, desc: str = "train") -> dict:
    """Train `model` in place on `dataset` with `batch_sampler` (this rank's batches, with `set_epoch`: chunk
    `info.rank` of each global batch, as ClusterBatchSampler splits it).

    `loss_fn(image_features, text_features, logit_scale)` is the contrastive loss (features L2-normalised, local to
    this rank; it gathers across ranks itself). MoE layers add `cfg.balance_alpha` x their mean balance loss.
    Writes `out_dir/metrics.jsonl` (per step: the losses as means over ranks, the learning rate, and the bad samples
    the dataset skipped so far, summed over ranks) and `out_dir/train_state.pt` (resumable); returns a summary dict.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_path, metrics_path = out_dir / STATE_FILE, out_dir / METRICS_FILE
    torch.manual_seed(cfg.seed + info.rank)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    model.to(info.device)
    logit_scale = resolve_logit_scale(cfg, model)
    if logit_scale is not None and cfg.logit_scale != AUTO:
        with torch.no_grad():
            model.logit_scale.fill_(math.log(logit_scale))
    trainable_names = set_trainable(model, trainable)
    if logit_scale is not None:
        model.logit_scale.requires_grad_(False)
    if info.is_main:
        logger.info("%s: logit scale %s (%s), label smoothing %g", desc,
                    "trained" if logit_scale is None else f"{logit_scale:.4g}, fixed",
                    {AUTO: "the model's own"}.get(cfg.logit_scale, "--logit-scale"), cfg.label_smoothing)
    params = [p for p in model.parameters() if p.requires_grad]
    net = model
    if info.enabled:
        net = DistributedDataParallel(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(batch_sampler)
    if steps_per_epoch == 0:
        raise ValueError(f"{desc}: the batch sampler yields no batch (dataset of {len(dataset)} samples, "
                         f"global batch {cfg.batch_size}); lower --batch-size or add data")
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup_steps, total))
    scaler = torch.amp.GradScaler(enabled=cfg.precision == "amp_fp16")
    is_moe = any(type(m).__name__ == "MoEFFN" for m in model.modules())

    def skipped_now():  # bad samples the dataset skipped or substituted in this process (all its workers)
        return int(getattr(dataset, "num_skipped", 0))

    step, skipped_before, skipped_at_start = 0, 0, skipped_now()
    skipped = 0  # this run's bad samples so far (with those of the run it resumes), summed over ranks at every step
    if resume and state_path.exists():
        state = load_state(state_path, info.device)
        if state["trainable"] != trainable_names:
            raise ValueError(f"{state_path}: checkpoint of other trainable parameters (another architecture or "
                             f"--trainable); delete it or drop --resume")
        with torch.no_grad():
            current = dict(model.named_parameters())
            for name, tensor in state["params"].items():
                current[name].copy_(tensor)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step, skipped_before = state["step"], int(state.get("skipped_samples", 0))
        skipped = skipped_before
        _set_rng_state(state["rng"])
        if metrics_path.exists() and info.is_main:  # drop lines logged after the checkpoint
            text = "".join(json.dumps(r) + "\n" for r in read_metrics(metrics_path, up_to_step=step))
            atomic_write(metrics_path, lambda tmp: tmp.write_text(text))
    elif metrics_path.exists() and info.is_main:
        metrics_path.unlink()

    def save_state():
        if info.is_main:
            atomic_torch_save({"step": step, "trainable": trainable_names,
                               "params": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
                               "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                               "scaler": scaler.state_dict(), "rng": _rng_state(), "config": asdict(cfg),
                               "skipped_samples": skipped},
                              state_path)

    net.train()
    start, last = time.time(), {}
    progress = progress_bar(total=total, initial=step, desc=desc, enabled=None if info.is_main else False)
    draws = SeededDraws(dataset)
    while step < total:
        epoch, offset = divmod(step, steps_per_epoch)
        batch_sampler.set_epoch(epoch)
        batches = EpochDraws(batch_sampler, offset, cfg.seed, step, info.rank)  # minus the batches done before a resume
        loader = DataLoader(draws, batch_sampler=batches, num_workers=cfg.workers,
                            generator=torch.Generator().manual_seed(cfg.seed))
        for images, texts in loader:
            images, texts = images.to(info.device, non_blocking=True), texts.to(info.device, non_blocking=True)
            with autocast(cfg.precision, info.device):
                image_features, text_features, scale = net(images, texts)[:3]
                clip_loss = loss_fn(image_features, text_features, scale)
                balance = collect_aux_losses(model).balance if is_moe else clip_loss.new_zeros(())
                loss = clip_loss + cfg.balance_alpha * balance
            # The logged losses are means over ranks (each rank's loss is its share of the global batch's); the bad
            # samples are summed over ranks (each counts the reads of its own process), in one all-reduce.
            logged = torch.stack([loss.detach(), clip_loss.detach(), balance.detach()]).double()
            logged = torch.cat([logged, logged.new_tensor([skipped_now() - skipped_at_start])])
            if info.enabled:
                dist.all_reduce(logged)
            mean_loss, mean_clip, mean_balance = (logged[:3] / info.world_size).tolist()
            skipped = skipped_before + int(logged[3])
            if not math.isfinite(mean_loss):  # every rank sees the same mean: all stop together
                raise FloatingPointError(f"{desc}: non-finite loss {mean_loss} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            last = {"step": step, "epoch": epoch, "loss": mean_loss, "clip_loss": mean_clip,
                    "balance_loss": mean_balance, "lr": scheduler.get_last_lr()[0],
                    "skipped_samples": skipped, "seconds": round(time.time() - start, 3)}
            if info.is_main:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(last) + "\n")
            progress.update(1)
            progress.set_postfix(loss=f"{last['loss']:.4f}")
            if step % cfg.checkpoint_every == 0 or step == total:
                save_state()
            if step >= total:
                break
    progress.close()
    summary = {"steps": step, "final": last, "seconds": time.time() - start, "trainable": len(trainable_names),
               "logit_scale": logit_scale, "label_smoothing": cfg.label_smoothing,
               "skipped_samples": skipped}
    if info.is_main:
        logger.info("%s: %d steps, final loss %s, %d bad samples skipped", desc, step,
                    f"{last['loss']:.4f}" if last else "-", summary["skipped_samples"])
    return summary
