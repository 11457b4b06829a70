"""fourier_mix: fake kernel and autograd of FNet's fused real-part 2D DFT mixing."""
from __future__ import annotations

import torch

_ops = torch.ops.effnlp


@torch.library.register_fake("effnlp::fourier_mix")
def _fourier_mix_fake(x, lengths=None):
    torch._check(x.dim() >= 2, lambda: f"fourier_mix: x must have at least 2 dims [..., L, H], "
                                       f"got {x.dim()}-D")
    torch._check(x.dtype.is_floating_point and not x.dtype.is_complex,
                 lambda: f"fourier_mix: x must be a floating-point tensor, got {x.dtype}")
    if lengths is not None:
        torch._check(lengths.dtype in (torch.int64, torch.int32),
                     lambda: f"fourier_mix: lengths must be an int64 or int32 tensor, "
                             f"got {lengths.dtype}")
        torch._check(x.dim() >= 3 and tuple(lengths.shape) == tuple(x.shape[:-2]),
                     lambda: f"fourier_mix: lengths must have the batch shape of x "
                             f"{tuple(x.shape[:-2])}, got {tuple(lengths.shape)}")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    ctx.lengths = inputs[1]


def _backward(ctx, grad):
    # Self-adjoint: d/dx <g, T x> = T^T g = T g (the padding rows of T g are 0, as they must be).
    return _ops.fourier_mix(grad, ctx.lengths), None


torch.library.register_autograd("effnlp::fourier_mix", _backward, setup_context=_setup)


def fourier_mix(x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """FNet's token mixing ``Re(FFT_seq(FFT_hidden(x)))`` over the last two dims of ``x``.

    Args:
        x: ``[..., L, H]`` real activations (float32/float64; float16/bfloat16 are computed in
            float32).
        lengths: optional integer tensor of the batch shape ``x.shape[:-2]``: sequence ``b`` is
            mixed over its first ``lengths[b]`` positions only (a length-``n`` DFT), and its
            padding positions come out as 0. Neither HF's FNet nor the original has this: there,
            padding changes the real tokens' outputs.
    Returns:
        A real tensor of the shape of ``x``. Differentiable in ``x``; the backward is the same
        transform of the gradient.
    """
    return _ops.fourier_mix(x, lengths)
