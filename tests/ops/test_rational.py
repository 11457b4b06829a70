"""rational: reference parity (groups, degrees, odd/empty/non-contiguous shapes), gradients,
deterministic coefficient reductions, half precision, opcheck, torch.compile and input
validation."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import effnlp_ext
from effnlp_ext.reference import rational_ref

from ..conftest import DEVICES

# (channels, groups): vector-wide groups, groups shorter than one vector (the scalar path),
# odd sizes, one channel, no channels.
LAYOUTS = [(1, 1), (7, 1), (8, 1), (33, 1), (130, 1), (12, 3), (64, 4), (6, 2), (24, 24), (0, 1),
           (0, 2)]
BATCH = [(), (1,), (9,), (2, 3), (0,), (3, 0, 2)]
DEGREES = [(5, 4), (3, 2), (0, 0), (2, 0), (1, 3), (7, 6)]


def _coeffs(groups, degrees, dtype=torch.float64, device="cpu", scale=0.5):
    m, n = degrees
    a = torch.randn(groups, m + 1, dtype=dtype, device=device) * scale
    b = torch.randn(groups, n, dtype=dtype, device=device) * scale
    return a, b


def _grads(f, x, a, b, g):
    ins = [t.detach().clone().requires_grad_() for t in (x, a, b)]
    return torch.autograd.grad(f(*ins), ins, g, allow_unused=True, materialize_grads=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("batch", BATCH, ids=str)
def test_forward_matches_reference(device, layout, batch):
    C, G = layout
    a, b = _coeffs(G, (5, 4), torch.float32, device)
    x = torch.randn(*batch, C, device=device) * 2
    y = effnlp_ext.rational(x, a, b)
    ref = rational_ref(x.double(), a.double(), b.double())
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("degrees", DEGREES, ids=str)
@pytest.mark.parametrize("layout", [(37, 1), (40, 5), (9, 3)], ids=str)
def test_degrees_forward_and_backward_float64(degrees, layout):
    C, G = layout
    a, b = _coeffs(G, degrees)
    x = torch.randn(6, 5, C, dtype=torch.float64) * 2
    g = torch.randn_like(x)
    torch.testing.assert_close(effnlp_ext.rational(x, a, b), rational_ref(x, a, b), rtol=1e-12, atol=1e-12)
    ours = _grads(effnlp_ext.rational, x, a, b, g)
    ref = _grads(rational_ref, x, a, b, g)
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("batch", [(), (9,), (2, 3), (0,)], ids=str)
def test_backward_matches_reference_float32(layout, batch):
    C, G = layout
    a, b = _coeffs(G, (5, 4), torch.float32)
    x = torch.randn(*batch, C) * 2
    g = torch.randn_like(x)
    ours = _grads(effnlp_ext.rational, x, a, b, g)
    ref = _grads(rational_ref, x.double(), a.double(), b.double(), g.double())
    n = max(x.numel() // max(G, 1), 1)
    torch.testing.assert_close(ours[0].double(), ref[0], rtol=1e-5, atol=1e-5)
    for o, r in zip(ours[1:], ref[1:]):
        torch.testing.assert_close(o.double(), r, rtol=1e-5, atol=1e-6 * n)


def test_one_dimensional_coefficients_are_one_group():
    a, b = _coeffs(1, (5, 4))
    x = torch.randn(4, 10, dtype=torch.float64)
    g = torch.randn_like(x)
    y1 = effnlp_ext.rational(x, a[0], b[0])
    torch.testing.assert_close(y1, effnlp_ext.rational(x, a, b))
    ga1 = _grads(effnlp_ext.rational, x, a[0], b[0], g)
    ga2 = _grads(effnlp_ext.rational, x, a, b, g)
    assert ga1[1].shape == (6,) and ga1[2].shape == (4,)
    torch.testing.assert_close(ga1[1], ga2[1][0])
    torch.testing.assert_close(ga1[2], ga2[2][0])


def test_groups_use_their_own_coefficients():
    a, b = _coeffs(3, (5, 4))
    x = torch.randn(5, 4, 12, dtype=torch.float64)
    y = effnlp_ext.rational(x, a, b)
    for gi in range(3):
        sl = slice(4 * gi, 4 * gi + 4)
        torch.testing.assert_close(y[..., sl], rational_ref(x[..., sl], a[gi], b[gi]))


def test_known_values():
    # identity: P = x, S = 0; the constant one; and a hand-computed case.
    x = torch.linspace(-3, 3, 13, dtype=torch.float64)
    ident = effnlp_ext.rational(x, torch.tensor([0.0, 1.0], dtype=torch.float64),
                                torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(ident, x, rtol=0, atol=0)
    one = effnlp_ext.rational(x, torch.ones(1, dtype=torch.float64), torch.zeros(0, dtype=torch.float64))
    torch.testing.assert_close(one, torch.ones_like(x), rtol=0, atol=0)
    # (1 + 2x + 3x^2) / (1 + |-x + x^2|) at x = 2: 17 / 3
    y = effnlp_ext.rational(torch.tensor([2.0], dtype=torch.float64),
                            torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64),
                            torch.tensor([-1.0, 1.0], dtype=torch.float64))
    assert y.item() == pytest.approx(17 / 3, rel=1e-15)


def test_gradient_at_denominator_zero_matches_torch_abs():
    """Where S(x) = 0 exactly, |S| has torch's subgradient 0 (x = 0 and a root of S)."""
    a = torch.tensor([0.3, 1.0, -0.5], dtype=torch.float64)
    b = torch.tensor([-1.0, 1.0], dtype=torch.float64)   # S = x^2 - x: roots 0 and 1
    x = torch.tensor([0.0, 1.0, 0.5, -2.0], dtype=torch.float64)
    g = torch.ones_like(x)
    for o, r in zip(_grads(effnlp_ext.rational, x, a, b, g), _grads(rational_ref, x, a, b, g)):
        torch.testing.assert_close(o, r, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("case", [((3, 4), 1, (5, 4)), ((2, 6), 3, (3, 2)), ((5,), 1, (2, 0)),
                                  ((2, 2, 9), 9, (4, 3)), ((1, 16), 2, (5, 4))], ids=str)
def test_gradcheck_float64(case):
    shape, G, degrees = case
    a, b = _coeffs(G, degrees)
    x = torch.randn(*shape, dtype=torch.float64) * 1.5
    ins = [t.requires_grad_() for t in (x, a, b)]
    assert torch.autograd.gradcheck(effnlp_ext.rational, ins)


def test_non_contiguous_inputs_and_expanded_grad():
    a, b = _coeffs(2, (5, 4))
    x = torch.randn(10, 30, dtype=torch.float64)[:, ::3]           # strided last dim, C = 10
    torch.testing.assert_close(effnlp_ext.rational(x, a, b), rational_ref(x, a, b))
    xt = torch.randn(6, 7, 4, dtype=torch.float64).transpose(0, 2)  # [4, 7, 6]
    a2, b2 = (t.t().contiguous().t() for t in _coeffs(3, (5, 4)))   # column-major coefficients
    assert not a2.is_contiguous()
    torch.testing.assert_close(effnlp_ext.rational(xt, a2, b2), rational_ref(xt, a2, b2))
    # y.sum(): an expanded (zero-stride) upstream gradient
    ins = [t.clone().requires_grad_() for t in (xt, a2, b2)]
    refs = [t.clone().requires_grad_() for t in (xt, a2, b2)]
    ours = torch.autograd.grad(effnlp_ext.rational(*ins).sum(), ins)
    ref = torch.autograd.grad(rational_ref(*refs).sum(), refs)
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r)


