"""masked_linear: reference parity, straight-through gradients, opcheck, torch.compile and
input validation."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import effnlp_ext
from effnlp_ext.reference import masked_linear_ref

from ..conftest import DEVICES

SHAPES = [(1, 1), (7, 5), (33, 17), (64, 96), (3, 130), (0, 4), (5, 0)]  # (out, in)
BATCH = [(), (1,), (9,), (2, 3), (0,), (3, 0, 2)]
THRESHOLDS = [0.0, 0.4, -float("inf"), float("inf")]


def _make(out, inp, dtype=torch.float32, device="cpu"):
    w = torch.randn(out, inp, dtype=dtype, device=device)
    s = torch.randn(out, inp, dtype=dtype, device=device)
    b = torch.randn(out, dtype=dtype, device=device)
    return w, s, b


def _tol(dtype, n):
    eps = torch.finfo(dtype).eps
    return dict(rtol=eps * 80 * max(n, 1) ** 0.5, atol=eps * 80 * max(n, 1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("batch", BATCH, ids=str)
@pytest.mark.parametrize("with_bias", [True, False])
def test_forward_matches_reference(device, shape, batch, with_bias):
    out, inp = shape
    w, s, b = _make(out, inp, device=device)
    x = torch.randn(*batch, inp, device=device)
    b = b if with_bias else None
    y = effnlp_ext.masked_linear(x, w, s, 0.3, b)
    ref = masked_linear_ref(x.double(), w.double(), s.double(), 0.3, None if b is None else b.double())
    assert y.shape == (*batch, out)
    torch.testing.assert_close(y.double(), ref, **_tol(torch.float32, inp))


@pytest.mark.parametrize("t", THRESHOLDS, ids=str)
def test_threshold_extremes(t):
    w, s, b = _make(6, 10, torch.float64)
    x = torch.randn(4, 10, dtype=torch.float64)
    y = effnlp_ext.masked_linear(x, w, s, t, b)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w * (s > t), b))
    if t == float("inf"):
        torch.testing.assert_close(y, b.expand(4, 6))


def test_ties_at_threshold_are_dropped():
    # Strictly greater: a score equal to the threshold is masked out.
    w = torch.ones(1, 3, dtype=torch.float64)
    s = torch.tensor([[0.5, 0.5, 0.6]], dtype=torch.float64)
    x = torch.ones(1, 3, dtype=torch.float64)
    assert effnlp_ext.masked_linear(x, w, s, 0.5).item() == 1.0


@pytest.mark.parametrize("shape", [(3, 4), (5, 1), (1, 6), (7, 9)], ids=str)
def test_gradcheck_float64_x_weight_bias(shape):
    out, inp = shape
    w, s, b = _make(out, inp, torch.float64)
    x = torch.randn(2, 3, inp, dtype=torch.float64)
    ins = [t.requires_grad_() for t in (x, w, b)]
    assert torch.autograd.gradcheck(lambda x, w, b: effnlp_ext.masked_linear(x, w, s, 0.2, b), ins)


@pytest.mark.parametrize("shape", [(3, 4), (5, 2), (1, 6)], ids=str)
def test_score_gradient_is_straight_through(shape):
    """dL/dS is the derivative of u -> x @ (W * (M + u)).T at u = 0 (the mask relaxed), checked
    by central differences in float64: what TAMT's straight-through estimator is."""
    out, inp = shape
    w, s, b = _make(out, inp, torch.float64)
    x = torch.randn(2, 5, inp, dtype=torch.float64)
    g = torch.randn(2, 5, out, dtype=torch.float64)
    sr = s.clone().requires_grad_()
    (gs,) = torch.autograd.grad(effnlp_ext.masked_linear(x, w, sr, 0.1, b), [sr], g)
    m = (s > 0.1).double()

    def loss(u):
        return (torch.nn.functional.linear(x, w * (m + u), b) * g).sum()

    eps = 1e-6
    num = torch.zeros_like(s)
    for i in range(out):
        for j in range(inp):
            e = torch.zeros_like(s)
            e[i, j] = eps
            num[i, j] = (loss(e) - loss(-e)) / (2 * eps)
    torch.testing.assert_close(gs, num, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("train_weight", [True, False])
def test_backward_matches_reference(shape, train_weight):
    out, inp = shape
    w, s, b = _make(out, inp, torch.float64)
    x = torch.randn(3, 11, inp, dtype=torch.float64)
    g = torch.randn(3, 11, out, dtype=torch.float64)
    ins = [x.clone().requires_grad_(), w.clone().requires_grad_(train_weight),
           s.clone().requires_grad_(), b.clone().requires_grad_()]
    refs = [x.clone().requires_grad_(), w.clone().requires_grad_(train_weight),
            s.clone().requires_grad_(), b.clone().requires_grad_()]
    diff = [t for t in ins if t.requires_grad]
    ours = torch.autograd.grad(effnlp_ext.masked_linear(ins[0], ins[1], ins[2], 0.1, ins[3]), diff, g)
    ref = torch.autograd.grad(masked_linear_ref(refs[0], refs[1], refs[2], 0.1, refs[3]),
                              [t for t in refs if t.requires_grad], g)
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-10)


