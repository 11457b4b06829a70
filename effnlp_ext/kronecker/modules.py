"""Kronecker-factored drop-in replacements for ``nn.Linear`` and ``nn.Embedding``.

``KronLinear`` stores ``W = sum_r kron(A[r], B[r])`` as its two factor stacks and runs the fused
``effnlp_ext.kron_linear`` op, which never forms ``W``. ``KronEmbedding`` is KroneckerBERT's
embedding compression: the ``v x d`` table is ``A (v x d/n) (x) B (1 x n)``, so a lookup gathers
rows of ``A`` and spreads each over ``n`` slots scaled by ``B``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .._ops import kron_linear
from .decompose import (DEFAULT_MIN_SPEEDUP, FactorCandidate, choose_factor_shapes, kron_flops,
                        kron_params, nearest_kronecker)

__all__ = ["KronLinear", "KronEmbedding"]


def _factor_weight(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Dense ``sum_r kron(A[r], B[r])`` of shape ``[m1*m2, n1*n2]``."""
    R, m1, n1 = A.shape
    _, m2, n2 = B.shape
    return torch.einsum("rik,rjl->ijkl", A, B).reshape(m1 * m2, n1 * n2)


class KronLinear(nn.Module):
    """``y = x @ W.T + bias`` with ``W = sum_r kron(A[r], B[r])``, a drop-in for ``nn.Linear``.

    Args:
        in_features, out_features: as for ``nn.Linear``; must equal ``n1*n2`` and ``m1*m2``.
        shapes: ``(m1, n1, m2, n2)``, so ``A: [rank, m1, n1]`` and ``B: [rank, m2, n2]``.
        rank: number of Kronecker terms.
        bias: whether to learn an additive bias.

    ``rel_error`` holds the relative Frobenius error of the initialisation when the layer was
    built by ``from_linear``, and ``choice``/``candidates`` the shape search's result when it ran
    (None otherwise); they are informational and not part of the state dict.
    """

    def __init__(self, in_features: int, out_features: int, shapes: tuple[int, int, int, int],
                 rank: int = 1, bias: bool = True, device=None, dtype=None):
        super().__init__()
        m1, n1, m2, n2 = shapes
        if m1 * m2 != out_features or n1 * n2 != in_features:
            raise ValueError(f"KronLinear: factor sizes (m1, n1, m2, n2) = {tuple(shapes)} do not "
                             f"divide a [{out_features}, {in_features}] weight")
        if rank < 1:
            raise ValueError(f"KronLinear: rank must be >= 1, got {rank}")
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.shapes, self.rank = (m1, n1, m2, n2), rank
        self.A = nn.Parameter(torch.empty(rank, m1, n1, **kw))
        self.B = nn.Parameter(torch.empty(rank, m2, n2, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.rel_error: float | None = None
        self.choice: FactorCandidate | None = None
        self.candidates: list[FactorCandidate] | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random init whose dense ``W`` has ``nn.Linear``'s variance, ``1 / (3 * in_features)``.

        Each entry of ``W`` sums ``rank`` products ``a * b``; drawing ``a, b ~ N(0, s^2)`` with
        ``s^4 = 1 / (3 * in_features * rank)`` matches that variance.
        """
        std = (3 * self.in_features * self.rank) ** -0.25
        nn.init.normal_(self.A, std=std)
        nn.init.normal_(self.B, std=std)
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(cls, linear: nn.Linear, cf: float | None = None, rank: int | None = None,
                    shapes: tuple[int, int, int, int] | None = None, max_rank: int | None = 8,
                    min_speedup: float | None = DEFAULT_MIN_SPEEDUP) -> "KronLinear":
        """The nearest Kronecker sum to ``linear``'s weight (bias copied).

        Give ``shapes`` to fix the factor sizes (``rank`` defaults to 1), or ``cf`` to search the
        shapes (and the rank, unless given) with ``choose_factor_shapes``; the search result is
        kept in ``.choice`` and ``.candidates``. The search only considers layers whose FLOPs
        per token are at least ``min_speedup`` times fewer than ``linear``'s (default
        ``DEFAULT_MIN_SPEEDUP``, so that the layer is faster as well as smaller; None: the
        least-error shapes whatever their cost). ``min_speedup`` does not apply to fixed
        ``shapes``.
        """
        W = linear.weight.detach()
        candidates = choice = None
        if shapes is None:
            if cf is None:
                raise ValueError("KronLinear.from_linear: give either shapes or cf")
            choice, candidates = choose_factor_shapes(W, cf, max_rank=max_rank, rank=rank,
                                                      min_speedup=min_speedup)
            shapes, rank = choice.shapes, choice.rank
        rank = rank or 1
        A, B, err = nearest_kronecker(W, *shapes, rank=rank)
        layer = cls(linear.in_features, linear.out_features, shapes, rank,
                    bias=linear.bias is not None, device=W.device, dtype=W.dtype)
        with torch.no_grad():
            layer.A.copy_(A)
            layer.B.copy_(B)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        layer.rel_error, layer.choice, layer.candidates = err, choice, candidates
        return layer

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``[out_features, in_features]`` weight (materialised; for inspection/export)."""
        return _factor_weight(self.A, self.B)

    @property
    def compression_factor(self) -> float:
        """Dense weight parameters over Kronecker factor parameters (bias excluded)."""
        return self.in_features * self.out_features / kron_params(self.shapes, self.rank)

    @property
    def flops_per_token(self) -> int:
        """FLOPs of the Kronecker product per input row (bias excluded), see ``kron_flops``."""
        return kron_flops(self.shapes, self.rank)

    @property
    def flops_ratio(self) -> float:
        """The dense layer's FLOPs per token over this layer's (> 1: fewer FLOPs than dense)."""
        return 2 * self.in_features * self.out_features / self.flops_per_token

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kron_linear(x, self.A, self.B, self.bias)

    def extra_repr(self) -> str:
        m1, n1, m2, n2 = self.shapes
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"A={self.rank}x{m1}x{n1}, B={self.rank}x{m2}x{n2}, "
                f"cf={self.compression_factor:.2f}, flops_ratio={self.flops_ratio:.2f}, "
                f"bias={self.bias is not None}")