def test_frozen_coefficients_get_no_grad_and_x_only():
    a, b = _coeffs(1, (5, 4))
    x = torch.randn(5, 9, dtype=torch.float64, requires_grad=True)
    effnlp_ext.rational(x, a, b).sum().backward()
    assert x.grad is not None and a.grad is None and b.grad is None
    for mask in ([True, False, False], [False, True, False], [False, False, True], [False, True, True]):
        out = torch.ops.effnlp._rational_backward(torch.ones(5, 9, dtype=torch.float64), x.detach(),
                                                  a, b, mask)
        for t, need, like in zip(out, mask, (x, a, b)):
            assert t.shape == (like.shape if need else (0,))


def test_empty_input_gives_zero_coefficient_grads():
    a, b = _coeffs(2, (5, 4), torch.float32)
    x = torch.randn(0, 8, requires_grad=True)
    ar, br = a.clone().requires_grad_(), b.clone().requires_grad_()
    effnlp_ext.rational(x, ar, br).sum().backward()
    assert x.grad.shape == x.shape
    assert torch.count_nonzero(ar.grad) == 0 and torch.count_nonzero(br.grad) == 0


def _coef_grads(x, a, b, g):
    return torch.ops.effnlp._rational_backward(g, x, a, b, [True, True, True])