def test_weight_gradient_is_masked_and_frozen_weight_gets_none():
    w, s, b = _make(8, 6, torch.float64)
    x = torch.randn(5, 6, dtype=torch.float64)
    wr, sr = w.clone().requires_grad_(), s.clone().requires_grad_()
    effnlp_ext.masked_linear(x, wr, sr, 0.0, b).sum().backward()
    assert torch.all(wr.grad[s <= 0] == 0)
    wf, sf = w.clone(), s.clone().requires_grad_()
    effnlp_ext.masked_linear(x, wf, sf, 0.0, b).sum().backward()
    assert wf.grad is None and sf.grad is not None


def test_only_inputs_are_saved_for_backward():
    """No dense mask (or masked weight) is kept alive for the backward: the saved tensors are
    x, weight and scores themselves."""
    w, s, b = _make(16, 12)
    x = torch.randn(4, 12, requires_grad=True)
    s.requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = effnlp_ext.masked_linear(x, w, s, 0.0, b)
    ptrs = {t.data_ptr() for t in saved}
    assert ptrs <= {x.data_ptr(), w.data_ptr(), s.data_ptr()}, [t.shape for t in saved]
    y.sum().backward()
    # the composition keeps the masked weight (a dense float tensor the weight's size) alive
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        masked_linear_ref(x, w, s, 0.0, b)
    assert any(t.data_ptr() not in {x.data_ptr(), w.data_ptr(), s.data_ptr()} and t.numel() == w.numel()
               for t in saved)


