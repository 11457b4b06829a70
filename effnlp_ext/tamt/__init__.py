"""TAMT: task-agnostic mask training of BERT subnetworks (lottery tickets).

modules.py: MaskedLinear / MaskedEmbedding and ``apply_masks``; pruning.py: OMP and random
score initialisation, top-k thresholds, sparsity and mask overlap; export.py: bake the masks
and the CSR inference path; recipe.py: mask training (KD or MLM) and fine-tuning of the found
subnetwork with the shared trainer.
"""
from .export import SparseLinear, export
from .modules import (DEFAULT_TARGETS, TARGETS, MaskedEmbedding, MaskedLinear, apply_masks,
                      masked_modules)
from .pruning import (get_masks, init_scores, jaccard, mask_overlap, reset_thresholds, set_masks,
                      sparsity_report, topk_threshold)

__all__ = [
    "DEFAULT_TARGETS", "TARGETS", "MaskedEmbedding", "MaskedLinear", "SparseLinear", "apply_masks",
    "export", "get_masks", "init_scores", "jaccard", "mask_overlap", "masked_modules",
    "reset_thresholds", "set_masks", "sparsity_report", "topk_threshold",
]