@pytest.mark.parametrize("layout", [(3072, 1), (768, 4), (20, 5)], ids=str)
def test_coefficient_grads_are_bitwise_independent_of_threads(layout):
    C, G = layout
    a, b = _coeffs(G, (5, 4), torch.float32)
    n = (1 << 18) // C + 3                         # several reduction chunks, ragged end
    x = torch.randn(n, C) * 2
    g = torch.randn(n, C)
    threads = torch.get_num_threads()
    try:
        results = []
        for t in (1, 2, 3, 1):
            torch.set_num_threads(t)
            results.append(_coef_grads(x, a, b, g))
    finally:
        torch.set_num_threads(threads)
    for r in results[1:]:
        for p, q in zip(results[0], r):
            assert torch.equal(p, q)


def test_coefficient_grads_are_accurate_over_many_elements():
    """float32 data, 4M elements: the coefficient gradients stay within a few float32 ulps of
    the float64 sums (a plain float32 running sum would drift by ~1e-4 relative)."""
    a, b = _coeffs(1, (5, 4), torch.float32)
    x = torch.randn(1024, 4096)
    g = torch.randn(1024, 4096) + 0.1            # a nonzero mean, so the sums are large
    _, ga, gb = _coef_grads(x, a, b, g)
    _, ra, rb = _coef_grads(x.double(), a.double(), b.double(), g.double())
    for o, r in ((ga, ra), (gb, rb)):
        rel = ((o.double() - r).abs() / r.abs().clamp_min(1e-3)).max().item()
        assert rel < 1e-6, rel


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_error_at_most_twice_torch(dtype):
    a, b = (t.to(dtype) for t in _coeffs(2, (5, 4), torch.float32))
    x = (torch.randn(64, 40) * 2).to(dtype)
    y = effnlp_ext.rational(x, a, b)
    assert y.dtype == dtype
    ref64 = rational_ref(x.double(), a.double(), b.double())
    torch_err = (rational_ref(x, a, b).double() - ref64).abs().max()
    assert (y.double() - ref64).abs().max() <= 2 * torch_err + 1e-6
    g = torch.randn(64, 40).to(dtype)
    ours = _grads(effnlp_ext.rational, x, a, b, g)
    ref = _grads(rational_ref, x.double(), a.double(), b.double(), g.double())
    theirs = _grads(rational_ref, x, a, b, g)
    for o, r, t in zip(ours, ref, theirs):
        assert o.dtype == dtype
        assert (o.double() - r).abs().max() <= 2 * (t.double() - r).abs().max() + 1e-6


def test_opcheck():
    a, b = _coeffs(2, (5, 4), torch.float32)
    x = torch.randn(3, 5, 8)
    ins = [t.clone().requires_grad_() for t in (x, a, b)]
    torch.library.opcheck(torch.ops.effnlp.rational, tuple(ins))
    torch.library.opcheck(torch.ops.effnlp.rational, (x, a, b))
    torch.library.opcheck(torch.ops.effnlp.rational, (ins[0], a[0], b[0]))
    g = torch.randn(3, 5, 8)
    for mask in ([True, True, True], [False, True, True], [True, False, False]):
        torch.library.opcheck(torch.ops.effnlp._rational_backward, (g, x, a, b, mask))


