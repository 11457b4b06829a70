"""kron_linear: reference parity, gradients, opcheck, torch.compile and input validation."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import effnlp_ext
from effnlp_ext.reference import kron_linear_einsum, kron_linear_ref, kron_weight

from ..conftest import DEVICES

# (R, m1, n1, m2, n2): paper presets scaled down, odd sizes, tiny and degenerate factors, and
# every kernel regime (tiny right factor, short contraction, per-token GEMM, packed GEMM).
SHAPES = [
    (1, 8, 2, 48, 48),     # FFN-like: small A, large B
    (1, 2, 8, 48, 48),     # FFN down-projection
    (2, 48, 48, 2, 2),     # attention-like: large A, tiny B
    (2, 9, 20, 6, 1),      # small B, A-first order (transposed layout)
    (2, 20, 9, 1, 6),      # small B, B-first order (transposed layout)
    (3, 5, 7, 3, 4),       # odd sizes, R > 1
    (2, 17, 19, 13, 11),   # packed mode-1 path
    (1, 20, 24, 100, 97),  # per-token GEMM path (long rows)
    (1, 1, 1, 1, 1),
    (2, 3, 1, 1, 5),
]
BATCH = [(), (1,), (7,), (2, 3), (0,), (3, 0, 2)]


def _factors(R, m1, n1, m2, n2, dtype=torch.float32, device="cpu"):
    A = torch.randn(R, m1, n1, dtype=dtype, device=device)
    B = torch.randn(R, m2, n2, dtype=dtype, device=device)
    bias = torch.randn(m1 * m2, dtype=dtype, device=device)
    return A, B, bias


def _tol(dtype, n_in):
    # GEMM-like reductions: error grows with the contraction length.
    eps = torch.finfo(dtype).eps
    return dict(rtol=eps * 8 * max(n_in, 1) ** 0.5 * 10, atol=eps * 8 * max(n_in, 1) * 10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("batch", BATCH, ids=str)
@pytest.mark.parametrize("with_bias", [True, False])
def test_forward_matches_reference(device, shape, batch, with_bias):
    R, m1, n1, m2, n2 = shape
    A, B, bias = _factors(*shape, device=device)
    x = torch.randn(*batch, n1 * n2, device=device)
    b = bias if with_bias else None
    y = effnlp_ext.kron_linear(x, A, B, b)
    ref = kron_linear_ref(x.double(), A.double(), B.double(), None if b is None else b.double())
    assert y.shape == (*batch, m1 * m2)
    torch.testing.assert_close(y.double(), ref, **_tol(torch.float32, n1 * n2))


@pytest.mark.parametrize("shape", SHAPES[:5], ids=lambda s: "x".join(map(str, s)))
def test_float64_is_exact_and_composition_agrees(shape):
    A, B, bias = _factors(*shape, dtype=torch.float64)
    x = torch.randn(33, shape[2] * shape[4], dtype=torch.float64)
    ref = kron_linear_ref(x, A, B, bias)
    torch.testing.assert_close(effnlp_ext.kron_linear(x, A, B, bias), ref, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(kron_linear_einsum(x, A, B, bias), ref, rtol=1e-11, atol=1e-11)


def test_large_token_count_crosses_blocks_and_threads():
    # Many blocks, uneven tail: exercises the parallel split.
    A, B, bias = _factors(2, 24, 16, 2, 2, dtype=torch.float64)
    x = torch.randn(1237, 32, dtype=torch.float64)
    torch.testing.assert_close(effnlp_ext.kron_linear(x, A, B, bias), kron_linear_ref(x, A, B, bias))


def test_non_contiguous_inputs():
    A, B, bias = _factors(2, 6, 5, 4, 3, dtype=torch.float64)
    x = torch.randn(9, 30, dtype=torch.float64)[:, ::2]            # strided last dim
    At = torch.randn(2, 5, 6, dtype=torch.float64).transpose(1, 2)  # transposed factor
    Bx = torch.randn(2, 1, 3, dtype=torch.float64).expand(2, 4, 3)  # zero-stride factor
    bias_s = torch.randn(48, dtype=torch.float64)[::2]
    y = effnlp_ext.kron_linear(x, At, Bx, bias_s)
    torch.testing.assert_close(y, kron_linear_ref(x, At, Bx, bias_s))
    xt = torch.randn(15, 4, 15, dtype=torch.float64).transpose(0, 1)  # non-contiguous batch dims
    torch.testing.assert_close(effnlp_ext.kron_linear(xt, At, Bx), kron_linear_ref(xt, At, Bx))


@pytest.mark.parametrize("shape", [(2, 3, 2, 2, 3), (1, 4, 5, 1, 1), (2, 16, 16, 2, 2),
                                   (2, 9, 10, 3, 1), (2, 10, 9, 1, 3), (1, 2, 3, 9, 10)], ids=str)
def test_gradcheck_float64(shape):
    A, B, bias = _factors(*shape, dtype=torch.float64)
    x = torch.randn(2, 3, shape[2] * shape[4], dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (x, A, B, bias)]
    assert torch.autograd.gradcheck(effnlp_ext.kron_linear, inputs)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_backward_matches_reference(shape):
    A, B, bias = _factors(*shape, dtype=torch.float64)
    x = torch.randn(3, 37, shape[2] * shape[4], dtype=torch.float64)
    g = torch.randn(3, 37, shape[1] * shape[3], dtype=torch.float64)
    ins = [t.clone().requires_grad_() for t in (x, A, B, bias)]
    ref = torch.autograd.grad(kron_linear_ref(*ins), ins, g)
    ours = torch.autograd.grad(effnlp_ext.kron_linear(*ins), ins, g)
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-10)


def test_backward_partial_grads_and_expanded_grad():
    A, B, bias = _factors(1, 4, 3, 2, 5, dtype=torch.float64)
    x = torch.randn(6, 15, dtype=torch.float64)
    A.requires_grad_()
    y = effnlp_ext.kron_linear(x, A, B, bias)
    # A zero-stride (expanded) upstream gradient, as y.sum() produces.
    (gA,) = torch.autograd.grad(y.sum(), [A])
    Ar = A.detach().clone().requires_grad_()
    (gr,) = torch.autograd.grad(kron_linear_ref(x, Ar, B, bias).sum(), [Ar])
    torch.testing.assert_close(gA, gr)


def test_backward_is_deterministic():
    A, B, _ = _factors(2, 32, 24, 3, 2)
    x = torch.randn(3000, 48)
    g = torch.randn(3000, 96)
    res = []
    for _ in range(2):
        ins = [t.clone().requires_grad_() for t in (x, A, B)]
        res.append(torch.autograd.grad(effnlp_ext.kron_linear(*ins), ins, g))
    for a, b in zip(*res):
        assert torch.equal(a, b)


def test_empty_batch_backward():
    A, B, bias = _factors(2, 3, 4, 5, 2)
    x = torch.randn(0, 8, requires_grad=True)
    Ar, Br, br = (t.clone().requires_grad_() for t in (A, B, bias))
    y = effnlp_ext.kron_linear(x, Ar, Br, br)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.count_nonzero(Ar.grad) == 0 and torch.count_nonzero(Br.grad) == 0
    assert torch.count_nonzero(br.grad) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_cpu_computes_in_float32(dtype):
    A, B, bias = _factors(1, 8, 4, 6, 8)
    x = torch.randn(10, 32)
    y = effnlp_ext.kron_linear(x.to(dtype), A.to(dtype), B.to(dtype), bias.to(dtype))
    assert y.dtype == dtype
    ref64 = kron_linear_ref(*(t.to(dtype).double() for t in (x, A, B, bias)))
    torch_err = (kron_linear_ref(*(t.to(dtype) for t in (x, A, B, bias))).double() - ref64).abs().max()
    assert (y.double() - ref64).abs().max() <= 2 * torch_err + 1e-6


@pytest.mark.parametrize("shape", [(2, 5, 4, 3, 6), (1, 3, 16, 12, 2), (2, 16, 16, 2, 2)],
                         ids=["natural-bfirst", "natural-afirst", "transposed"])
def test_opcheck(shape):
    R, m1, n1, m2, n2 = shape
    A, B, bias = _factors(*shape)
    x = torch.randn(2, 7, n1 * n2)
    ins = [t.requires_grad_() for t in (x, A, B, bias)]
    torch.library.opcheck(torch.ops.effnlp.kron_linear, (*ins,))
    torch.library.opcheck(torch.ops.effnlp.kron_linear, (x, A, B, None))
    for keep in (True, False):
        torch.library.opcheck(torch.ops.effnlp._kron_linear_forward, (*ins, keep))
    g = torch.randn(2, 7, m1 * m2)
    _, mid = torch.ops.effnlp._kron_linear_forward(x.detach(), A.detach(), B.detach(), None, True)
    for m in (mid, mid.new_empty((0, 0))):
        for mask in ([True, True, True, True], [False, True, False, False], [True, False, False, True]):
            torch.library.opcheck(torch.ops.effnlp._kron_linear_backward,
                                  (g, x.detach(), A.detach(), B.detach(), m, mask))


@pytest.mark.parametrize("shape", [(2, 5, 4, 3, 6), (1, 3, 16, 12, 2), (3, 7, 24, 40, 9)],
                         ids=str)
def test_kept_intermediate_gives_the_same_gradients(shape):
    """The backward with the forward's intermediate equals the one that recomputes it."""
    A, B, bias = _factors(*shape, dtype=torch.float64)
    x = torch.randn(300, shape[2] * shape[4], dtype=torch.float64)
    g = torch.randn(300, shape[1] * shape[3], dtype=torch.float64)
    y, mid = torch.ops.effnlp._kron_linear_forward(x, A, B, bias, True)
    assert mid.numel() > 0
    kept = torch.ops.effnlp._kron_linear_backward(g, x, A, B, mid, [True] * 4)
    recomputed = torch.ops.effnlp._kron_linear_backward(g, x, A, B, mid.new_empty((0, 0)), [True] * 4)
    for a, b in zip(kept, recomputed):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_intermediate_kept_only_on_request():
    A, B, _ = _factors(1, 5, 4, 3, 6)
    x = torch.randn(8, 24)
    assert torch.ops.effnlp._kron_linear_forward(x, A, B, None, False)[1].numel() == 0
    assert torch.ops.effnlp._kron_linear_forward(x, A, B, None, True)[1].shape == (8, 4 * 3)


