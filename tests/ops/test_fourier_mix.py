"""fourier_mix: reference parity, lengths, gradients, opcheck, torch.compile and input validation."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import effnlp_ext
from effnlp_ext.reference import fourier_mix_ref, fourier_mix_rfft

from ..conftest import DEVICES

# (L, H): both second-transform paths (DFT-GEMM for L <= 32, FFT above), odd and even H (the
# Hermitian mirror differs), prime sizes, L = 1 and H = 1.
SHAPES = [(1, 1), (1, 6), (5, 1), (5, 7), (8, 8), (13, 10), (32, 33), (33, 32), (47, 9),
          (64, 24), (100, 3)]
BATCH = [(), (1,), (3,), (2, 2), (0,)]


def _tol(dtype, L, H):
    # An FFT's rounding error grows like log(n) per element; scale with the sizes, generously.
    eps = torch.finfo(dtype).eps
    scale = (L * H) ** 0.5
    return dict(rtol=50 * eps * scale, atol=50 * eps * scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("batch", BATCH, ids=str)
def test_forward_matches_reference(device, shape, batch):
    x = torch.randn(*batch, *shape, device=device)
    y = effnlp_ext.fourier_mix(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y.double(), fourier_mix_ref(x.double()), **_tol(torch.float32, *shape))


@pytest.mark.parametrize("shape", [(7, 5), (31, 12), (40, 16)], ids=str)
def test_float64_and_the_rfft_composition_agree(shape):
    x = torch.randn(3, *shape, dtype=torch.float64)
    ref = fourier_mix_ref(x)
    torch.testing.assert_close(effnlp_ext.fourier_mix(x), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fourier_mix_rfft(x), ref, rtol=1e-12, atol=1e-12)


def test_large_batch_crosses_chunks():
    x = torch.randn(70, 48, 160)  # more than one cache-sized chunk
    torch.testing.assert_close(effnlp_ext.fourier_mix(x).double(), fourier_mix_ref(x.double()),
                               **_tol(torch.float32, 48, 160))


def test_empty_sizes():
    for shape in [(0, 5, 4), (3, 0, 4), (3, 5, 0)]:
        x = torch.randn(shape, requires_grad=True)
        y = effnlp_ext.fourier_mix(x)
        assert y.shape == shape
        y.sum().backward()
        assert x.grad.shape == shape


def test_non_contiguous_and_expanded_inputs():
    base = torch.randn(4, 9, 20, dtype=torch.float64)
    for x in (base.transpose(1, 2), base[:, ::2, 1::3], base[:1].expand(3, 9, 20)):
        torch.testing.assert_close(effnlp_ext.fourier_mix(x), fourier_mix_ref(x), rtol=1e-12,
                                   atol=1e-12)


@pytest.mark.parametrize("L", [12, 45])
def test_lengths_match_per_sequence_transforms(L):
    x = torch.randn(6, L, 10, dtype=torch.float64)
    lengths = torch.tensor([L, 1, 0, L // 2, L, 3])
    y = effnlp_ext.fourier_mix(x, lengths)
    torch.testing.assert_close(y, fourier_mix_ref(x, lengths), rtol=1e-12, atol=1e-12)
    for b, n in enumerate(lengths.tolist()):
        assert torch.all(y[b, n:] == 0)


def test_padding_does_not_change_real_tokens():
    x = torch.randn(3, 20, 8)
    lengths = torch.tensor([20, 7, 11], dtype=torch.int32)
    noisy = x.clone()
    for b, n in enumerate(lengths.tolist()):
        noisy[b, n:] = 1e3 * torch.randn(20 - n, 8)
    torch.testing.assert_close(effnlp_ext.fourier_mix(x, lengths),
                               effnlp_ext.fourier_mix(noisy, lengths))
    # ... whereas without lengths (HF FNet) the padding leaks into every token.
    assert not torch.allclose(effnlp_ext.fourier_mix(x)[1, :7], effnlp_ext.fourier_mix(noisy)[1, :7])


def test_lengths_with_more_batch_dims():
    x = torch.randn(2, 3, 9, 6, dtype=torch.float64)
    lengths = torch.tensor([[9, 4, 0], [1, 9, 5]])
    torch.testing.assert_close(effnlp_ext.fourier_mix(x, lengths), fourier_mix_ref(x, lengths))


# Both second-transform paths (GEMM for L <= 32, FFT above), odd and even H.
@pytest.mark.parametrize("shape", [(3, 4, 5), (2, 3, 6), (2, 34, 2)], ids=str)
@pytest.mark.parametrize("with_lengths", [False, True])
def test_gradcheck_float64(shape, with_lengths):
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([shape[1], 2][:shape[0]] + [0] * (shape[0] - 2)) if with_lengths else None
    assert torch.autograd.gradcheck(lambda t: effnlp_ext.fourier_mix(t, lengths), (x,))
    assert torch.autograd.gradgradcheck(lambda t: effnlp_ext.fourier_mix(t, lengths), (x,),
                                        fast_mode=True)


def test_backward_matches_reference_and_accepts_expanded_grad():
    x = torch.randn(4, 37, 12, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([37, 20, 0, 5])
    g = torch.randn(1, 37, 12, dtype=torch.float64).expand(4, 37, 12)  # zero-stride grad
    (gx,) = torch.autograd.grad(effnlp_ext.fourier_mix(x, lengths), x, g)
    xr = x.detach().clone().requires_grad_()
    (gr,) = torch.autograd.grad(fourier_mix_ref(xr, lengths), xr, g)
    torch.testing.assert_close(gx, gr)


def test_deterministic():
    x = torch.randn(5, 64, 48)
    assert torch.equal(effnlp_ext.fourier_mix(x), effnlp_ext.fourier_mix(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_error_within_twice_torchs_own(dtype):
    x = torch.randn(2, 24, 16)
    ref = fourier_mix_ref(x.double())
    ours = (effnlp_ext.fourier_mix(x.to(dtype)).double() - ref).abs().max()
    theirs = (torch.fft.fftn(x.to(dtype).float(), dim=(-2, -1)).real.to(dtype).double() - ref).abs().max()
    assert effnlp_ext.fourier_mix(x.to(dtype)).dtype == dtype
    assert ours <= 2 * theirs + 1e-6


@pytest.mark.parametrize("shape", [(2, 5, 6), (2, 40, 7)], ids=str)
def test_opcheck(shape):
    x = torch.randn(*shape, requires_grad=True)
    torch.library.opcheck(torch.ops.effnlp.fourier_mix, (x, None))
    torch.library.opcheck(torch.ops.effnlp.fourier_mix, (x, torch.tensor([shape[1], 3])))


def test_torch_compile_fullgraph():
    x = torch.randn(3, 20, 12, requires_grad=True)
    lengths = torch.tensor([20, 9, 0])

    def f(t):
        return torch.tanh(effnlp_ext.fourier_mix(t, lengths))

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), f(x))
    (g1,) = torch.autograd.grad(compiled(x).sum(), x)
    (g2,) = torch.autograd.grad(f(x).sum(), x)
    torch.testing.assert_close(g1, g2)
    inductor = torch.compile(lambda t: effnlp_ext.fourier_mix(t) * 2, fullgraph=True)
    torch.testing.assert_close(inductor(x.detach()), 2 * fourier_mix_ref(x.detach()), rtol=1e-4,
                               atol=1e-4)


@pytest.mark.parametrize("make, match", [
    (lambda: (torch.randn(5), None), "at least 2 dims"),
    (lambda: (torch.randint(0, 3, (2, 4, 4)), None), "floating-point"),
    (lambda: (torch.randn(2, 4, 4), torch.tensor([4.0, 1.0])), "int64 or int32"),
    (lambda: (torch.randn(2, 4, 4), torch.tensor([4, 1, 2])), "batch shape"),
    (lambda: (torch.randn(4, 4), torch.tensor([4])), "batch"),
    (lambda: (torch.randn(2, 4, 4), torch.tensor([5, 1])), r"outside \[0, L\]"),
    (lambda: (torch.randn(2, 4, 4), torch.tensor([-1, 1])), r"outside \[0, L\]"),
])
def test_bad_input_raises(make, match):
    x, lengths = make()
    with pytest.raises(RuntimeError, match=f"fourier_mix: .*{match}"):
        effnlp_ext.fourier_mix(x, lengths)


def test_bad_input_raises_under_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        with pytest.raises(RuntimeError, match="fourier_mix: lengths must have the batch shape"):
            torch.ops.effnlp.fourier_mix(torch.empty(2, 4, 4), torch.empty(3, dtype=torch.long))


@settings(max_examples=40, deadline=None)
@given(B=st.integers(0, 3), L=st.integers(1, 40), H=st.integers(1, 20), data=st.data())
def test_property_matches_reference(B, L, H, data):
    x = torch.randn(B, L, H, dtype=torch.float64)
    lengths = torch.tensor(data.draw(st.lists(st.integers(0, L), min_size=B, max_size=B)),
                           dtype=torch.long) if B and data.draw(st.booleans()) else None
    torch.testing.assert_close(effnlp_ext.fourier_mix(x, lengths), fourier_mix_ref(x, lengths),
                               rtol=1e-11, atol=1e-11)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 20, 12), (2, 128, 64), (2, 31, 9)], ids=str)
def test_cuda_matches_reference(dtype, shape):
    x = torch.randn(*shape, device="cuda").to(dtype)
    lengths = torch.tensor([shape[1], 5][:shape[0]] + [0] * (shape[0] - 2), device="cuda")
    for ln in (None, lengths):
        y = effnlp_ext.fourier_mix(x, ln)
        ref = fourier_mix_ref(x.double(), ln)
        err = (y.double() - ref).abs().max()
        own = (fourier_mix_ref(x.float(), ln).to(dtype).double() - ref).abs().max()
        assert y.dtype == dtype and err <= 2 * own + 1e-9


def test_cuda_kernel_registered_when_built_with_cuda():
    if torch.version.cuda is None:
        pytest.skip("CPU-only torch: CUDA kernels are checked by `make cuda-check`")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("effnlp::fourier_mix", "CUDA")


@pytest.mark.parametrize("threads", [1, 2, 5])
def test_fewer_sequences_than_threads_matches_reference(threads):
    # The MKL path runs sequences in parallel when there are enough of them, and one at a time
    # through a plan threaded inside MKL when there are fewer than threads: both, with lengths.
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for shape, lengths in [((1, 300, 24), None), ((3, 40, 10), torch.tensor([40, 7, 0])),
                               ((4, 65, 17), torch.tensor([1, 65, 64, 2])), ((2, 1, 5), None)]:
            for dtype, tol in [(torch.float64, 1e-11), (torch.float32, 2e-4)]:
                x = torch.randn(*shape, dtype=dtype)
                torch.testing.assert_close(effnlp_ext.fourier_mix(x, lengths),
                                           fourier_mix_ref(x, lengths), rtol=tol, atol=tol)
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("env", [{"EFFNLP_FOURIER_NO_MKL": "1"}, {"EFFNLP_FOURIER_GEMM_MAX_L": "0"},
                                 {"EFFNLP_FOURIER_GEMM_MAX_L": "1000"}], ids=str)
def test_every_kernel_path_matches_reference(monkeypatch, env):
    # The ATen-FFT fallback, the FFT path at every length, the DFT-GEMM path at every length.
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for shape, lengths in [((3, 40, 10), torch.tensor([40, 7, 0])), ((1, 33, 9), None),
                           ((4, 8, 12), None)]:
        x = torch.randn(*shape, dtype=torch.float64)
        torch.testing.assert_close(effnlp_ext.fourier_mix(x, lengths), fourier_mix_ref(x, lengths),
                                   rtol=1e-11, atol=1e-11)