def test_torch_compile_fullgraph():
    a, b = _coeffs(2, (5, 4), torch.float32)
    lin = torch.nn.Linear(8, 3)

    def f(x, a, b):
        return lin(effnlp_ext.rational(torch.relu(x) - 0.5, a, b))

    x = torch.randn(4, 6, 8)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, a, b), f(x, a, b))
    ins = [t.clone().requires_grad_() for t in (x, a, b)]
    compiled(*ins).sum().backward()
    ins2 = [t.clone().requires_grad_() for t in (x, a, b)]
    f(*ins2).sum().backward()
    for p, q in zip(ins, ins2):
        torch.testing.assert_close(p.grad, q.grad)


def test_torch_compile_inductor():
    a, b = _coeffs(1, (5, 4), torch.float32)
    x = torch.randn(3, 11, 16)
    compiled = torch.compile(lambda x: torch.tanh(effnlp_ext.rational(x, a, b)) * 2, fullgraph=True)
    torch.testing.assert_close(compiled(x), torch.tanh(rational_ref(x, a, b)) * 2)


def _f32(*shape):
    return torch.randn(*shape)


@pytest.mark.parametrize("make,match", [
    (lambda: (_f32(4, 9), _f32(1, 6), _f32(2, 4)), "same number of groups"),
    (lambda: (_f32(4, 9), _f32(2, 6), _f32(2, 4)), "not divisible by the number of groups 2"),
    (lambda: (_f32(4, 9), _f32(6), _f32(1, 4)), "must both be 1-D"),
    (lambda: (_f32(4, 9), _f32(1, 1, 6), _f32(1, 1, 4)), "must both be 1-D"),
    (lambda: (_f32(4, 9), _f32(1, 0), _f32(1, 4)), "numerator must have 1..16"),
    (lambda: (_f32(4, 9), _f32(1, 17), _f32(1, 4)), "numerator must have 1..16"),
    (lambda: (_f32(4, 9), _f32(1, 6), _f32(1, 17)), "denominator must have 0..16"),
    (lambda: (_f32(4, 9).double(), _f32(1, 6), _f32(1, 4)), "dtype"),
    (lambda: (_f32(4, 9), _f32(1, 6), _f32(1, 4).double()), "dtype"),
    (lambda: (torch.randint(0, 3, (4, 9)), _f32(1, 6), _f32(1, 4)), "floating"),
    (lambda: (_f32(4, 9), torch.randn(1, 6, device="meta"), _f32(1, 4)), "device"),
    (lambda: (torch.randn(()), _f32(1, 6), _f32(1, 4)), "at least one dimension"),
    (lambda: (_f32(4, 9), _f32(0, 6), _f32(0, 4)), "at least one group"),
])
def test_bad_input_raises(make, match):
    x, a, b = make()
    with pytest.raises(RuntimeError, match=match):
        effnlp_ext.rational(x, a, b)


def test_bad_input_names_the_op():
    with pytest.raises(RuntimeError, match="^rational: "):
        effnlp_ext.rational(_f32(2, 3), _f32(2, 6), _f32(2, 4))
    with pytest.raises(RuntimeError, match="_rational_backward: grad_y has shape"):
        torch.ops.effnlp._rational_backward(_f32(2, 5), _f32(2, 4), _f32(6), _f32(4), [True] * 3)


