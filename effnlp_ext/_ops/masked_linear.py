"""masked_linear and sparse_linear: fake kernels and autograd of the TAMT mask ops."""
from __future__ import annotations

import torch

_ops = torch.ops.effnlp


def _check_masked(x, weight, scores, bias, op="masked_linear"):
    torch._check(weight.dim() == 2,
                 lambda: f"{op}: weight must be 2-D [out, in], got {tuple(weight.shape)}")
    torch._check(scores.shape == weight.shape,
                 lambda: f"{op}: scores must have the weight's shape {tuple(weight.shape)}, "
                         f"got {tuple(scores.shape)}")
    torch._check(x.dim() >= 1, lambda: f"{op}: x must have at least one dimension")
    torch._check(x.dtype.is_floating_point, lambda: f"{op}: x must be a floating-point tensor")
    for name, t in (("weight", weight), ("scores", scores)) + \
            ((("bias", bias),) if bias is not None else ()):
        torch._check(t.dtype == x.dtype, lambda: f"{op}: {name} has dtype {t.dtype} but x has "
                                                 f"dtype {x.dtype}; all inputs must share one dtype")
        torch._check(t.device == x.device, lambda: f"{op}: {name} is on {t.device} but x is on "
                                                   f"{x.device}; all inputs must be on one device")
    torch._check(x.shape[-1] == weight.shape[1],
                 lambda: f"{op}: x.shape[-1] = {x.shape[-1]} does not match the weight's "
                         f"in-features {weight.shape[1]}")
    if bias is not None:
        torch._check(bias.dim() == 1 and bias.shape[0] == weight.shape[0],
                     lambda: f"{op}: bias must be 1-D of size out-features = {weight.shape[0]}")
    return weight.shape[0]


@torch.library.register_fake("effnlp::masked_linear")
def _masked_linear_fake(x, weight, scores, threshold, bias):
    out = _check_masked(x, weight, scores, bias)
    return x.new_empty((*x.shape[:-1], out))


@torch.library.register_fake("effnlp::_masked_linear_backward")
def _masked_linear_backward_fake(grad_y, x, weight, scores, threshold, output_mask):
    out = _check_masked(x, weight, scores, None, op="_masked_linear_backward")
    torch._check(grad_y.shape == (*x.shape[:-1], out),
                 lambda: "_masked_linear_backward: grad_y does not have the output's shape")
    shapes = (x.shape, weight.shape, weight.shape, (out,))
    return tuple(x.new_empty(s if need else (0,)) for s, need in zip(shapes, output_mask))


def _setup(ctx, inputs, output):
    x, weight, scores, threshold, bias = inputs
    # x, weight and scores only: the mask is recomputed from the scores in the backward.
    ctx.save_for_backward(x, weight, scores)
    ctx.threshold = threshold
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y):
    x, weight, scores = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [need[0], need[1], need[2], ctx.has_bias and need[4]]
    gx, gw, gs, gb = _ops._masked_linear_backward(grad_y, x, weight, scores, ctx.threshold, mask)
    return (gx if mask[0] else None, gw if mask[1] else None, gs if mask[2] else None, None,
            gb if mask[3] else None)


torch.library.register_autograd("effnlp::masked_linear", _backward, setup_context=_setup)


@torch.library.register_fake("effnlp::sparse_linear")
def _sparse_linear_fake(x, crow_indices, col_indices, values, in_features, bias):
    op = "sparse_linear"
    torch._check(crow_indices.dim() == 1 and crow_indices.dtype == torch.int32,
                 lambda: f"{op}: crow_indices must be a 1-D int32 tensor of size out+1")
    torch._check(col_indices.dim() == 1 and col_indices.dtype == torch.int32,
                 lambda: f"{op}: col_indices must be a 1-D int32 tensor")
    torch._check(values.dim() == 1 and values.shape[0] == col_indices.shape[0],
                 lambda: f"{op}: values must be 1-D with one entry per column index")
    torch._check(values.dtype == x.dtype, lambda: f"{op}: values has dtype {values.dtype} but x "
                                                  f"has dtype {x.dtype}; all inputs must share one dtype")
    torch._check(x.shape[-1] == in_features,
                 lambda: f"{op}: x.shape[-1] = {x.shape[-1]} does not match in_features = {in_features}")
    return x.new_empty((*x.shape[:-1], crow_indices.shape[0] - 1))


def masked_linear(x: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor, threshold: float,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ (weight * (scores > threshold)).T + bias`` with a straight-through score gradient.

    Args:
        x: ``[..., in]`` activations.
        weight: ``[out, in]``; frozen or trainable (its gradient is ``dL/d(W*M) * M``).
        scores: ``[out, in]`` real-valued scores; ``dL/dscores = dL/d(W*M) * W``.
        threshold: entries with ``scores > threshold`` are kept (see ``tamt.topk_threshold``).
        bias: optional ``[out]``.
    Nothing but ``x``, ``weight`` and ``scores`` is kept for the backward: the mask is
    recomputed from the scores. fp32/fp64 (fp16/bf16 computed in fp32 on CPU).
    """
    return _ops.masked_linear(x, weight, scores, float(threshold), bias)


def sparse_linear(x: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor,
                  values: torch.Tensor, in_features: int,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` for ``W [out, in]`` in CSR form (int32 indices), for inference."""
    return _ops.sparse_linear(x, crow_indices, col_indices, values, int(in_features), bias)