def test_non_contiguous_inputs():
    x = torch.randn(9, 30, dtype=torch.float64)[:, ::2]
    w = torch.randn(15, 7, dtype=torch.float64).t()
    s = torch.randn(15, 7, dtype=torch.float64).t()
    b = torch.randn(14, dtype=torch.float64)[::2]
    torch.testing.assert_close(effnlp_ext.masked_linear(x, w, s, 0.1, b), masked_linear_ref(x, w, s, 0.1, b))
    xt = torch.randn(15, 4, 15, dtype=torch.float64).transpose(0, 1)
    se = torch.randn(1, 15, dtype=torch.float64).expand(7, 15)  # zero-stride scores
    w2 = torch.randn(7, 15, dtype=torch.float64)
    torch.testing.assert_close(effnlp_ext.masked_linear(xt, w2, se, 0.0), masked_linear_ref(xt, w2, se, 0.0))
    # expanded upstream gradient (y.sum())
    sr = torch.randn(7, 15, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(effnlp_ext.masked_linear(xt, w2, sr, 0.0).sum(), [sr])
    sr2 = sr.detach().clone().requires_grad_()
    (g2,) = torch.autograd.grad(masked_linear_ref(xt, w2, sr2, 0.0).sum(), [sr2])
    torch.testing.assert_close(g, g2)


def test_empty_batch_backward():
    w, s, b = _make(5, 4)
    x = torch.randn(0, 4, requires_grad=True)
    wr, sr, br = (t.clone().requires_grad_() for t in (w, s, b))
    effnlp_ext.masked_linear(x, wr, sr, 0.0, br).sum().backward()
    assert x.grad.shape == x.shape
    for t in (wr, sr, br):
        assert t.grad.shape == t.shape and torch.count_nonzero(t.grad) == 0


def test_large_crosses_threads_and_is_deterministic():
    w, s, b = _make(300, 257)
    x = torch.randn(700, 257)
    g = torch.randn(700, 300)
    res = []
    for _ in range(2):
        ins = [x.clone().requires_grad_(), w.clone().requires_grad_(), s.clone().requires_grad_()]
        res.append(torch.autograd.grad(effnlp_ext.masked_linear(ins[0], ins[1], ins[2], 0.5, b), ins, g))
    for a, c in zip(*res):
        assert torch.equal(a, c)
    xd, wd, sd = (t.double().requires_grad_() for t in (x, w, s))
    ref = torch.autograd.grad(masked_linear_ref(xd, wd, sd, 0.5, b.double()), [xd, wd, sd], g.double())
    for a, r in zip(res[0], ref):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_cpu_computes_in_float32(dtype):
    w, s, b = _make(12, 16)
    x = torch.randn(10, 16)
    args = [t.to(dtype) for t in (x, w, s)]
    y = effnlp_ext.masked_linear(*args, 0.0, b.to(dtype))
    assert y.dtype == dtype
    ref64 = masked_linear_ref(*(t.double() for t in args), 0.0, b.to(dtype).double())
    torch_err = (masked_linear_ref(*args, 0.0, b.to(dtype)).double() - ref64).abs().max()
    assert (y.double() - ref64).abs().max() <= 2 * torch_err + 1e-6


def test_opcheck():
    w, s, b = _make(6, 5)
    x = torch.randn(2, 7, 5)
    ins = [t.requires_grad_() for t in (x, w, s, b)]
    torch.library.opcheck(torch.ops.effnlp.masked_linear, (ins[0], ins[1], ins[2], 0.2, ins[3]))
    torch.library.opcheck(torch.ops.effnlp.masked_linear, (x.detach(), w.detach(), ins[2], 0.0, None))
    g = torch.randn(2, 7, 6)
    for mask in ([True, True, True, True], [False, False, True, False], [True, False, False, True]):
        torch.library.opcheck(torch.ops.effnlp._masked_linear_backward,
                              (g, x.detach(), w.detach(), s.detach(), 0.2, mask))


def test_torch_compile_fullgraph():
    w, s, b = _make(10, 8)
    lin = torch.nn.Linear(10, 4)

    def f(x, w, s, b):
        return lin(torch.relu(effnlp_ext.masked_linear(x, w, s, 0.1, b)))

    x = torch.randn(5, 8)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, w, s, b), f(x, w, s, b))
    ins = [t.clone().requires_grad_() for t in (x, w, s, b)]
    compiled(*ins).sum().backward()
    ins2 = [t.clone().requires_grad_() for t in (x, w, s, b)]
    f(*ins2).sum().backward()
    for a, c in zip(ins, ins2):
        torch.testing.assert_close(a.grad, c.grad)


def test_torch_compile_inductor():
    w, s, b = _make(9, 8)
    x = torch.randn(3, 11, 8)
    compiled = torch.compile(lambda x: torch.tanh(effnlp_ext.masked_linear(x, w, s, 0.0, b)), fullgraph=True)
    torch.testing.assert_close(compiled(x), torch.tanh(masked_linear_ref(x, w, s, 0.0, b)))


@pytest.mark.parametrize("make,match", [
    (lambda: (torch.randn(4, 10), torch.randn(3, 9), torch.randn(3, 9), None), "in-features"),
    (lambda: (torch.randn(4, 9), torch.randn(3, 9), torch.randn(3, 8), None), "scores must have"),
    (lambda: (torch.randn(4, 9), torch.randn(27), torch.randn(27), None), "weight must be 2-D"),
    (lambda: (torch.randn(4, 9).double(), torch.randn(3, 9), torch.randn(3, 9), None), "dtype"),
    (lambda: (torch.randn(4, 9), torch.randn(3, 9), torch.randn(3, 9).double(), None), "dtype"),
    (lambda: (torch.randn(4, 9), torch.randn(3, 9), torch.randn(3, 9), torch.randn(4)), "bias"),
    (lambda: (torch.randint(0, 3, (4, 9)), torch.randn(3, 9), torch.randn(3, 9), None), "floating"),
    (lambda: (torch.randn(4, 9), torch.randn(3, 9, device="meta"), torch.randn(3, 9), None), "device"),
    (lambda: (torch.randn(()), torch.randn(3, 9), torch.randn(3, 9), None), "at least one dimension"),
])
def test_bad_input_raises(make, match):
    x, w, s, b = make()
    with pytest.raises(RuntimeError, match=match):
        effnlp_ext.masked_linear(x, w, s, 0.0, b)


