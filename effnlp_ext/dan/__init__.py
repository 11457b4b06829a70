"""Sparse distillation: a DAN over hashed word n-grams, distilled from a transformer teacher."""
from .modules import DAN, DANConfig, HashedNgramBag, collate_docs, split_docs
from .vocab import NgramCounts, NgramVocab, count_ngrams, pruning_table

__all__ = ["DAN", "DANConfig", "HashedNgramBag", "NgramCounts", "NgramVocab", "collate_docs",
           "count_ngrams", "pruning_table", "split_docs"]
