"""Data: image-caption datasets (CSV/TSV, webdataset), clipmoe's synthetic attribute data, evaluation image sets and
the cluster batch sampler of MCL."""
from clipmoe.data.datasets import (
                                   CsvCaptionDataset,
                                   InMemoryCaptionDataset,
                                   collate_skip_none,
                                   make_transforms_and_tokenizer,
)
from clipmoe.data.eval_sets import CocoCaptions, ImageFiles, KarpathyRetrieval
from clipmoe.data.sampler import ClusterBatchSampler
from clipmoe.data.shards import ShardCaptionDataset
from clipmoe.data.synthetic import SyntheticShapes, WordTokenizer
from clipmoe.data.webdataset import WebDatasetCaptions

__all__ = ["ClusterBatchSampler", "CocoCaptions", "CsvCaptionDataset", "ImageFiles", "InMemoryCaptionDataset",
           "KarpathyRetrieval", "ShardCaptionDataset", "SyntheticShapes", "WebDatasetCaptions", "WordTokenizer",
           "collate_skip_none", "make_transforms_and_tokenizer"]