def test_backward_rejects_a_foreign_intermediate():
    A, B, _ = _factors(1, 5, 4, 3, 6)
    x = torch.randn(8, 24)
    g = torch.randn(8, 15)
    with pytest.raises(RuntimeError, match="mid has shape"):
        torch.ops.effnlp._kron_linear_backward(g, x, A, B, torch.randn(8, 7), [True] * 4)


def test_torch_compile_fullgraph():
    A, B, bias = _factors(1, 8, 4, 6, 8)
    lin = torch.nn.Linear(48, 48)

    def f(x, A, B, bias):
        return lin(torch.relu(effnlp_ext.kron_linear(x, A, B, bias)))

    x = torch.randn(5, 32)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, A, B, bias), f(x, A, B, bias))
    # gradients through the compiled graph
    ins = [t.clone().requires_grad_() for t in (x, A, B, bias)]
    compiled(*ins).sum().backward()
    ins2 = [t.clone().requires_grad_() for t in (x, A, B, bias)]
    f(*ins2).sum().backward()
    for a, b in zip(ins, ins2):
        torch.testing.assert_close(a.grad, b.grad)


def test_torch_compile_inductor():
    A, B, bias = _factors(2, 6, 4, 5, 8)
    x = torch.randn(3, 11, 32)
    compiled = torch.compile(lambda x: torch.tanh(effnlp_ext.kron_linear(x, A, B, bias)), fullgraph=True)
    torch.testing.assert_close(compiled(x), torch.tanh(kron_linear_ref(x, A, B, bias)))


