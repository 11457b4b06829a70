"""kron_linear: fake kernels and autograd of the fused Kronecker-factored linear op."""
from __future__ import annotations

import torch

_ops = torch.ops.effnlp


def _check_kron(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, bias, op="kron_linear"):
    torch._check(A.dim() == 3, lambda: f"{op}: A must be 3-D [R, m1, n1], got {tuple(A.shape)}")
    torch._check(B.dim() == 3, lambda: f"{op}: B must be 3-D [R, m2, n2], got {tuple(B.shape)}")
    torch._check(A.shape[0] == B.shape[0],
                 lambda: f"{op}: A and B must hold the same number of Kronecker terms R, "
                         f"got {A.shape[0]} and {B.shape[0]}")
    torch._check(x.dim() >= 1, lambda: f"{op}: x must have at least one dimension")
    torch._check(x.dtype.is_floating_point, lambda: f"{op}: x must be a floating-point tensor")
    for name, t in (("A", A), ("B", B)) + ((("bias", bias),) if bias is not None else ()):
        torch._check(t.dtype == x.dtype, lambda: f"{op}: {name} has dtype {t.dtype} but x has "
                                                 f"dtype {x.dtype}; all inputs must share one dtype")
        torch._check(t.device == x.device, lambda: f"{op}: {name} is on {t.device} but x is on "
                                                   f"{x.device}; all inputs must be on one device")
    n_in = A.shape[2] * B.shape[2]
    torch._check(x.shape[-1] == n_in,
                 lambda: f"{op}: x.shape[-1] = {x.shape[-1]} does not match the factors' "
                         f"in-features n1*n2 = {n_in}")
    m_out = A.shape[1] * B.shape[1]
    if bias is not None:
        torch._check(bias.dim() == 1 and bias.shape[0] == m_out,
                     lambda: f"{op}: bias must be 1-D of size m1*m2 = {m_out}")
    return m_out


def _kron_mid_shape(x, A, B, keep_mid: bool):
    """Shape of the intermediate ``_kron_linear_forward`` keeps (mirrors csrc/cpu/kron_linear.cpp:
    the natural layout's X B^T [n1, R*m2] or A X [m1, R*n2] per token, on CPU only)."""
    R, m1, n1 = A.shape
    m2, n2 = B.shape[1], B.shape[2]
    n_tokens = 1
    for d in x.shape[:-1]:
        n_tokens = n_tokens * d
    b_first = n1 * n2 * m2 + m1 * n1 * m2 <= m1 * n1 * n2 + m1 * n2 * m2
    small_b = min(m2, n2) <= 8 and m2 * n2 <= 512 and m1 >= 8 and n1 >= 8
    keep = (keep_mid and x.device.type == "cpu" and not small_b and R > 0 and n_tokens > 0
            and m1 * m2 > 0)
    return (n_tokens, R * (n1 * m2 if b_first else m1 * n2)) if keep else (0, 0)


@torch.library.register_fake("effnlp::_kron_linear_forward")
def _kron_linear_forward_fake(x, A, B, bias, keep_mid):
    m_out = _check_kron(x, A, B, bias)
    return x.new_empty((*x.shape[:-1], m_out)), x.new_empty(_kron_mid_shape(x, A, B, keep_mid))


@torch.library.register_fake("effnlp::_kron_linear_backward")
def _kron_linear_backward_fake(grad_y, x, A, B, mid, output_mask):
    m_out = _check_kron(x, A, B, None, op="_kron_linear_backward")
    torch._check(grad_y.shape == (*x.shape[:-1], m_out),
                 lambda: "_kron_linear_backward: grad_y does not have the output's shape")
    shapes = (x.shape, A.shape, B.shape, (m_out,))
    # Masked-off gradients are distinct empty tensors, as the kernels return them.
    return tuple(x.new_empty(shape if needed else (0,)) for shape, needed in zip(shapes, output_mask))


def _kron_linear_setup(ctx, inputs, output):
    x, A, B, bias, _ = inputs
    _, mid = output
    ctx.save_for_backward(x, A, B, mid)
    ctx.mark_non_differentiable(mid)
    ctx.has_bias = bias is not None


def _kron_linear_backward(ctx, grad_y, _grad_mid):
    x, A, B, mid = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2],
            ctx.has_bias and ctx.needs_input_grad[3]]
    gx, gA, gB, gbias = _ops._kron_linear_backward(grad_y, x, A, B, mid, mask)
    return (gx if mask[0] else None, gA if mask[1] else None, gB if mask[2] else None,
            gbias if mask[3] else None, None)


torch.library.register_autograd("effnlp::_kron_linear_forward", _kron_linear_backward,
                                setup_context=_kron_linear_setup)


def kron_linear(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ (sum_r kron(A[r], B[r])).T + bias`` without forming the dense weight.

    Args:
        x: ``[..., n1*n2]`` activations (any leading batch dimensions).
        A: ``[R, m1, n1]`` left Kronecker factors.
        B: ``[R, m2, n2]`` right Kronecker factors.
        bias: optional ``[m1*m2]``.
    Returns:
        ``[..., m1*m2]``. Differentiable in all four inputs; fp32/fp64 on CPU (fp16/bf16
        computed in fp32), plus fp16/bf16 on CUDA.
    """
    return _ops.kron_linear(x, A, B, bias)
