"""CLIP contrastive loss: open_clip's `ClipLoss` with the two options of CLIP-MoE, label smoothing and a fixed scale.

Loss: symmetric InfoNCE, ½·(CE(s·I·Tᵀ, y) + CE(s·T·Iᵀ, y)), with s the logit scale (the multiplier, i.e. exp of the
learned log-scale; CLIP-MoE fixes it to 100 = exp(ln 100), τ = 0.01) and optional label smoothing (CLIP-MoE: 0.1).
The gathering, the logits and the targets are open_clip's (`ClipLoss.get_logits`, `get_ground_truth`); this module
adds the smoothing, the fixed scale, input checks, and takes rank and world size from torch.distributed per call.

Under torch.distributed (initialised, world size W > 1) each rank holds a local batch of B rows (B must be equal on
all ranks: the all-gather needs equal shapes; `ClusterBatchSampler` guarantees it). Features are all-gathered in rank
order over the default process group, so global row r·B + i is row i of rank r.
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

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from clipmoe.runtime import rank_world

# CLIP-MoE's fixed temperature: the log-scale is set to ln(100) and frozen, so logits are multiplied by 100 (τ = 0.01).
FIXED_LOGIT_SCALE = 100.0
FIXED_LOG_LOGIT_SCALE = math.log(100.0)

ScaleLike = float | torch.Tensor


class ContrastiveLoss(ClipLoss):
    """open_clip's ClipLoss plus label smoothing and an optional fixed logit scale; same call signature.

    ContrastiveLoss(logit_scale=FIXED_LOGIT_SCALE, label_smoothing=0.1) is the official CLIP-MoE loss (with the
    defaults local_loss=True, gather_with_grad=True). ContrastiveLoss() with a per-call logit_scale is open_clip's
    ClipLoss(local_loss=True, gather_with_grad=True). A logit_scale given to forward takes precedence over the fixed
    one. Rank and world size are read from torch.distributed at every call (ClipLoss fixes them at construction).
    """

    def __init__(self, *, logit_scale: float | None = None, label_smoothing: float = 0.0, local_loss: bool = True,
                 gather_with_grad: bool = True):
        super().__init__(local_loss=local_loss, gather_with_grad=gather_with_grad)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if logit_scale is not None and not logit_scale > 0:
            raise ValueError(f"logit_scale is the multiplier exp(log-scale) and must be > 0, got {logit_scale}")
        self.fixed_logit_scale = logit_scale
        self.label_smoothing = label_smoothing

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: ScaleLike | None = None, logit_bias: ScaleLike | None = None,
                output_dict: bool = False):
        if image_features.dim() != 2 or image_features.shape != text_features.shape:
            raise ValueError(f"image_features and text_features must both be [B, D] with equal shapes, got "
                             f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")
        scale = logit_scale if logit_scale is not None else self.fixed_logit_scale
        if scale is None:
            raise ValueError("no logit_scale: pass one to forward or construct with logit_scale=... "
                             f"(CLIP-MoE uses {FIXED_LOGIT_SCALE})")
        self.rank, self.world_size = rank_world()
        with warnings.catch_warnings():
            # torch 2.x marks torch.distributed.nn's all_gather deprecated; it is still the public autograd gather.
            warnings.simplefilter("ignore", FutureWarning)
            logits_per_image, logits_per_text = self.get_logits(image_features, text_features, scale,
                                                                logit_bias=logit_bias)
        targets = self.get_ground_truth(image_features.device, logits_per_image.shape[0])
        loss = (F.cross_entropy(logits_per_image, targets, label_smoothing=self.label_smoothing)
                + F.cross_entropy(logits_per_text, targets, label_smoothing=self.label_smoothing)) / 2
        return {"contrastive_loss": loss} if output_dict else loss

    def extra_repr(self) -> str:
        return (f"logit_scale={self.fixed_logit_scale}, label_smoothing={self.label_smoothing}, "
                f"local_loss={self.local_loss}, gather_with_grad={self.gather_with_grad}")


def clip_contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: ScaleLike,
                          *, label_smoothing: float = 0.0, local_loss: bool = True, gather_with_grad: bool = True,
                          logit_bias: ScaleLike | None = None) -> torch.Tensor:
    """`ContrastiveLoss` as a function: the symmetric CLIP loss of this rank.

    Args:
        image_features, text_features: [B, D] local batch (usually L2-normalised); row i of each is one pair.
        logit_scale: the multiplier s (not its log): a float or a scalar tensor (e.g. `model.logit_scale.exp()`).
        label_smoothing: passed to F.cross_entropy in both directions (CLIP-MoE: 0.1; open_clip: 0).
        local_loss, gather_with_grad: as open_clip's ClipLoss; ignored without torch.distributed.
        logit_bias: optional additive bias (SigLIP-style models), as open_clip.
    Returns:
        scalar loss (fp32 if the features are fp32; CE runs in the logits' dtype as in open_clip).
    """
    loss = ContrastiveLoss(label_smoothing=label_smoothing, local_loss=local_loss, gather_with_grad=gather_with_grad)
    return loss(image_features, text_features, logit_scale, logit_bias)