def test_bad_input_raises_under_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        with pytest.raises(RuntimeError, match="not divisible"):
            torch.ops.effnlp.rational(_f32(4, 9), _f32(2, 6), _f32(2, 4))
        with pytest.raises(RuntimeError, match="grad_y has shape"):
            torch.ops.effnlp._rational_backward(_f32(2, 5), _f32(2, 4), _f32(6), _f32(4), [True] * 3)
        y = torch.ops.effnlp.rational(_f32(2, 4, 9), _f32(3, 6), _f32(3, 4))
        assert y.shape == (2, 4, 9)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 20), cg=st.integers(0, 20), groups=st.integers(1, 4),
       m=st.integers(0, 8), d=st.integers(0, 8), scale=st.floats(0.1, 4.0),
       need=st.lists(st.booleans(), min_size=3, max_size=3))
def test_property_matches_reference(n, cg, groups, m, d, scale, need):
    a, b = _coeffs(groups, (m, d))
    x = torch.randn(n, cg * groups, dtype=torch.float64) * scale
    g = torch.randn_like(x)
    torch.testing.assert_close(effnlp_ext.rational(x, a, b), rational_ref(x, a, b), rtol=1e-10, atol=1e-10)
    ins = [t.clone().requires_grad_(r) for t, r in zip((x, a, b), need)]
    refs = [t.clone().requires_grad_(r) for t, r in zip((x, a, b), need)]
    if not any(need):
        return
    kw = dict(allow_unused=True, materialize_grads=True)
    ours = torch.autograd.grad(effnlp_ext.rational(*ins), [t for t in ins if t.requires_grad], g, **kw)
    r = rational_ref(*refs)
    if not r.requires_grad:  # only an empty denominator requires grad: nothing depends on it
        assert all(o.numel() == 0 for o in ours)
        return
    ref = torch.autograd.grad(r, [t for t in refs if t.requires_grad], g, **kw)
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r, rtol=1e-9, atol=1e-9)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_cuda_matches_reference(dtype, layout):
    C, G = layout
    a, b = _coeffs(G, (5, 4), dtype, "cuda")
    x = (torch.randn(5, 7, C, device="cuda") * 2).to(dtype)
    g = torch.randn_like(x)
    ours = _grads(effnlp_ext.rational, x, a, b, g)
    y = effnlp_ext.rational(x, a, b)
    ref64 = rational_ref(x.double(), a.double(), b.double())
    ref = _grads(rational_ref, x.double(), a.double(), b.double(), g.double())
    if dtype in (torch.float16, torch.bfloat16):
        theirs = _grads(rational_ref, x, a, b, g)
        assert (y.double() - ref64).abs().max() <= 2 * (rational_ref(x, a, b).double() - ref64).abs().max() + 1e-6
        for o, r, t in zip(ours, ref, theirs):
            assert (o.double() - r).abs().max() <= 2 * (t.double() - r).abs().max() + 1e-6
    else:
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(y.double(), ref64, **tol)
        n = max(x.numel() // G, 1)
        torch.testing.assert_close(ours[0].double(), ref[0], **tol)
        for o, r in zip(ours[1:], ref[1:]):
            torch.testing.assert_close(o.double(), r, rtol=tol["rtol"], atol=tol["atol"] * n)


@pytest.mark.cuda
def test_cuda_coefficient_grads_are_deterministic_and_match_cpu():
    a, b = _coeffs(4, (5, 4), torch.float32)
    x = torch.randn(3001, 768) * 2
    g = torch.randn(3001, 768)
    cpu = _coef_grads(x, a, b, g)
    runs = [_coef_grads(x.cuda(), a.cuda(), b.cuda(), g.cuda()) for _ in range(3)]
    for r in runs[1:]:
        for p, q in zip(runs[0], r):
            assert torch.equal(p, q)
    torch.testing.assert_close(runs[0][0].cpu(), cpu[0], rtol=1e-5, atol=1e-5)
    for p, q in zip(runs[0][1:], cpu[1:]):
        torch.testing.assert_close(p.cpu(), q, rtol=1e-5, atol=1e-3)


def test_cuda_kernel_registered_when_built_with_cuda():
    if torch.version.cuda is None:
        pytest.skip("CPU-only torch: CUDA kernels are checked by `make cuda-check`")
    for op in ("rational", "_rational_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"effnlp::{op}", "CUDA")
