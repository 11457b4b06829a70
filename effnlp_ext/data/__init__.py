"""Task data for training and evaluation: readers, tokenisation/collation and metrics."""
from .collate import DynamicPaddingCollator, LengthBucketBatchSampler, encode
from .metrics import (METRICS, accuracy, average_ranks, compute_metrics, f1_binary, f1_macro,
                      matthews_corrcoef, pearson, spearman)
from .tasks import (TASKS, Example, FileSpec, SplitData, TaskSpec, available_splits, get_task,
                    load_hub_task, load_task, read_split, seeded_subset, split_examples)

__all__ = [
    "TASKS", "Example", "FileSpec", "SplitData", "TaskSpec", "available_splits", "get_task",
    "load_hub_task", "load_task", "read_split", "seeded_subset", "split_examples",
    "DynamicPaddingCollator", "LengthBucketBatchSampler", "encode",
    "METRICS", "accuracy", "average_ranks", "compute_metrics", "f1_binary", "f1_macro",
    "matthews_corrcoef", "pearson", "spearman",
]
