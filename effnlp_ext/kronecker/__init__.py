"""KroneckerBERT: Kronecker-factored linear and embedding layers for BERT-family models.

``decompose`` finds the nearest Kronecker sum to a dense weight and searches factor shapes,
``modules`` holds the ``KronLinear``/``KronEmbedding`` layers, ``convert`` compresses an HF model
and saves/loads the result, ``report`` measures what compression does to the offline MiniLM.
"""
from .convert import (DEFAULT_TARGETS, compress, compression_report, load_compressed,
                      save_compressed)
from .decompose import (DEFAULT_MIN_SPEEDUP, FactorCandidate, choose_factor_shapes,
                        kron_factor_shapes, kron_flops, kron_params, kroneckerbert_shapes,
                        nearest_kronecker)
from .modules import KronEmbedding, KronLinear

__all__ = [
    "DEFAULT_MIN_SPEEDUP", "DEFAULT_TARGETS", "FactorCandidate", "KronEmbedding", "KronLinear",
    "choose_factor_shapes", "compress", "compression_report", "kron_factor_shapes", "kron_flops",
    "kron_params", "kroneckerbert_shapes", "load_compressed", "nearest_kronecker",
    "save_compressed",
]
