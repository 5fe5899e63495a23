"""clipmoe: turn a CLIP model into a CLIP-MoE (Diversified Multiplet Upcycling), train it, and run it fast."""
from clipmoe_kernels import available_ops

from clipmoe.checkpoint import (CheckpointError, export_clip_moe_checkpoint, load_checkpoint, load_clip_moe_checkpoint,
                                save_checkpoint)
from clipmoe.cluster import accumulate_labels, assign, cluster_stage, decode_labels, joint_labels, kmeans
from clipmoe.config import MoEConfig
from clipmoe.contrastive import FIXED_LOGIT_SCALE, ContrastiveLoss, clip_contrastive_loss
from clipmoe.data import (CsvCaptionDataset, InMemoryCaptionDataset, WebDatasetCaptions, collate_skip_none,
                          make_transforms_and_tokenizer)
from clipmoe.evaluate import (KarpathyRetrieval, RoutingCollector, class_embeddings, collect_routing, embed_images,
                              embed_texts, evaluate_retrieval, evaluate_synthetic, plot_routing_heatmap,
                              retrieval_metrics, routing_statistics, zero_shot_metrics)
from clipmoe.losses import AuxLosses, balance_loss, router_z_loss
from clipmoe.moe_ffn import MoEAux, MoEFFN, collect_aux_losses
from clipmoe.sampler import ClusterBatchSampler
from clipmoe.synthetic import SyntheticShapes, WordTokenizer
from clipmoe.upcycle import dense_mlps, upcycle, upcycle_from_config

__all__ = ["AuxLosses", "ClusterBatchSampler", "ContrastiveLoss", "FIXED_LOGIT_SCALE", "MoEAux", "MoEConfig", "MoEFFN",
           "accumulate_labels", "assign", "available_ops", "balance_loss", "clip_contrastive_loss", "cluster_stage",
           "collect_aux_losses", "decode_labels", "dense_mlps", "joint_labels", "kmeans", "router_z_loss", "upcycle",
           "upcycle_from_config"]
__all__ += ["CheckpointError", "export_clip_moe_checkpoint", "load_checkpoint", "load_clip_moe_checkpoint",
            "save_checkpoint"]
__all__ += ["CsvCaptionDataset", "InMemoryCaptionDataset", "SyntheticShapes", "WebDatasetCaptions", "WordTokenizer",
            "collate_skip_none", "make_transforms_and_tokenizer"]
__all__ += ["KarpathyRetrieval", "RoutingCollector", "class_embeddings", "collect_routing", "embed_images",
            "embed_texts", "evaluate_retrieval", "evaluate_synthetic", "plot_routing_heatmap", "retrieval_metrics",
            "routing_statistics", "zero_shot_metrics"]