@pytest.mark.parametrize("make,match", [
    (lambda: (torch.randn(4, 10), torch.randn(1, 2, 3), torch.randn(1, 2, 3), None), "in-features"),
    (lambda: (torch.randn(4, 9), torch.randn(2, 2, 3), torch.randn(1, 2, 3), None), "same number of Kronecker terms"),
    (lambda: (torch.randn(4, 9), torch.randn(2, 3), torch.randn(1, 2, 3), None), "A must be 3-D"),
    (lambda: (torch.randn(4, 9), torch.randn(1, 2, 3), torch.randn(2, 3), None), "B must be 3-D"),
    (lambda: (torch.randn(4, 9).double(), torch.randn(1, 2, 3), torch.randn(1, 2, 3), None), "dtype"),
    (lambda: (torch.randn(4, 9), torch.randn(1, 2, 3), torch.randn(1, 2, 3), torch.randn(5)), "bias"),
    (lambda: (torch.randint(0, 3, (4, 9)), torch.randn(1, 2, 3), torch.randn(1, 2, 3), None), "floating"),
    (lambda: (torch.randn(4, 9), torch.randn(1, 2, 3, device="meta"), torch.randn(1, 2, 3), None), "device"),
])
def test_bad_input_raises(make, match):
    with pytest.raises(RuntimeError, match=match):
        effnlp_ext.kron_linear(*make())


