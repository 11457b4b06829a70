"""Fake (meta) kernels and autograd registration of the compiled effnlp ops, one module per op.

The schemas live in csrc/registration.cpp; the kernels in csrc/cpu and csrc/cuda. What each
module registers lets its op run under torch.compile (fake tensors), FakeTensorMode/meta shape
propagation and autograd, where the backward is itself an op.
"""
from __future__ import annotations

from .fourier_mix import fourier_mix
from .hash_words import hash_words
from .kron_linear import kron_linear
from .masked_linear import masked_linear, sparse_linear
from .ngram_bag import build_vocab_table, ngram_bag, ngram_ids, restore_coalesced_flag
from .rational import rational

__all__ = ["build_vocab_table", "fourier_mix", "hash_words", "kron_linear", "masked_linear",
           "ngram_bag", "ngram_ids", "rational", "restore_coalesced_flag", "sparse_linear"]
