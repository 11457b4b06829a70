"""Sparse distillation: a DAN over hashed word n-grams, distilled from a transformer teacher.

vocab.py counts/prunes n-grams, modules.py holds HashedNgramBag and DAN, recipe.py the teacher ->
KD -> gold recipe, compare.py the fastText baseline, benchmark.py the ngram_bag op against the
torch compositions a user would otherwise run.
"""
from .modules import DAN, DANConfig, HashedNgramBag, collate_docs, split_docs
from .vocab import NgramCounts, NgramVocab, count_ngrams, pruning_table

__all__ = ["DAN", "DANConfig", "HashedNgramBag", "NgramCounts", "NgramVocab", "collate_docs",
           "count_ngrams", "pruning_table", "split_docs"]