def test_bad_input_names_the_op():
    with pytest.raises(RuntimeError, match="masked_linear: "):
        effnlp_ext.masked_linear(torch.randn(2, 3), torch.randn(2, 4), torch.randn(2, 4), 0.0)
    with pytest.raises(RuntimeError, match="_masked_linear_backward: grad_y"):
        torch.ops.effnlp._masked_linear_backward(torch.randn(2, 5), torch.randn(2, 4), torch.randn(2, 4),
                                                 torch.randn(2, 4), 0.0, [True] * 4)


def test_bad_input_raises_under_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        with pytest.raises(RuntimeError, match="in-features"):
            torch.ops.effnlp.masked_linear(torch.randn(4, 10), torch.randn(3, 9), torch.randn(3, 9), 0.0, None)
        y = torch.ops.effnlp.masked_linear(torch.randn(2, 4, 9), torch.randn(3, 9), torch.randn(3, 9), 0.0, None)
        assert y.shape == (2, 4, 3)


@settings(max_examples=40, deadline=None)
@given(out=st.integers(0, 12), inp=st.integers(0, 12), n=st.integers(0, 20),
       t=st.floats(-2, 2), bias=st.booleans(), train_weight=st.booleans())
def test_property_matches_reference(out, inp, n, t, bias, train_weight):
    w, s, b = _make(out, inp, torch.float64)
    x = torch.randn(n, inp, dtype=torch.float64)
    b = b if bias else None
    g = torch.randn(n, out, dtype=torch.float64)
    ins = [x.clone().requires_grad_(), w.clone().requires_grad_(train_weight), s.clone().requires_grad_()]
    refs = [x.clone().requires_grad_(), w.clone().requires_grad_(train_weight), s.clone().requires_grad_()]
    y = effnlp_ext.masked_linear(*ins, t, b)
    r = masked_linear_ref(*refs, t, b)
    torch.testing.assert_close(y, r)
    ours = torch.autograd.grad(y, [a for a in ins if a.requires_grad], g)
    ref = torch.autograd.grad(r, [a for a in refs if a.requires_grad], g)
    for o, q in zip(ours, ref):
        torch.testing.assert_close(o, q)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cuda_matches_reference(dtype, shape):
    out, inp = shape
    w, s, b = _make(out, inp, dtype, "cuda")
    x = torch.randn(5, 7, inp, dtype=dtype, device="cuda")
    ins = [t.clone().requires_grad_() for t in (x, w, s, b)]
    y = effnlp_ext.masked_linear(ins[0], ins[1], ins[2], 0.1, ins[3])
    refs = [t.detach().double().requires_grad_() for t in ins]
    r = masked_linear_ref(refs[0], refs[1], refs[2], 0.1, refs[3])
    tol = dict(rtol=5e-2, atol=5e-2) if dtype in (torch.float16, torch.bfloat16) else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y.double(), r, **tol)
    g = torch.randn_like(r)
    for o, q in zip(torch.autograd.grad(y, ins, g.to(dtype)), torch.autograd.grad(r, refs, g)):
        torch.testing.assert_close(o.double(), q, **tol)


def test_cuda_kernel_registered_when_built_with_cuda():
    if torch.version.cuda is None:
        pytest.skip("CPU-only torch: CUDA kernels are checked by `make cuda-check`")
    for op in ("masked_linear", "_masked_linear_backward", "sparse_linear"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"effnlp::{op}", "CUDA")


