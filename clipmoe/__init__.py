"""clipmoe: turn a CLIP model into a CLIP-MoE (Diversified Multiplet Upcycling), train it, and run it fast.

The top level is the model library a user swaps into CLIP code: `MoEFFN`, `upcycle`, checkpoints (own format and
the released CLIP-MoE format) and the evaluation entry points. The rest lives in subpackages:
`clipmoe.data` (datasets, synthetic data, the cluster batch sampler), `clipmoe.train` (training loop, the DMU
pipeline, clustering, contrastive loss, distributed set-up), `clipmoe.eval` (metrics, retrieval and zero-shot
evaluation, routing statistics) and `clipmoe.cli` (the `clipmoe` command). Kernels: the `clipmoe_kernels` package.
"""
from clipmoe.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from clipmoe.config import MoEConfig
from clipmoe.eval import (
                          collect_routing,
                          evaluate_retrieval,
                          evaluate_synthetic,
                          retrieval_metrics,
                          routing_statistics,
                          zero_shot_metrics,
)
from clipmoe.losses import AuxLosses, balance_loss, router_z_loss
from clipmoe.moe_ffn import MoEAux, MoEFFN, collect_aux_losses
from clipmoe.released import export_clip_moe_checkpoint, load_clip_moe_checkpoint
from clipmoe.upcycle import dense_mlps, upcycle, upcycle_from_config
from clipmoe_kernels import available_ops

__version__ = "0.2.0"

__all__ = ["AuxLosses", "CheckpointError", "MoEAux", "MoEConfig", "MoEFFN", "__version__", "available_ops",
           "balance_loss", "collect_aux_losses", "collect_routing", "dense_mlps", "evaluate_retrieval",
           "evaluate_synthetic", "export_clip_moe_checkpoint", "load_checkpoint", "load_clip_moe_checkpoint",
           "retrieval_metrics", "router_z_loss", "routing_statistics", "save_checkpoint", "upcycle",
           "upcycle_from_config", "zero_shot_metrics"]
