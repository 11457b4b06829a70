"""rational: fake kernels and autograd of the rational activation op."""
from __future__ import annotations

import torch

_ops = torch.ops.effnlp
MAX_COEFFS = 16  # kRationalMaxCoeffs in csrc/include/effnlp/rational.h


def _check_rational(x, numerator, denominator, op="rational"):
    torch._check(x.dim() >= 1, lambda: f"{op}: x must have at least one dimension")
    torch._check(x.dtype.is_floating_point,
                 lambda: f"{op}: x must be a floating-point tensor, got {x.dtype}")
    for name, t in (("numerator", numerator), ("denominator", denominator)):
        torch._check(t.dtype == x.dtype, lambda: f"{op}: {name} has dtype {t.dtype} but x has "
                                                 f"dtype {x.dtype}; all inputs must share one dtype")
        torch._check(t.device == x.device, lambda: f"{op}: {name} is on {t.device} but x is on "
                                                   f"{x.device}; all inputs must be on one device")
    torch._check(numerator.dim() == denominator.dim() and numerator.dim() in (1, 2),
                 lambda: f"{op}: numerator and denominator must both be 1-D [m+1] / [n] or both "
                         f"2-D [G, m+1] / [G, n], got {tuple(numerator.shape)} and "
                         f"{tuple(denominator.shape)}")
    groups = numerator.shape[0] if numerator.dim() == 2 else 1
    if numerator.dim() == 2:
        torch._check(denominator.shape[0] == groups,
                     lambda: f"{op}: numerator and denominator must have the same number of groups")
        torch._check(groups >= 1, lambda: f"{op}: the coefficients must have at least one group")
    torch._check(1 <= numerator.shape[-1] <= MAX_COEFFS,
                 lambda: f"{op}: numerator must have 1..{MAX_COEFFS} coefficients")
    torch._check(denominator.shape[-1] <= MAX_COEFFS,
                 lambda: f"{op}: denominator must have 0..{MAX_COEFFS} coefficients")
    torch._check(x.shape[-1] % groups == 0,
                 lambda: f"{op}: x.shape[-1] = {x.shape[-1]} is not divisible by the number of "
                         f"groups {groups}")


@torch.library.register_fake("effnlp::rational")
def _rational_fake(x, numerator, denominator):
    _check_rational(x, numerator, denominator)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("effnlp::_rational_backward")
def _rational_backward_fake(grad_y, x, numerator, denominator, output_mask):
    op = "_rational_backward"
    _check_rational(x, numerator, denominator, op=op)
    torch._check(grad_y.shape == x.shape,
                 lambda: f"{op}: grad_y has shape {tuple(grad_y.shape)} but x has shape "
                         f"{tuple(x.shape)}")
    torch._check(grad_y.dtype == x.dtype,
                 lambda: f"{op}: grad_y has dtype {grad_y.dtype} but x has dtype {x.dtype}")
    shapes = (x.shape, numerator.shape, denominator.shape)
    return tuple(x.new_empty(s if need else (0,)) for s, need in zip(shapes, output_mask))


def _setup(ctx, inputs, output):
    x, numerator, denominator = inputs
    ctx.save_for_backward(x, numerator, denominator)


def _backward(ctx, grad_y):
    x, numerator, denominator = ctx.saved_tensors
    mask = list(ctx.needs_input_grad[:3])
    gx, ga, gb = _ops._rational_backward(grad_y, x, numerator, denominator, mask)
    return tuple(g if need else None for g, need in zip((gx, ga, gb), mask))


torch.library.register_autograd("effnlp::rational", _backward, setup_context=_setup)


def rational(x: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """The rational activation ``P(x) / (1 + |b_0 x + b_1 x^2 + ... + b_{n-1} x^n|)``, elementwise.

    Args:
        x: ``[..., C]``.
        numerator: ``[G, m+1]`` (or ``[m+1]`` for one group); ``numerator[..., k]`` multiplies
            ``x^k``: ``P(x) = a_0 + a_1 x + ... + a_m x^m``.
        denominator: ``[G, n]`` (or ``[n]``); ``denominator[..., k]`` multiplies ``x^(k+1)``.
    The channels of ``x``'s last dim are split into ``G`` contiguous groups of ``C / G``; group
    ``g`` uses row ``g`` of both coefficient tensors. The denominator is at least 1 (the "safe"
    form of Padé activation units), so the function has no poles. All inputs share one dtype:
    float32/float64 (float16/bfloat16 are computed in float32 on CPU). The coefficient
    gradients are sums over all elements, accumulated in float64 in an order fixed by the shape
    (bitwise the same for any thread count).
    """
    return _ops.rational(x, numerator, denominator)
