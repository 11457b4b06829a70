"""MaskedLinear / MaskedEmbedding and ``apply_masks`` for HF BERT-family models.

A masked module keeps its dense weight, a real-valued ``scores`` tensor of the same shape and a
``threshold`` buffer; its effective weight is ``weight * 1[scores > threshold]``. The scores get
the straight-through gradient (``dL/dscores = dL/d(W*M) * W``), as in TAMT; the weight is frozen
during mask training and trainable when the found subnetwork is fine-tuned.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .._ops import masked_linear
from ..reference import StraightThroughMask

# Short names of the maskable matrices of a BERT-family model -> how their module names end.
TARGETS = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attention_output": "attention.output.dense",
    "intermediate": "intermediate.dense",
    "output": "output.dense",             # the FFN down-projection (not attention.output.dense)
    "pooler": "pooler.dense",
    "word_embeddings": "embeddings.word_embeddings",
}
DEFAULT_TARGETS = ("query", "key", "value", "attention_output", "intermediate", "output", "pooler")


class _Masked(nn.Module):
    weight: nn.Parameter
    scores: nn.Parameter

    def _init_mask(self, train_weight: bool) -> None:
        self.weight.requires_grad_(train_weight)
        # Every score above the threshold: the dense model until scores are initialised.
        self.scores = nn.Parameter(torch.ones_like(self.weight))
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float64))

    def mask(self) -> torch.Tensor:
        """The current binary mask (bool, the weight's shape)."""
        return self.scores.detach() > float(self.threshold)

    def density(self) -> float:
        return self.mask().float().mean().item() if self.weight.numel() else 1.0

    def masked_weight(self) -> torch.Tensor:
        return self.weight.detach() * self.mask()

    def set_mask(self, mask: torch.Tensor) -> None:
        """Fix the mask to ``mask`` (scores 1 where kept, 0 elsewhere, threshold 0.5)."""
        with torch.no_grad():
            self.scores.copy_(mask.to(self.scores.dtype))
            self.threshold.fill_(0.5)

    def train_weight(self, flag: bool = True) -> None:
        self.weight.requires_grad_(flag)

    def train_scores(self, flag: bool = True) -> None:
        self.scores.requires_grad_(flag)


class MaskedLinear(_Masked):
    """Drop-in ``nn.Linear`` whose weight is masked by thresholded scores (``masked_linear``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 train_weight: bool = False, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        kw = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)
        self._init_mask(train_weight)

    @classmethod
    def from_linear(cls, linear: nn.Linear, train_weight: bool = False) -> "MaskedLinear":
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, train_weight,
                device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            m.weight.copy_(linear.weight)
            if linear.bias is not None:
                m.bias.copy_(linear.bias)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return masked_linear(x, self.weight, self.scores, float(self.threshold), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}, threshold={float(self.threshold):.4g}"


class MaskedEmbedding(_Masked):
    """``nn.Embedding`` with a masked table. The lookup reads few rows, so the cost is the mask
    over the table; this uses the straight-through torch composition (no fused op)."""

    def __init__(self, embedding: nn.Embedding, train_weight: bool = False):
        super().__init__()
        self.padding_idx = embedding.padding_idx
        self.weight = nn.Parameter(embedding.weight.detach().clone())
        self._init_mask(train_weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        m = StraightThroughMask.apply(self.scores, float(self.threshold))
        return F.embedding(ids, self.weight * m, self.padding_idx)


def masked_modules(model: nn.Module) -> dict[str, _Masked]:
    """``{qualified name: module}`` of every masked module in ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _Masked)}


def _matches(name: str, targets: Iterable[str]) -> bool:
    for t in targets:
        suffix = TARGETS[t]
        if name.endswith(suffix) and not (t == "output" and name.endswith("attention.output.dense")):
            return True
    return False


def apply_masks(model: nn.Module, targets: Iterable[str] = DEFAULT_TARGETS,
                train_weight: bool = False) -> list[str]:
    """Replace the ``targets`` of an HF BERT-family model by masked modules, in place.

    ``targets``: short names from :data:`TARGETS` (Q, K, V, attention output, FFN in/out, pooler,
    word embeddings). Returns the qualified names replaced. The masks start dense (call
    ``pruning.init_scores``). Tied weights (an MLM decoder tied to the word embeddings) keep
    pointing at the unmasked table.
    """
    targets = tuple(targets)
    unknown = set(targets) - set(TARGETS)
    if unknown:
        raise ValueError(f"apply_masks: unknown targets {sorted(unknown)}; choose from {sorted(TARGETS)}")
    replaced = []
    for name, module in list(model.named_modules()):
        if not name or not _matches(name, targets) or isinstance(module, _Masked):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(module, nn.Linear):
            setattr(parent, child, MaskedLinear.from_linear(module, train_weight))
        elif isinstance(module, nn.Embedding):
            setattr(parent, child, MaskedEmbedding(module, train_weight))
        else:
            continue
        replaced.append(name)
    if not replaced:
        raise ValueError(f"apply_masks: no module of {type(model).__name__} matches {targets}")
    return replaced
