"""Pure-PyTorch references of every effnlp op: the oracle for tests and the baseline of benches.

They are written for clarity, not speed: each states the op's mathematical definition.
"""
from __future__ import annotations

import torch


def kron_weight(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """The dense weight ``W = sum_r kron(A[r], B[r])`` of shape [m1*m2, n1*n2]."""
    R, m1, n1 = A.shape
    _, m2, n2 = B.shape
    # kron(A, B)[i1*m2 + i2, j1*n2 + j2] = A[i1, j1] * B[i2, j2]
    W = torch.einsum("rik,rjl->ijkl", A, B)  # [m1, m2, n1, n2]
    return W.reshape(m1 * m2, n1 * n2)


def kron_linear_ref(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x @ W.T + bias`` with ``W = sum_r kron(A[r], B[r])`` (materialises W)."""
    y = x @ kron_weight(A, B).T
    return y if bias is None else y + bias


def kron_linear_einsum(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """The factored composition in torch ops (no dense W): per token ``Y = sum_r A_r X B_r^T``.

    Applies the factor that leaves fewer FLOPs first. This is the best plain-torch composition we
    found and the baseline the fused kernel is measured against.
    """
    R, m1, n1 = A.shape
    _, m2, n2 = B.shape
    lead = x.shape[:-1]
    X = x.reshape(-1, n1, n2)
    cost_b = n1 * n2 * m2 + m1 * n1 * m2
    cost_a = m1 * n1 * n2 + m1 * n2 * m2
    if cost_b <= cost_a:
        T = torch.einsum("njl,rkl->rnjk", X, B)       # X B^T       [R, N, n1, m2]
        Y = torch.einsum("rij,rnjk->nik", A, T)       # A (X B^T)   [N, m1, m2]
    else:
        U = torch.einsum("rij,njl->rnil", A, X)       # A X         [R, N, m1, n2]
        Y = torch.einsum("rnil,rkl->nik", U, B)       # (A X) B^T   [N, m1, m2]
    y = Y.reshape(*lead, m1 * m2)
    return y if bias is None else y + bias


def fourier_mix_ref(x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """``Re(FFT_L(FFT_H(x)))`` over the last two dims (HF FNet's ``fftn(...).real``); with
    ``lengths``, each sequence is transformed over its first ``lengths[b]`` rows and its padding
    rows are 0."""
    if x.numel() == 0:  # torch's FFT rejects empty batches
        return torch.zeros_like(x)
    if lengths is None:
        return torch.fft.fftn(x, dim=(-2, -1)).real
    lead, (L, H) = x.shape[:-2], x.shape[-2:]
    xs, ns = x.reshape(-1, L, H), lengths.reshape(-1).tolist()
    rows = [torch.cat([torch.fft.fftn(xs[b, :n], dim=(-2, -1)).real if n else xs.new_zeros(0, H),
                       xs.new_zeros(L - n, H)]) for b, n in enumerate(ns)]
    out = torch.stack(rows) if rows else xs.new_zeros(xs.shape)
    return out.reshape(*lead, L, H)


def fourier_mix_rfft(x: torch.Tensor) -> torch.Tensor:
    """The best composition in torch ops we found: ``rfftn`` (half the work of a complex fft2),
    then the real part with the Hermitian mirror for the columns above H/2."""
    L, H = x.shape[-2:]
    K = H // 2 + 1
    Z = torch.fft.rfftn(x, dim=(-2, -1)).real                      # [..., L, K]
    if H - K == 0:
        return Z.contiguous()
    rows = (-torch.arange(L, device=x.device)) % L                 # j -> (L - j) mod L
    mirror = Z.index_select(-2, rows)[..., 1:H - K + 1].flip(-1)   # columns H-K+1 .. H-1
    return torch.cat([Z, mirror], dim=-1)


class StraightThroughMask(torch.autograd.Function):
    """``1[scores > threshold]`` as a float mask whose gradient passes straight through to the
    scores (the step function's derivative taken as 1), as in TAMT / edge-popup."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, threshold: float) -> torch.Tensor:
        return (scores > threshold).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def masked_linear_ref(x: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor,
                      threshold: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight * STE(scores > threshold), bias)``: the plain torch composition."""
    return torch.nn.functional.linear(x, weight * StraightThroughMask.apply(scores, threshold), bias)


def sparse_linear_ref(x: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor,
                      values: torch.Tensor, in_features: int,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` with the CSR ``W`` densified."""
    out = crow_indices.numel() - 1
    W = torch.sparse_csr_tensor(crow_indices.long(), col_indices.long(), values,
                                (out, in_features)).to_dense()
    return torch.nn.functional.linear(x, W, bias)


def rational_ref(x: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``P(x) / (1 + |S(x)|)`` by Horner in torch ops, ``P = sum_k a_k x^k`` (k = 0..m),
    ``S = sum_k b_k x^(k+1)`` (k = 0..n-1), coefficients ``[G, .]`` (or 1-D for one group)
    applied to ``G`` contiguous channel groups of the last dim."""
    a = numerator if numerator.dim() == 2 else numerator.unsqueeze(0)
    b = denominator if denominator.dim() == 2 else denominator.unsqueeze(0)
    G, C = a.shape[0], x.shape[-1]
    xg = x.reshape(*x.shape[:-1], G, C // G) if C else x.reshape(*x.shape[:-1], G, 0)
    p = a[:, -1:].expand_as(xg)
    for k in range(a.shape[1] - 2, -1, -1):
        p = p * xg + a[:, k:k + 1]
    r = torch.zeros_like(xg)
    for k in range(b.shape[1] - 1, -1, -1):
        r = r * xg + b[:, k:k + 1]
    return (p / (1 + (xg * r).abs())).reshape(x.shape)
