"""Score initialisation (OMP, random), top-k thresholds, sparsity and mask analysis.

Sparsity ``s`` keeps exactly ``k = round((1 - s) * n)`` entries: the threshold is the
(k+1)-th largest score, and ``masked_linear`` keeps ``scores > threshold``. ``scope="global"``
ranks all masked matrices together (one threshold, per-layer sparsity free to vary, as
one-shot magnitude pruning of BERT tickets does); ``scope="layer"`` gives every matrix the same
sparsity.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .modules import masked_modules


def topk_threshold(scores: torch.Tensor, sparsity: float) -> float:
    """The threshold that keeps the ``round((1-sparsity) * n)`` largest of ``scores``."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    flat = scores.detach().reshape(-1).float()
    n = flat.numel()
    k = int(round((1.0 - sparsity) * n))
    if k >= n:
        return -math.inf
    if k <= 0:
        return math.inf
    # (n-k)-th smallest = (k+1)-th largest: exactly k entries lie strictly above it (no ties).
    return torch.kthvalue(flat, n - k).values.item()


@torch.no_grad()
def reset_thresholds(model: nn.Module, sparsity: float, scope: str = "global") -> None:
    """Set every masked module's threshold so that the model sits at ``sparsity`` exactly
    (TAMT resets it to the k-th score periodically while the scores move)."""
    mods = masked_modules(model)
    if not mods:
        raise ValueError("reset_thresholds: the model has no masked modules (apply_masks first)")
    if scope == "global":
        t = topk_threshold(torch.cat([m.scores.reshape(-1) for m in mods.values()]), sparsity)
        for m in mods.values():
            m.threshold.fill_(t)
    elif scope == "layer":
        for m in mods.values():
            m.threshold.fill_(topk_threshold(m.scores, sparsity))
    else:
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")


@torch.no_grad()
def init_scores(model: nn.Module, method: str = "omp", sparsity: float = 0.5,
                scope: str = "global", seed: int = 0) -> None:
    """Initialise the scores of every masked module and set the thresholds.

    ``omp``: scores = |weight| (the top-(1-s) magnitudes survive: one-shot magnitude pruning);
    ``random``: i.i.d. uniform scores (a random subnetwork of the same sparsity).
    """
    gen = torch.Generator().manual_seed(seed)
    for m in masked_modules(model).values():
        if method == "omp":
            m.scores.copy_(m.weight.abs())
        elif method == "random":
            m.scores.copy_(torch.rand(m.scores.shape, generator=gen, dtype=torch.float32))
        else:
            raise ValueError(f"init_scores: method must be 'omp' or 'random', got {method!r}")
    reset_thresholds(model, sparsity, scope)


def get_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{name: bool mask}`` of every masked module (names relative to ``model``)."""
    return {n: m.mask().clone() for n, m in masked_modules(model).items()}


@torch.no_grad()
def set_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Fix the masks of ``model``'s masked modules (same names as :func:`get_masks`)."""
    mods = masked_modules(model)
    missing = set(mods) - set(masks)
    if missing:
        raise KeyError(f"set_masks: no mask for {sorted(missing)[:3]}...")
    for n, m in mods.items():
        m.set_mask(masks[n])


def sparsity_report(masks: dict[str, torch.Tensor]) -> dict:
    """Per-matrix and overall sparsity (fraction of zeros) of ``masks``."""
    per = {n: 1.0 - m.float().mean().item() for n, m in masks.items()}
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    return {"per_layer": per, "overall": 1.0 - kept / max(total, 1)}


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a ∩ b| / |a ∪ b| of two boolean masks (1.0 when both are empty)."""
    inter = (a & b).sum().item()
    union = (a | b).sum().item()
    return inter / union if union else 1.0


def mask_overlap(masks_a: dict[str, torch.Tensor], masks_b: dict[str, torch.Tensor]) -> dict:
    """Jaccard per matrix and over all kept weights, plus the fraction of a's kept weights
    also kept by b."""
    if set(masks_a) != set(masks_b):
        raise KeyError("mask_overlap: the two masks cover different modules")
    per = {n: jaccard(masks_a[n], masks_b[n]) for n in masks_a}
    inter = sum((masks_a[n] & masks_b[n]).sum().item() for n in masks_a)
    union = sum((masks_a[n] | masks_b[n]).sum().item() for n in masks_a)
    kept_a = sum(masks_a[n].sum().item() for n in masks_a)
    return {"per_layer": per, "overall": inter / union if union else 1.0,
            "a_kept_in_b": inter / kept_a if kept_a else 1.0}
