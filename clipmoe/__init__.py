"""clipmoe: turn a CLIP model into a CLIP-MoE (Diversified Multiplet Upcycling), train it, and run it fast."""
from clipmoe_kernels import available_ops

from clipmoe.config import MoEConfig
from clipmoe.losses import AuxLosses, balance_loss, router_z_loss
from clipmoe.moe_ffn import MoEAux, MoEFFN, collect_aux_losses
from clipmoe.upcycle import dense_mlps, upcycle, upcycle_from_config

__all__ = ["AuxLosses", "MoEAux", "MoEConfig", "MoEFFN", "available_ops", "balance_loss", "collect_aux_losses",
           "dense_mlps", "router_z_loss", "upcycle", "upcycle_from_config"]
