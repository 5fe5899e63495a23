"""CLIP contrastive loss (open_clip `ClipLoss` semantics) with the official CLIP-MoE options.

Loss: symmetric InfoNCE, ½·(CE(s·I·Tᵀ, y) + CE(s·T·Iᵀ, y)), with s the logit scale (the multiplier, i.e. exp of the
learned log-scale; CLIP-MoE fixes it to 100 = exp(ln 100), τ = 0.01) and optional label smoothing (CLIP-MoE: 0.1).

Under torch.distributed (initialised, world size W > 1) each rank holds a local batch of B rows (B must be equal on
all ranks: the all-gather needs equal shapes; `ClusterBatchSampler` guarantees it). Features are all-gathered in rank
order, so global row r·B + i is row i of rank r.
- local_loss=True (official code, default): rank r scores its own B rows against all W·B columns, targets r·B + i.
- local_loss=False: every rank computes the full W·B × W·B logits (more compute, same gradient).
- gather_with_grad=True (official code, default): the gather is differentiable (torch.distributed.nn all_gather; its
  backward sums the column gradients of all ranks into the owning rank). With DDP's gradient averaging, parameter
  gradients then equal those of one process on the global batch; the per-rank loss value is that rank's share, and
  the mean over ranks of the loss equals the single-process loss (local_loss=True).
- gather_with_grad=False: open_clip's default; gathered copies carry no gradient (with local_loss=False the own rows
  are put back so they do), which scales gradients by 1/W compared with one process.
Without torch.distributed (or W = 1) it is the plain single-process loss.
"""
import math
import warnings
from typing import Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# CLIP-MoE's fixed temperature: the log-scale is set to ln(100) and frozen, so logits are multiplied by 100 (τ = 0.01).
FIXED_LOGIT_SCALE = 100.0
FIXED_LOG_LOGIT_SCALE = math.log(100.0)

ScaleLike = Union[float, torch.Tensor]


def _world(group) -> Tuple[int, int]:
    """(rank, world size) in `group`, or (0, 1) when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def gather_features(features: torch.Tensor, *, with_grad: bool = True, group=None,
                    replace_own: bool = False) -> torch.Tensor:
    """All-gather [B, D] features of every rank into [W·B, D] (rank order); identity without torch.distributed.

    with_grad: differentiable gather (gradients of other ranks' losses flow back to the owning rank).
    replace_own (only without grad): put this rank's own tensor back so its rows keep their gradient.
    """
    rank, world = _world(group)
    if world == 1:
        return features
    if with_grad:
        import torch.distributed.nn.functional as dist_fn
        with warnings.catch_warnings():
            # 2.x marks it deprecated in favour of private functional collectives; it is the public autograd gather.
            warnings.simplefilter("ignore", FutureWarning)
            parts = dist_fn.all_gather(features, group=group if group is not None else dist.group.WORLD)
        return torch.cat(parts, dim=0)
    parts = [torch.empty_like(features) for _ in range(world)]
    dist.all_gather(parts, features.detach().contiguous(), group=group)
    if replace_own:
        parts[rank] = features
    return torch.cat(parts, dim=0)


def clip_contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: ScaleLike,
                          *, label_smoothing: float = 0.0, local_loss: bool = True, gather_with_grad: bool = True,
                          logit_bias: Optional[ScaleLike] = None, group=None) -> torch.Tensor:
    """Symmetric CLIP loss of this rank (see the module docstring for the distributed semantics).

    Args:
        image_features, text_features: [B, D] local batch (usually L2-normalised); row i of each is one pair.
        logit_scale: the multiplier s (not its log): a float or a scalar tensor (e.g. `model.logit_scale.exp()`).
        label_smoothing: passed to F.cross_entropy in both directions (CLIP-MoE: 0.1; open_clip: 0).
        local_loss, gather_with_grad: as open_clip's ClipLoss; ignored without torch.distributed.
        logit_bias: optional additive bias (SigLIP-style models), as open_clip.
        group: process group (default: the world).
    Returns:
        scalar loss (fp32 if the features are fp32; CE runs in the logits' dtype as in open_clip).
    """
    if image_features.dim() != 2 or image_features.shape != text_features.shape:
        raise ValueError(f"image_features and text_features must both be [B, D] with equal shapes, got "
                         f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    rank, world = _world(group)
    batch = image_features.shape[0]
    if world == 1:
        logits_per_image = logit_scale * image_features @ text_features.T
        logits_per_text = logit_scale * text_features @ image_features.T
        offset = 0
    else:
        all_image = gather_features(image_features, with_grad=gather_with_grad, group=group,
                                    replace_own=not local_loss)
        all_text = gather_features(text_features, with_grad=gather_with_grad, group=group,
                                   replace_own=not local_loss)
        if local_loss:
            logits_per_image = logit_scale * image_features @ all_text.T
            logits_per_text = logit_scale * text_features @ all_image.T
            offset = rank * batch
        else:
            logits_per_image = logit_scale * all_image @ all_text.T
            logits_per_text = logits_per_image.T
            offset = 0
    if logit_bias is not None:
        logits_per_image = logits_per_image + logit_bias
        logits_per_text = logits_per_text + logit_bias
    targets = torch.arange(logits_per_image.shape[0], device=image_features.device, dtype=torch.long) + offset
    return (F.cross_entropy(logits_per_image, targets, label_smoothing=label_smoothing)
            + F.cross_entropy(logits_per_text, targets, label_smoothing=label_smoothing)) / 2


class ContrastiveLoss(nn.Module):
    """`clip_contrastive_loss` as a module, drop-in for open_clip's ClipLoss call (image, text, logit_scale).

    ContrastiveLoss(logit_scale=FIXED_LOGIT_SCALE, label_smoothing=0.1) is the official CLIP-MoE loss (with the
    defaults local_loss=True, gather_with_grad=True). ContrastiveLoss() with a per-call logit_scale and the open_clip
    options is open_clip's ClipLoss. A logit_scale given to forward takes precedence over the fixed one.
    """

    def __init__(self, *, logit_scale: Optional[float] = None, label_smoothing: float = 0.0, local_loss: bool = True,
                 gather_with_grad: bool = True, group=None):
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if logit_scale is not None and not logit_scale > 0:
            raise ValueError(f"logit_scale is the multiplier exp(log-scale) and must be > 0, got {logit_scale}")
        self.fixed_logit_scale = logit_scale
        self.label_smoothing = label_smoothing
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.group = group

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: Optional[ScaleLike] = None, logit_bias: Optional[ScaleLike] = None,
                output_dict: bool = False):
        scale = logit_scale if logit_scale is not None else self.fixed_logit_scale
        if scale is None:
            raise ValueError("no logit_scale: pass one to forward or construct with logit_scale=... "
                             f"(CLIP-MoE uses {FIXED_LOGIT_SCALE})")
        loss = clip_contrastive_loss(image_features, text_features, scale, label_smoothing=self.label_smoothing,
                                     local_loss=self.local_loss, gather_with_grad=self.gather_with_grad,
                                     logit_bias=logit_bias, group=self.group)
        return {"contrastive_loss": loss} if output_dict else loss

    def extra_repr(self) -> str:
        return (f"logit_scale={self.fixed_logit_scale}, label_smoothing={self.label_smoothing}, "
                f"local_loss={self.local_loss}, gather_with_grad={self.gather_with_grad}")