def test_bad_input_raises_under_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x, A, B = torch.randn(4, 10), torch.randn(1, 2, 3), torch.randn(1, 2, 3)
        with pytest.raises(RuntimeError, match="in-features"):
            torch.ops.effnlp.kron_linear(x, A, B, None)
        y = torch.ops.effnlp.kron_linear(torch.randn(4, 9), A, B, None)
        assert y.shape == (4, 4)


def test_dense_weight_identity():
    # kron_linear with a single term equals nn.functional.linear on kron(A, B).
    A, B, bias = _factors(1, 3, 4, 5, 2, dtype=torch.float64)
    x = torch.randn(4, 8, dtype=torch.float64)
    W = torch.kron(A[0], B[0])
    torch.testing.assert_close(kron_weight(A, B), W)
    torch.testing.assert_close(effnlp_ext.kron_linear(x, A, B, bias), torch.nn.functional.linear(x, W, bias))


@settings(max_examples=40, deadline=None)
@given(R=st.integers(1, 3), m1=st.integers(1, 9), n1=st.integers(1, 9), m2=st.integers(1, 9),
       n2=st.integers(1, 9), N=st.integers(0, 40), bias=st.booleans())
def test_property_matches_reference(R, m1, n1, m2, n2, N, bias):
    A, B, b = _factors(R, m1, n1, m2, n2, dtype=torch.float64)
    x = torch.randn(N, n1 * n2, dtype=torch.float64)
    b = b if bias else None
    torch.testing.assert_close(effnlp_ext.kron_linear(x, A, B, b), kron_linear_ref(x, A, B, b))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cuda_matches_reference(dtype, shape):
    A, B, bias = _factors(*shape, dtype=dtype, device="cuda")
    x = torch.randn(5, 7, shape[2] * shape[4], dtype=dtype, device="cuda")
    ins = [t.clone().requires_grad_() for t in (x, A, B, bias)]
    y = effnlp_ext.kron_linear(*ins)
    ref_ins = [t.detach().double().requires_grad_() for t in ins]
    ref = kron_linear_ref(*ref_ins)
    tol = dict(rtol=5e-2, atol=5e-2) if dtype in (torch.float16, torch.bfloat16) else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y.double(), ref, **tol)
    g = torch.randn_like(ref)
    ours = torch.autograd.grad(y, ins, g.to(dtype))
    refs = torch.autograd.grad(ref, ref_ins, g)
    for o, r in zip(ours, refs):
        torch.testing.assert_close(o.double(), r, **tol)


def test_cuda_kernel_registered_when_built_with_cuda():
    if torch.version.cuda is None:
        pytest.skip("CPU-only torch: CUDA kernels are checked by `make cuda-check`")
    assert effnlp_ext.has_cuda_kernels()
