"""The training loop shared by MCL stages, router training and the baselines: which parameters train, AdamW with
warmup + cosine, optional autocast, DDP under torchrun, a progress bar, JSON-lines metrics, and resumable
checkpoints written atomically.

Resume contract: the batch order of an epoch is a function of (seed, epoch) only (the batch samplers' `set_epoch`),
the DataLoader gets its own generator so creating it draws nothing from the global RNG, and a checkpoint stores the
trainable tensors, optimizer, scheduler, step and RNG states. A run killed after a checkpoint and resumed therefore
takes the same steps as an uninterrupted one (bit-exact in deterministic mode on CPU).
"""
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from clipmoe.fileio import atomic_torch_save
from clipmoe.moe_ffn import collect_aux_losses
from clipmoe.runtime import PRECISIONS, autocast
from clipmoe.train.distributed import DistInfo

TRAINABLE = ("ffn", "router", "router_experts", "all")
STATE_FILE = "train_state.pt"
METRICS_FILE = "metrics.jsonl"


@dataclass
class TrainConfig:
    lr: float = 1e-5                  # CLIP-MoE: 1e-5 for MCL stages, 1e-6 for router training
    weight_decay: float = 0.2         # CLIP-MoE: 0.2 for MCL stages, 0.01 for router training
    warmup_steps: int = 200           # linear warm-up, then cosine decay to 0
    epochs: int = 1                   # CLIP-MoE: 1 epoch per stage
    max_steps: Optional[int] = None   # stop after this many steps (overrides epochs when set)
    batch_size: int = 800             # global batch (split across ranks); CLIP-MoE: 100 per GPU x 8
    precision: str = "fp32"           # "fp32", "amp_bf16" or "amp_fp16" (autocast; fp16 adds a GradScaler)
    label_smoothing: float = 0.1      # CLIP-MoE uses 0.1 in both directions
    logit_scale: Optional[float] = 100.0  # fixed temperature 1/100 (CLIP-MoE); None trains the model's own
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


def train(model, dataset, batch_sampler, loss_fn, cfg: TrainConfig, out_dir, *, trainable: str, info: DistInfo,
          resume: bool = False, desc: str = "train") -> dict:
    """Train `model` in place on `dataset` with `batch_sampler` (this rank's batches, with `set_epoch`).

    `loss_fn(image_features, text_features, logit_scale)` is the contrastive loss (features L2-normalised, local to
    this rank; it gathers across ranks itself). MoE layers add `cfg.balance_alpha` x their mean balance loss.
    Writes `out_dir/metrics.jsonl` and `out_dir/train_state.pt` (resumable); returns a summary dict.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_path, metrics_path = out_dir / STATE_FILE, out_dir / METRICS_FILE
    torch.manual_seed(cfg.seed + info.rank)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    model.to(info.device)
    if cfg.logit_scale is not None:
        with torch.no_grad():
            model.logit_scale.fill_(math.log(cfg.logit_scale))
    trainable_names = set_trainable(model, trainable)
    if cfg.logit_scale is not None:
        model.logit_scale.requires_grad_(False)
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

    step = 0
    if resume and state_path.exists():
        state = torch.load(state_path, map_location=info.device, weights_only=False)
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
        step = state["step"]
        _set_rng_state(state["rng"])
        if metrics_path.exists() and info.is_main:  # drop lines logged after the checkpoint
            lines = [ln for ln in metrics_path.read_text().splitlines() if json.loads(ln)["step"] <= step]
            metrics_path.write_text("".join(ln + "\n" for ln in lines))
    elif metrics_path.exists() and info.is_main:
        metrics_path.unlink()

    def save_state():
        if info.is_main:
            atomic_torch_save({"step": step, "trainable": trainable_names,
                               "params": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
                               "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                               "scaler": scaler.state_dict(), "rng": _rng_state(), "config": asdict(cfg)},
                              state_path)

    net.train()
    start, last = time.time(), {}
    progress = tqdm(total=total, initial=step, desc=desc, disable=not info.is_main, dynamic_ncols=True)
    while step < total:
        epoch, offset = divmod(step, steps_per_epoch)
        batch_sampler.set_epoch(epoch)
        batches = list(batch_sampler)[offset:]  # the epoch's plan, minus the batches done before a resume
        loader = DataLoader(dataset, batch_sampler=batches, num_workers=cfg.workers,
                            generator=torch.Generator().manual_seed(cfg.seed))
        for images, texts in loader:
            images, texts = images.to(info.device, non_blocking=True), texts.to(info.device, non_blocking=True)
            with autocast(cfg.precision, info.device):
                image_features, text_features, logit_scale = net(images, texts)[:3]
                clip_loss = loss_fn(image_features, text_features, logit_scale)
                balance = collect_aux_losses(model).balance if is_moe else clip_loss.new_zeros(())
                loss = clip_loss + cfg.balance_alpha * balance
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{desc}: non-finite loss {loss.item()} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            last = {"step": step, "epoch": epoch, "loss": loss.item(), "clip_loss": clip_loss.item(),
                    "balance_loss": balance.item(), "lr": scheduler.get_last_lr()[0],
                    "seconds": round(time.time() - start, 3)}
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
    return {"steps": step, "final": last, "seconds": time.time() - start, "trainable": len(trainable_names)}
