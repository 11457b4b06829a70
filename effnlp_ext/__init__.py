"""effnlp_ext: efficient-NLP methods for BERT-family models, with fused C++/CUDA torch ops.

Importing the package loads the compiled op library (``effnlp_ext._C``), which registers the
``torch.ops.effnlp`` namespace, then the fake kernels and autograd formulas of ``_ops``, then
the method slices that build on the ops.
"""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  registers torch.ops.effnlp.*
from . import _ops
from ._ops import (build_vocab_table, fourier_mix, hash_words, kron_linear, masked_linear,
                   ngram_bag, ngram_ids, rational, restore_coalesced_flag, sparse_linear)
from . import adapters, dan, fnet, kronecker
from .kronecker import KronEmbedding, KronLinear

__all__ = ["build_vocab_table", "fourier_mix", "hash_words", "kron_linear", "masked_linear",
           "ngram_bag", "ngram_ids", "rational", "restore_coalesced_flag", "sparse_linear",
           "adapters", "dan", "fnet", "kronecker", "KronLinear", "KronEmbedding",
           "has_cuda_kernels"]
__version__ = "0.1.0"


def has_cuda_kernels() -> bool:
    """Whether this build registered CUDA kernels for the effnlp ops."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("effnlp::kron_linear", "CUDA")