class KronEmbedding(nn.Module):
    """An embedding table ``sum_r kron(A[r], B[r])`` with ``A: [v, d/n]`` and ``B: [1, n]``.

    Row ``i`` is ``sum_r kron(A[r, i], B[r, 0])``: entry ``j*n + k`` is ``A[r, i, j] * B[r, 0, k]``.
    ``forward`` gathers rows of ``A`` and takes their outer product with ``B`` — the ``v x d``
    table is never formed. ``padding_idx`` behaves as in ``nn.Embedding``: a fresh module's
    padding row is zero, and the lookups of that index contribute no gradient (to ``A`` nor
    ``B``); their output is the current padding row, held constant.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, n: int, rank: int = 1,
                 padding_idx: int | None = None, device=None, dtype=None):
        super().__init__()
        if n < 1 or embedding_dim % n:
            raise ValueError(f"KronEmbedding: n = {n} must divide embedding_dim = {embedding_dim}")
        if not 1 <= rank <= n:
            raise ValueError(f"KronEmbedding: rank must lie in [1, n = {n}], got {rank}")
        if padding_idx is not None:
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(f"KronEmbedding: padding_idx {padding_idx} is out of range for "
                                 f"{num_embeddings} embeddings")
            padding_idx %= num_embeddings
        kw = {"device": device, "dtype": dtype}
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.n, self.rank, self.padding_idx = n, rank, padding_idx
        self.A = nn.Parameter(torch.empty(rank, num_embeddings, embedding_dim // n, **kw))
        self.B = nn.Parameter(torch.empty(rank, 1, n, **kw))
        self.rel_error: float | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Table entries with unit variance, like ``nn.Embedding`` (padding row zeroed)."""
        std = self.rank ** -0.25
        nn.init.normal_(self.A, std=std)
        nn.init.normal_(self.B, std=std)
        if self.padding_idx is not None:
            with torch.no_grad():
                self.A[:, self.padding_idx].zero_()

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, n: int = 2, rank: int = 1) -> "KronEmbedding":
        """The nearest Kronecker factorisation of ``emb``'s table (``padding_idx`` kept)."""
        W = emb.weight.detach()
        v, d = W.shape
        if n < 1 or d % n:
            raise ValueError(f"KronEmbedding.from_embedding: n = {n} must divide "
                             f"embedding_dim = {d}")
        A, B, err = nearest_kronecker(W, v, d // n, 1, n, rank=rank)
        layer = cls(v, d, n, rank, padding_idx=emb.padding_idx, device=W.device, dtype=W.dtype)
        with torch.no_grad():
            layer.A.copy_(A)
            layer.B.copy_(B)
        layer.rel_error = err
        return layer

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``[num_embeddings, embedding_dim]`` table (materialised; for inspection)."""
        return _factor_weight(self.A, self.B)

    @property
    def compression_factor(self) -> float:
        """Dense table parameters over factor parameters."""
        return self.num_embeddings * self.embedding_dim / (self.A.numel() + self.B.numel())

    def _lookup(self, a: torch.Tensor) -> torch.Tensor:
        """``sum_r outer(a[r], B[r, 0])`` flattened: ``a [R, ..., d/n] -> [..., d]``."""
        out = torch.einsum("r...j,rk->...jk", a, self.B[:, 0])
        return out.reshape(*out.shape[:-2], self.embedding_dim)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        a = self.A[:, input]  # [R, ..., d/n]
        if self.padding_idx is None:
            return self._lookup(a)
        pad = (input == self.padding_idx).unsqueeze(-1)
        out = self._lookup(a.masked_fill(pad, 0))
        with torch.no_grad():
            pad_row = self._lookup(self.A[:, self.padding_idx])
        return out + pad.to(out.dtype) * pad_row

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, "
                f"A={self.rank}x{self.num_embeddings}x{self.embedding_dim // self.n}, "
                f"B={self.rank}x1x{self.n}, cf={self.compression_factor:.2f}"
                + (f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""))
