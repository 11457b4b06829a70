"""Nearest Kronecker-sum approximation of a dense weight, and the choice of factor shapes.

A weight ``W`` of shape ``[m1*m2, n1*n2]`` is approximated by ``sum_r kron(A[r], B[r])`` with
``A[r]: [m1, n1]`` and ``B[r]: [m2, n2]``. Van Loan and Pitsianis (1993) showed that
``||W - sum_r kron(A_r, B_r)||_F = ||R(W) - sum_r vec(A_r) vec(B_r)^T||_F`` where the
rearrangement ``R(W)`` stacks the vectorised ``m2 x n2`` blocks of ``W`` as rows, so the best
rank-``r`` Kronecker sum is read from the truncated SVD of ``R(W)`` (Eckart–Young).

KroneckerBERT (Tahaei et al., 2022) initialises its compressed layers this way. The paper fixes the
factor shapes per layer type (``KRONECKERBERT`` presets below); ``choose_factor_shapes`` instead
searches the shapes and ranks that meet a target compression factor and keeps the one with the
lowest reconstruction error, recording every candidate so a report can say what was tried.

Parameters and FLOPs part ways for a Kronecker sum: each term costs a full pass of the two mode
products, so a rank-8 sum can be 8x smaller than the dense weight yet need about as many FLOPs
(``kron_flops``). The search therefore also takes a floor on the FLOPs ratio (``min_speedup``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

__all__ = [
    "DEFAULT_MIN_SPEEDUP",
    "FactorCandidate",
    "nearest_kronecker",
    "kron_factor_shapes",
    "kron_params",
    "kron_flops",
    "choose_factor_shapes",
    "kroneckerbert_shapes",
]

Shapes = tuple[int, int, int, int]  # (m1, n1, m2, n2)
_CHEAP_SVD_FLOPS = 2**20  # SVDs below this cost are always run by the shape search

# The FLOPs ratio (dense / Kronecker, per token) that layers built to run must reach by default
# (``KronLinear.from_linear``, ``compress``). Measured on MiniLM's layer shapes (CPU kernel, 2
# threads, 2816 tokens): kron_linear runs at 0.3-0.95x dense GEMM's FLOP rate (median ~0.7;
# lowest for a column factor B [m2, 1] or A [m1, 1] beside a wide other factor), so FLOPs
# ratios of 1.3-1.7 gave 1.0-1.4x the dense layer's speed (1.5 is too close to call), while
# every layer the search picks at a floor of 2 (cf 2, 4, 8) ran 1.2-3.7x faster. The whole model
# gains less, as attention, LayerNorm and GELU do not shrink: with no floor the cf 2/4/8 models
# ran at 0.8/0.9/1.4x the dense model's speed, with a floor of 2 at 1.5/1.8/1.5x.
DEFAULT_MIN_SPEEDUP = 2.0


def _check_shapes(out_features: int, in_features: int, shapes: Shapes) -> None:
    m1, n1, m2, n2 = shapes
    if min(shapes) < 1:
        raise ValueError(f"Kronecker factor sizes must be positive, got (m1, n1, m2, n2) = {shapes}")
    if m1 * m2 != out_features or n1 * n2 != in_features:
        raise ValueError(
            f"Kronecker factor sizes (m1, n1, m2, n2) = {shapes} do not divide a "
            f"[{out_features}, {in_features}] weight: need m1*m2 = {out_features} "
            f"(got {m1 * m2}) and n1*n2 = {in_features} (got {n1 * n2})")


def _rearrange(W: torch.Tensor, shapes: Shapes) -> torch.Tensor:
    """Van Loan's ``R(W)``: row ``i1*n1 + j1`` is the vectorised block ``W[i1*m2:, j1*n2:]``."""
    m1, n1, m2, n2 = shapes
    return W.reshape(m1, m2, n1, n2).permute(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)


def kron_params(shapes: Shapes, rank: int) -> int:
    """Parameter count of a rank-``rank`` Kronecker sum with the given factor shapes (no bias)."""
    m1, n1, m2, n2 = shapes
    return rank * (m1 * n1 + m2 * n2)


def kron_flops(shapes: Shapes, rank: int) -> int:
    """FLOPs per token of ``x @ (sum_r kron(A[r], B[r])).T`` (multiply and add counted apart).

    Per term, a token ``X [n1, n2]`` becomes ``A X B^T``: applying ``B`` first costs
    ``n1*n2*m2 + m1*n1*m2`` multiply-adds, ``A`` first ``m1*n1*n2 + m1*n2*m2``; ``kron_linear``
    takes the cheaper order. The dense layer needs ``2 * m1*m2 * n1*n2``.
    """
    m1, n1, m2, n2 = shapes
    return 2 * rank * min(n1 * n2 * m2 + m1 * n1 * m2, m1 * n1 * n2 + m1 * n2 * m2)


