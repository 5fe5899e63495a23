"""Training: the loop (resumable, DDP), the DMU pipeline (MCL stages, assembly, router training, baselines),
k-means clustering, the contrastive loss and the distributed set-up."""
from clipmoe.train.cluster import accumulate_labels, assign, cluster_stage, decode_labels, joint_labels, kmeans
from clipmoe.train.contrastive import FIXED_LOGIT_SCALE, ContrastiveLoss, clip_contrastive_loss
from clipmoe.train.dmu import build_clip_moe, finetune_baseline, run_mcl, train_router
from clipmoe.train.loop import TrainConfig, train

__all__ = ["ContrastiveLoss", "FIXED_LOGIT_SCALE", "TrainConfig", "accumulate_labels", "assign", "build_clip_moe",
           "clip_contrastive_loss", "cluster_stage", "decode_labels", "finetune_baseline", "joint_labels", "kmeans",
           "run_mcl", "train", "train_router"]
