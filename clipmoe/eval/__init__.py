"""Evaluation: retrieval and zero-shot metrics, feature extraction and the evaluations built on it, routing
statistics of the MoE layers and their plots."""
from clipmoe.eval.metrics import (
                                  clip_benchmark_retrieval,
                                  clip_benchmark_zero_shot,
                                  mean_per_class_recall,
                                  retrieval_metrics,
                                  zero_shot_metrics,
)
from clipmoe.eval.retrieval import (
                                  PROTOCOLS,
                                  ZERO_SHOT_TEMPLATES,
                                  class_embeddings,
                                  embed_captions,
                                  embed_images,
                                  embed_texts,
                                  evaluate_retrieval,
                                  evaluate_synthetic,
                                  protocol_metrics,
)
from clipmoe.eval.routing import RoutingCollector, collect_routing, plot_routing_heatmap, routing_statistics

__all__ = ["PROTOCOLS", "RoutingCollector", "ZERO_SHOT_TEMPLATES", "class_embeddings", "clip_benchmark_retrieval",
           "clip_benchmark_zero_shot", "collect_routing", "embed_captions", "mean_per_class_recall", "protocol_metrics",
           "embed_images", "embed_texts", "evaluate_retrieval", "evaluate_synthetic", "plot_routing_heatmap",
           "retrieval_metrics", "routing_statistics", "zero_shot_metrics"]