def _flops_ratio(shapes: Shapes, rank: int) -> float:
    m1, n1, m2, n2 = shapes
    return 2 * m1 * m2 * n1 * n2 / kron_flops(shapes, rank)


def nearest_kronecker(W: torch.Tensor, m1: int, n1: int, m2: int, n2: int, rank: int = 1
                      ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The Frobenius-nearest ``sum_{r<rank} kron(A[r], B[r])`` to ``W``.

    Args:
        W: ``[m1*m2, n1*n2]`` dense weight (any float dtype; the SVD runs in float64).
        m1, n1, m2, n2: factor sizes, ``A[r]: [m1, n1]``, ``B[r]: [m2, n2]``.
        rank: number of Kronecker terms, at most ``min(m1*n1, m2*n2)``.
    Returns:
        ``(A [rank, m1, n1], B [rank, m2, n2], rel_error)`` in ``W``'s dtype and device, where
        ``rel_error = ||W - sum_r kron(A[r], B[r])||_F / ||W||_F`` (0 for an all-zero ``W``).
        Each singular value is split as ``sqrt(s)`` into both factors, so ``A`` and ``B`` have
        balanced scales, which keeps later fine-tuning of both factors well conditioned.
    """
    if W.dim() != 2:
        raise ValueError(f"nearest_kronecker: W must be 2-D, got shape {tuple(W.shape)}")
    shapes = (m1, n1, m2, n2)
    _check_shapes(W.shape[0], W.shape[1], shapes)
    max_rank = min(m1 * n1, m2 * n2)
    if not 1 <= rank <= max_rank:
        raise ValueError(f"nearest_kronecker: rank must lie in [1, {max_rank}] for factor sizes "
                         f"{shapes}, got {rank}")
    W64 = W.detach().to(torch.float64)
    U, S, Vh = torch.linalg.svd(_rearrange(W64, shapes), full_matrices=False)
    root = S[:rank].sqrt()
    A = (U[:, :rank] * root).T.reshape(rank, m1, n1)
    B = (Vh[:rank] * root[:, None]).reshape(rank, m2, n2)
    approx = torch.einsum("rik,rjl->ijkl", A, B).reshape(W64.shape)
    norm = W64.norm()
    rel_error = float((W64 - approx).norm() / norm) if norm > 0 else 0.0
    return A.to(W.dtype), B.to(W.dtype), rel_error


def kron_factor_shapes(out_features: int, in_features: int, nontrivial: bool = True
                       ) -> list[Shapes]:
    """Every ``(m1, n1, m2, n2)`` with ``m1*m2 = out_features`` and ``n1*n2 = in_features``.

    With ``nontrivial`` (the default), two degenerate families are left out: a ``1 x 1`` factor
    (the dense weight times a scalar, never compresses) and a row factor times a column factor
    (``A: 1 x n``, ``B: m x 1`` or the transpose), whose Kronecker sum is the plain low-rank
    factorisation ``sum_r b_r a_r^T`` rather than a Kronecker structure.
    """
    if out_features < 1 or in_features < 1:
        raise ValueError(f"kron_factor_shapes: sizes must be positive, got "
                         f"({out_features}, {in_features})")
    outs = [d for d in range(1, out_features + 1) if out_features % d == 0]
    ins = [d for d in range(1, in_features + 1) if in_features % d == 0]
    shapes = [(m1, n1, out_features // m1, in_features // n1) for m1 in outs for n1 in ins]
    if nontrivial:
        shapes = [(m1, n1, m2, n2) for m1, n1, m2, n2 in shapes
                  if m1 * n1 > 1 and m2 * n2 > 1
                  and not (m1 == 1 and n2 == 1) and not (n1 == 1 and m2 == 1)]
    return shapes


@dataclass(frozen=True)
class FactorCandidate:
    """One (factor shapes, rank) pair evaluated by ``choose_factor_shapes``."""

    shapes: Shapes
    rank: int
    params: int
    cf: float          # dense parameters / Kronecker parameters (weights only)
    rel_error: float   # ||W - approximation||_F / ||W||_F
    flops_ratio: float  # dense FLOPs / Kronecker FLOPs per token (see ``kron_flops``)

    def as_dict(self) -> dict:
        """A JSON-friendly dict (shapes as a list)."""
        d = asdict(self)
        d["shapes"] = list(self.shapes)
        return d


def _fastest_rank(shapes: Shapes, min_speedup: float, top: int) -> int:
    """The highest rank ``r <= top`` with ``_flops_ratio(shapes, r) >= min_speedup`` (0: none).

    The ratio is ``ratio(1) / r``; the closed form is checked against the exact expression so
    that the chosen candidate's recorded ``flops_ratio`` never falls below ``min_speedup``.
    """
    r = min(top, int(_flops_ratio(shapes, 1) / min_speedup))
    while r < top and _flops_ratio(shapes, r + 1) >= min_speedup:
        r += 1
    while r >= 1 and _flops_ratio(shapes, r) < min_speedup:
        r -= 1
    return r


def choose_factor_shapes(W: torch.Tensor, cf: float, max_rank: int | None = 8,
                         rank: int | None = None, max_svds: int = 12,
                         min_speedup: float | None = None
                         ) -> tuple[FactorCandidate, list[FactorCandidate]]:
    """The factor shapes and rank that reach compression factor ``cf`` with the least error.

    The search is kept cheap in three ways:
      * a shape is a candidate only if its rank-1 parameter count already allows ``cf`` (and,
        with ``min_speedup``, its rank-1 FLOPs already allow that speed-up);
      * one ``svdvals`` of ``R(W)`` per shape gives the error of *every* rank at once, since
        ``||W - W_r||_F^2`` is the sum of the discarded squared singular values;
      * all shapes whose SVD is trivially cheap are decomposed (``min(M, N)^2 max(M, N)``
        under ~1 MFLOP for ``R(W)`` of shape ``M x N``: every shape of a small ``W``); of the
        costlier ones, only the ``max_svds`` most promising: ranked by the energy a rank-``r``
        truncation keeps for an unstructured matrix, ``r / min(M, N)`` at the largest
        admissible rank ``r`` (fewer parameters break ties). This favours a small
        ``min(M, N)``, which is also where the SVD is cheapest; on MiniLM's weights it picks
        within 0.005 relative error of an exhaustive search at 1/30 to 1/100 of its cost.

    Speed: a rank-``r`` sum costs ``r`` passes (``kron_flops``), so its FLOPs do not shrink with
    its parameters; left alone, the least-error pick on MiniLM's layers is a rank 7-8 sum with
    a FLOPs ratio of 0.7-2.9 (1.3-1.5 at ``cf`` 4), a layer hardly faster, or slower, than
    the dense one. ``min_speedup`` drops every (shape, rank) whose ``flops_ratio`` is below it
    before the SVDs are chosen, so the budget of costly SVDs goes to shapes that can qualify.
    It defaults to None here: this function is the accuracy search, and a caller who wants the
    least error at a size (e.g. an initialisation to distil from, whatever it costs to run)
    keeps it. ``KronLinear.from_linear`` and ``compress``, which build layers to run, pass
    ``DEFAULT_MIN_SPEEDUP`` (2) by default; its comment gives the measurements behind it.

    Args:
        W: ``[out, in]`` dense weight.
        cf: target compression factor (dense parameters / Kronecker parameters), > 0.
        max_rank: highest rank considered (None: no cap).
        rank: fix the rank instead of searching it.
        max_svds: cap on the number of costly shapes decomposed.
        min_speedup: keep only candidates with ``flops_ratio >= min_speedup`` (dense FLOPs per
            token over Kronecker FLOPs per token); None: no floor.
    Returns:
        ``(choice, candidates)``: the candidate with the lowest relative error (ties: fewer
        parameters), and every (shape, rank) pair evaluated, in search order; with
        ``min_speedup``, all of them have ``flops_ratio >= min_speedup``.
    Raises:
        ValueError: if no factorisation of ``W`` reaches ``cf``, or none that does reaches
            ``min_speedup`` (the message gives the best FLOPs ratio available at ``cf``).
    """
    if W.dim() != 2:
        raise ValueError(f"choose_factor_shapes: W must be 2-D, got shape {tuple(W.shape)}")
    if cf <= 0:
        raise ValueError(f"choose_factor_shapes: cf must be positive, got {cf}")
    if rank is not None and rank < 1:
        raise ValueError(f"choose_factor_shapes: rank must be >= 1, got {rank}")
    if min_speedup is not None and not min_speedup > 0:
        raise ValueError(f"choose_factor_shapes: min_speedup must be positive or None, "
                         f"got {min_speedup}")
    out_f, in_f = W.shape
    dense = out_f * in_f
    budget = dense / cf
    plans = []  # (shapes, highest admissible rank)
    fastest = None  # (flops_ratio, shapes, rank): the fastest factorisation that reaches cf
    for shapes in kron_factor_shapes(out_f, in_f):
        m1, n1, m2, n2 = shapes
        top = min(m1 * n1, m2 * n2, int(budget // kron_params(shapes, 1)))
        if max_rank is not None:
            top = min(top, max_rank)
        if rank is not None:
            top = rank if rank <= top else 0
        if top < 1:
            continue
        low = rank or 1
        if fastest is None or _flops_ratio(shapes, low) > fastest[0]:
            fastest = (_flops_ratio(shapes, low), shapes, low)
        if min_speedup is not None:
            top = _fastest_rank(shapes, min_speedup, top)
            if rank is not None:
                top = rank if rank <= top else 0
        if top >= 1:
            plans.append((shapes, top))
    at_rank = f" at rank {rank}" if rank is not None else ""
    if fastest is None:
        raise ValueError(
            f"choose_factor_shapes: no Kronecker factorisation of a [{out_f}, {in_f}] weight "
            f"reaches cf = {cf}{at_rank} (max_rank = {max_rank})")
    if not plans:
        ratio, (m1, n1, m2, n2), r = fastest
        raise ValueError(
            f"choose_factor_shapes: no Kronecker factorisation of a [{out_f}, {in_f}] weight "
            f"reaches cf = {cf}{at_rank} with flops_ratio >= min_speedup = {min_speedup}; the "
            f"best flops_ratio available at that cf is {ratio:.3g} (A {m1}x{n1} (x) B {m2}x{n2},"
            f" rank {r}). Lower min_speedup, or pass min_speedup=None for the least-error "
            f"factorisation whatever its FLOPs")

    def priority(plan):
        # For a matrix without structure, a rank-r truncation of the M x N matrix R(W) keeps
        # about r / min(M, N) of its energy; rank the shapes by that estimate.
        (m1, n1, m2, n2), top = plan
        return (-top / min(m1 * n1, m2 * n2), m1 * n1 + m2 * n2)

    def svd_cost(plan):
        m1, n1, m2, n2 = plan[0]
        small, large = sorted((m1 * n1, m2 * n2))
        return small * small * large

    plans = sorted(plans, key=priority)
    cheap = [p for p in plans if svd_cost(p) <= _CHEAP_SVD_FLOPS]
    plans = cheap + [p for p in plans if svd_cost(p) > _CHEAP_SVD_FLOPS][:max_svds]
    W64 = W.detach().to(torch.float64)
    total = float(W64.pow(2).sum())
    candidates = []
    for shapes, top in plans:
        s2 = torch.linalg.svdvals(_rearrange(W64, shapes)).pow(2)
        kept = torch.cumsum(s2, 0)[:top].tolist()
        ranks = [rank] if rank is not None else range(1, top + 1)
        for r in ranks:
            err = (max(total - kept[r - 1], 0.0) / total) ** 0.5 if total > 0 else 0.0
            params = kron_params(shapes, r)
            candidates.append(FactorCandidate(shapes, r, params, dense / params, err,
                                              _flops_ratio(shapes, r)))
    choice = min(candidates, key=lambda c: (round(c.rel_error, 9), c.params))
    return choice, candidates


def kroneckerbert_shapes(out_features: int, in_features: int) -> Shapes:
    """The KroneckerBERT paper's fixed factor shapes, generalised from hidden size 768.

    The paper factors BERT-base's attention ``768 x 768`` weights as ``A 384x384 (x) B 2x2`` (CF 4)
    and the FFN ``768 -> 3072`` weight as ``A 8x2 (x) B 384x384`` (CF 16, transposed for
    ``3072 -> 768``). With hidden size ``h`` and FFN size ``f`` this is
      * square ``h x h``:            ``A (h/2 x h/2) (x) B (2 x 2)``;
      * up, out ``f``, in ``h``:     ``A (2f/h x 2) (x) B (h/2 x h/2)``;
      * down, out ``h``, in ``f``:   ``A (2 x 2f/h) (x) B (h/2 x h/2)``;
    which keeps the paper's per-layer CFs (4 and 16) for any ``f = 4h``; MiniLM (h 384, f 1536)
    gets ``A 192x192 (x) B 2x2`` and ``A 8x2 (x) B 192x192``.
    """
    if out_features == in_features:
        h = out_features
        if h % 2:
            raise ValueError(f"kroneckerbert_shapes: hidden size {h} must be even")
        return (h // 2, h // 2, 2, 2)
    h, f = min(out_features, in_features), max(out_features, in_features)
    if h % 2 or (2 * f) % h:
        raise ValueError(
            f"kroneckerbert_shapes: a [{out_features}, {in_features}] weight does not fit the "
            f"paper's FFN shapes: need an even hidden size h and 2f/h integral (h = {h}, f = {f})")
    if out_features > in_features:
        return (2 * f // h, 2, h // 2, h // 2)
    return (2, 2 * f // h, h // 2, h // 2)
