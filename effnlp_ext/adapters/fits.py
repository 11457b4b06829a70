"""Initial coefficients of rational activations: least-squares fits of familiar functions.

As rational_activations does, a rational function ``P(x) / (1 + |S(x)|)`` of degrees (m, n) is
fitted to a base function on a grid (default ``x`` in [-3, 3], 2001 points), in float64:

1. linearised least squares: ``P(x) - f(x) S(x) = f(x)`` is linear in the coefficients (the
   fit of ``P / (1 + S)``; minimum-norm solution, so exact cases come out exact);
2. Levenberg-Marquardt on the true residual ``P / (1 + |S|) - f`` from that start and from the
   plain polynomial fit (``S = 0``); the smaller sum of squares wins.

The results are cached per (function, degrees, interval): computed once per process, a few
milliseconds each, never hand-typed.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import torch
import torch.nn.functional as F

APPROXIMATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu,
    "gelu": F.gelu,                                       # the exact (erf) GELU of BERT
    "leaky_relu": lambda x: F.leaky_relu(x, 0.01),
    "tanh": torch.tanh,
    "identity": lambda x: x,
    "one": torch.ones_like,
}


def rational_eval(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``P(x) / (1 + |S(x)|)`` for 1-D coefficients (the definition, in torch ops)."""
    p = torch.zeros_like(x) + a[-1]
    for k in range(a.numel() - 2, -1, -1):
        p = p * x + a[k]
    r = torch.zeros_like(x)
    for k in range(b.numel() - 1, -1, -1):
        r = r * x + b[k]
    return p / (1 + (x * r).abs())


def _vander(x: torch.Tensor, cols: int) -> torch.Tensor:
    return torch.stack([x ** k for k in range(cols)], dim=1) if cols else x.new_zeros(x.numel(), 0)


def _lstsq(A: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # Column scaling keeps the powers of x comparable; the SVD driver gives minimum-norm
    # solutions of rank-deficient systems (identity: P = x (1 + S) fits for any S).
    scale = A.abs().amax(0).clamp_min(1e-300)
    sol = torch.linalg.lstsq(A / scale, y.unsqueeze(1), rcond=1e-13, driver="gelsd").solution[:, 0]
    return sol / scale


def _residual_and_jacobian(x, y, a, b):
    """Residual ``P / (1 + |S|) - y`` and its Jacobian w.r.t. ``(a, b)`` (analytic: the
    columns are ``x^k / Q`` and ``-f sign(S) x^(k+1) / Q``)."""
    Vp, Vs = _vander(x, a.numel()), _vander(x, b.numel() + 1)[:, 1:]
    s = Vs @ b
    q = 1 + s.abs()
    f = (Vp @ a) / q
    J = torch.cat([Vp / q.unsqueeze(1), (-f * torch.sign(s) / q).unsqueeze(1) * Vs], dim=1)
    return f - y, J


def _levenberg_marquardt(x, y, a, b, iters: int = 100):
    m1 = a.numel()
    theta = torch.cat([a, b])
    r, J = _residual_and_jacobian(x, y, theta[:m1], theta[m1:])
    cost, lam = float(r @ r), 1e-3
    for _ in range(iters):
        if cost < 1e-26:  # exact (identity, one)
            break
        JtJ, g = J.T @ J, J.T @ r
        damp = torch.diag(JtJ.diagonal().clamp_min(1e-12))
        improved = False
        for _ in range(30):
            cand = theta + torch.linalg.solve(JtJ + lam * damp, -g)
            rc, Jc = _residual_and_jacobian(x, y, cand[:m1], cand[m1:])
            c = float(rc @ rc)
            if math.isfinite(c) and c < cost:
                improved = cost - c > 1e-12 * cost
                theta, r, J, cost, lam = cand, rc, Jc, c, max(lam / 3, 1e-12)
                break
            lam *= 4
        if not improved:
            break
    return theta[:m1], theta[m1:], cost


def fit_rational(fn: Callable[[torch.Tensor], torch.Tensor], degrees: tuple[int, int] = (5, 4),
                 lo: float = -3.0, hi: float = 3.0, points: int = 2001) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 coefficients ``(numerator [m+1], denominator [n])`` of the least-squares fit of
    ``P(x) / (1 + |S(x)|)`` to ``fn`` on ``points`` equispaced ``x`` in ``[lo, hi]``."""
    m, n = degrees
    if m < 0 or n < 0:
        raise ValueError(f"degrees must be non-negative, got {degrees}")
    x = torch.linspace(lo, hi, points, dtype=torch.float64)
    y = fn(x).to(torch.float64)
    Vp, Vs = _vander(x, m + 1), _vander(x, n + 1)[:, 1:]
    lin = _lstsq(torch.cat([Vp, -y.unsqueeze(1) * Vs], dim=1), y)
    poly = torch.cat([_lstsq(Vp, y), x.new_zeros(n)])
    best = None
    for start in (lin, poly):
        a, b, cost = _levenberg_marquardt(x, y, start[:m + 1], start[m + 1:])
        if best is None or cost < best[2]:
            best = (a, b, cost)
    return best[0].detach(), best[1].detach()


@functools.lru_cache(maxsize=None)
def _cached(approx: str, degrees: tuple[int, int], lo: float, hi: float):
    a, b = fit_rational(APPROXIMATIONS[approx], degrees, lo, hi)
    return tuple(a.tolist()), tuple(b.tolist())


def rational_init(approx: str, degrees: tuple[int, int] = (5, 4), lo: float = -3.0,
                  hi: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial ``(numerator, denominator)`` (float64, 1-D) approximating ``approx`` (one of
    ``APPROXIMATIONS``) on ``[lo, hi]``, fitted once per process and cached."""
    if approx not in APPROXIMATIONS:
        raise ValueError(f"unknown approximation {approx!r}; choose one of {sorted(APPROXIMATIONS)}")
    a, b = _cached(approx, tuple(int(d) for d in degrees), float(lo), float(hi))
    return torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)


def fit_error(approx: str, degrees: tuple[int, int] = (5, 4), lo: float = -3.0, hi: float = 3.0,
              points: int = 6001) -> float:
    """Max abs error of ``rational_init(approx, degrees)`` against the function on a finer grid."""
    a, b = rational_init(approx, degrees, lo, hi)
    x = torch.linspace(lo, hi, points, dtype=torch.float64)
    return float((rational_eval(x, a, b) - APPROXIMATIONS[approx](x).double()).abs().max())