# --- the CPU sparse path: at most 15% of the weights kept (scores ~ N(0, 1), so a threshold of
# 1.3 keeps ~10%; 1.04 keeps ~15%), forward and dX through the CSR kernel of sparse_linear.
SPARSE_T = 1.3


@pytest.mark.parametrize("shape", SHAPES + [(96, 200), (1, 300), (300, 1)], ids=str)
@pytest.mark.parametrize("batch", [(), (1,), (2, 9), (0,), (70,)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_path_matches_reference(shape, batch, dtype):
    out, inp = shape
    w, s, b = _make(out, inp, dtype)
    x = torch.randn(*batch, inp, dtype=dtype)
    g = torch.randn(*batch, out, dtype=dtype)
    ins = [t.clone().requires_grad_() for t in (x, w, s, b)]
    refs = [t.double().requires_grad_() for t in (x, w, s, b)]
    y = effnlp_ext.masked_linear(ins[0], ins[1], ins[2], SPARSE_T, ins[3])
    yr = masked_linear_ref(refs[0], refs[1], refs[2], SPARSE_T, refs[3])
    tol = _tol(dtype, max(inp, out) * max(1, x.numel() // max(inp, 1)))
    torch.testing.assert_close(y.double(), yr, **tol)
    grads = torch.autograd.grad(y, ins, g, allow_unused=True)
    grads_r = torch.autograd.grad(yr, refs, g.double(), allow_unused=True)
    for a, r in zip(grads, grads_r):
        torch.testing.assert_close(a.double(), r, **tol)


def test_sparse_path_gradcheck_and_opcheck():
    w, s, b = _make(23, 31, torch.float64)
    x = torch.randn(2, 13, 31, dtype=torch.float64, requires_grad=True)
    bb = b.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, b: effnlp_ext.masked_linear(x, w, s, SPARSE_T, b), (x, bb))
    ins = [t.detach().float().requires_grad_() for t in (x, w, s, b)]
    torch.library.opcheck(torch.ops.effnlp.masked_linear, (ins[0], ins[1], ins[2], SPARSE_T, ins[3]))
    g = torch.randn(2, 13, 23)
    for mask in ([True, True, True, True], [True, False, False, False]):
        torch.library.opcheck(torch.ops.effnlp._masked_linear_backward,
                              (g, x.detach().float(), w.float(), s.float(), SPARSE_T, mask))


def test_sparse_path_non_contiguous_and_expanded_grad():
    x = torch.randn(9, 60, dtype=torch.float64)[:, ::2].requires_grad_()
    w = torch.randn(30, 40, dtype=torch.float64).t()          # [40, 30], non-contiguous
    s = torch.randn(30, 40, dtype=torch.float64).t().requires_grad_()
    y = effnlp_ext.masked_linear(x, w, s, SPARSE_T)
    xr, sr = x.detach().clone().requires_grad_(), s.detach().clone().requires_grad_()
    yr = masked_linear_ref(xr, w, sr, SPARSE_T)
    torch.testing.assert_close(y, yr)
    for a, r in zip(torch.autograd.grad(y.sum(), [x, s]), torch.autograd.grad(yr.sum(), [xr, sr])):
        torch.testing.assert_close(a, r)


@pytest.mark.parametrize("t", [0.9, 1.0, 1.08, 1.2])   # ~18%, 16%, 14%, 11.5% kept
def test_dense_and_sparse_paths_agree_around_the_cutoff(t):
    torch.manual_seed(3)
    w, s, b = _make(257, 300)
    x = torch.randn(700, 300)
    g = torch.randn(700, 257)
    res = []
    for _ in range(2):   # deterministic on repeat, every thread count
        ins = [t_.clone().requires_grad_() for t_ in (x, w, s)]
        y = effnlp_ext.masked_linear(ins[0], ins[1], ins[2], t, b)
        res.append((y, *torch.autograd.grad(y, ins, g)))
    for a, c in zip(*res):
        assert torch.equal(a, c)
    refs = [t_.double().requires_grad_() for t_ in (x, w, s)]
    yr = masked_linear_ref(refs[0], refs[1], refs[2], t, b.double())
    for a, r in zip(res[0], (yr, *torch.autograd.grad(yr, refs, g.double()))):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-3)
