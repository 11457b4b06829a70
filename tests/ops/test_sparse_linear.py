"""sparse_linear (CSR inference op): reference parity, opcheck, torch.compile, validation."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

import effnlp_ext
from effnlp_ext.reference import sparse_linear_ref

from ..conftest import DEVICES


def _csr(out, inp, density, dtype=torch.float32, device="cpu"):
    w = torch.randn(out, inp, dtype=dtype) * (torch.rand(out, inp) < density)
    c = w.to_sparse_csr()
    return (w.to(device), c.crow_indices().int().to(device), c.col_indices().int().to(device),
            c.values().clone().to(device))


SHAPES = [(1, 1), (7, 5), (130, 33), (64, 200), (3, 70), (0, 4), (5, 0)]
BATCH = [(), (1,), (9,), (2, 3), (65,), (0,), (3, 0, 2)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("batch", BATCH, ids=str)
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
def test_matches_dense(device, shape, batch, density):
    out, inp = shape
    w, crow, col, val = _csr(out, inp, density, device=device)
    b = torch.randn(out, device=device)
    x = torch.randn(*batch, inp, device=device)
    y = effnlp_ext.sparse_linear(x, crow, col, val, inp, b)
    ref = torch.nn.functional.linear(x.double(), w.double(), b.double())
    assert y.shape == (*batch, out)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * max(inp, 1) ** 0.5)
    torch.testing.assert_close(sparse_linear_ref(x, crow, col, val, inp, b), ref.float(), rtol=1e-4, atol=1e-4)


def test_float64_exact_many_blocks_and_threads():
    w, crow, col, val = _csr(777, 300, 0.1, torch.float64)
    x = torch.randn(1001, 300, dtype=torch.float64)
    torch.testing.assert_close(effnlp_ext.sparse_linear(x, crow, col, val, 300),
                               torch.nn.functional.linear(x, w), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 4, 5, 8, 9, 16, 17, 31, 32, 33, 63, 64, 65, 100, 129])
def test_token_counts_around_block_widths(dtype, n):
    # whole blocks of 8 vectors, then a tail block of 1, 2, 4 or 8 vectors: every width and
    # both sides of each boundary, for float (8 lanes) and double (4 lanes)
    w, crow, col, val = _csr(37, 29, 0.3, dtype)
    x, b = torch.randn(n, 29, dtype=dtype), torch.randn(37, dtype=dtype)
    torch.testing.assert_close(effnlp_ext.sparse_linear(x, crow, col, val, 29, b),
                               torch.nn.functional.linear(x, w, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("inp", [193, 400, 768])
def test_column_stripes_unsorted_and_duplicate_columns(dtype, inp):
    # >= 4 whole token blocks, > 1 stripe of 192 input columns (the last one partial) and >= 8
    # nonzeros per (row, stripe): the striped loop. Columns within a row shuffled, some repeated
    # (CSR entries add up), a few rows empty; 300 tokens = whole blocks + a tail.
    g = torch.Generator().manual_seed(0)
    out = 45
    w = torch.randn(out, inp, dtype=dtype, generator=g) * (torch.rand(out, inp, generator=g) < 0.3)
    w[[3, 17, 44]] = 0
    cols, vals, crow = [], [], [0]
    for o in range(out):
        c = w[o].nonzero().flatten()
        v = w[o, c]
        if len(c) > 2:   # split two entries in halves: duplicates that must add up
            c = torch.cat([c, c[:2]])
            v = torch.cat([v[:2] / 2, v[2:], v[:2] / 2])
        perm = torch.randperm(len(c), generator=g)
        cols.append(c[perm])
        vals.append(v[perm])
        crow.append(crow[-1] + len(c))
    crow = torch.tensor(crow, dtype=torch.int32)
    col, val = torch.cat(cols).int(), torch.cat(vals)
    x, b = torch.randn(300, inp, dtype=dtype, generator=g), torch.randn(out, dtype=dtype, generator=g)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(effnlp_ext.sparse_linear(x, crow, col, val, inp, b),
                               torch.nn.functional.linear(x, w, b), **tol)
    torch.testing.assert_close(sparse_linear_ref(x, crow, col, val, inp, b),
                               torch.nn.functional.linear(x, w, b), **tol)


_ISA_SCRIPT = """
import sys, torch, effnlp_ext
torch.manual_seed(0)
outs = []
for n, inp, out, density in [(64, 193, 70, 0.3), (300, 768, 130, 0.1), (1000, 400, 96, 0.05), (17, 50, 33, 0.5)]:
    w = torch.randn(out, inp) * (torch.rand(out, inp) < density)
    c = w.to_sparse_csr()
    x, b = torch.randn(n + 1, inp)[1:], torch.randn(out)   # x starts off a 64-byte boundary
    outs.append((x, w, b, effnlp_ext.sparse_linear(x, c.crow_indices().int(), c.col_indices().int(),
                                                   c.values(), inp, b)))
torch.save(outs, sys.argv[1])
"""


def test_avx2_and_avx512_loops_agree(tmp_path):
    # The float loop is picked at run time: AVX-512 where the CPU has it, AVX2 when torch's own
    # ATEN_CPU_CAPABILITY caps the ISA (read once per process, so the capped run is a subprocess).
    # Both must equal the dense product; on a CPU without AVX-512 both runs take the AVX2 loop.
    res = {}
    for cap in ("", "avx2"):
        env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
        if cap:
            env["ATEN_CPU_CAPABILITY"] = cap
        path = tmp_path / f"y{cap or 'native'}.pt"
        subprocess.run([sys.executable, "-c", _ISA_SCRIPT, str(path)], env=env, check=True, timeout=300)
        res[cap] = torch.load(path)
    for (x, w, b, y), (_, _, _, y2) in zip(res[""], res["avx2"]):
        ref = torch.nn.functional.linear(x.double(), w.double(), b.double())
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(y2.double(), ref, rtol=1e-5, atol=1e-4)


def test_empty_rows_and_non_contiguous_x():
    w, crow, col, val = _csr(40, 30, 0.2, torch.float64)
    w[3:9] = 0
    c = w.to_sparse_csr()
    crow, col, val = c.crow_indices().int(), c.col_indices().int(), c.values().clone()
    x = torch.randn(30, 17, dtype=torch.float64).t()            # strided
    torch.testing.assert_close(effnlp_ext.sparse_linear(x, crow, col, val, 30), x @ w.t())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    w, crow, col, val = _csr(20, 16, 0.3)
    x = torch.randn(8, 16)
    y = effnlp_ext.sparse_linear(x.to(dtype), crow, col, val.to(dtype), 16)
    assert y.dtype == dtype
    ref64 = x.to(dtype).double() @ w.to(dtype).double().t()
    torch_err = ((x.to(dtype) @ w.to(dtype).t()).double() - ref64).abs().max()
    assert (y.double() - ref64).abs().max() <= 2 * torch_err + 1e-6


def test_opcheck_and_compile():
    w, crow, col, val = _csr(12, 9, 0.3)
    x, b = torch.randn(2, 5, 9), torch.randn(12)
    torch.library.opcheck(torch.ops.effnlp.sparse_linear, (x, crow, col, val, 9, b))
    torch.library.opcheck(torch.ops.effnlp.sparse_linear, (x, crow, col, val, 9, None))
    f = torch.compile(lambda x: torch.relu(effnlp_ext.sparse_linear(x, crow, col, val, 9, b)), fullgraph=True)
    torch.testing.assert_close(f(x), torch.relu(torch.nn.functional.linear(x, w, b)))


@pytest.mark.parametrize("change,match", [
    (lambda a: {**a, "crow": a["crow"].long()}, "crow_indices must be a 1-D int32"),
    (lambda a: {**a, "col": a["col"].long()}, "col_indices must be a 1-D int32"),
    (lambda a: {**a, "val": a["val"][:-1]}, "values must be 1-D"),
    (lambda a: {**a, "val": a["val"].double()}, "dtype"),
    (lambda a: {**a, "inp": 8}, "in_features"),
    (lambda a: {**a, "bias": torch.randn(3)}, "bias"),
    (lambda a: {**a, "col": torch.full_like(a["col"], 9)}, "out of range"),
    (lambda a: {**a, "crow": a["crow"].flip(0)}, "crow_indices must start at 0"),
    (lambda a: {**a, "x": torch.randint(0, 2, (4, 9))}, "floating"),
])
def test_bad_input_raises(change, match):
    _, crow, col, val = _csr(6, 9, 0.5)
    a = change(dict(x=torch.randn(4, 9), crow=crow, col=col, val=val, inp=9, bias=None))
    with pytest.raises(RuntimeError, match=match):
        effnlp_ext.sparse_linear(a["x"], a["crow"], a["col"], a["val"], a["inp"], a["bias"])


def test_non_monotone_crow_rejected():
    x = torch.randn(2, 3)
    crow = torch.tensor([0, 2, 1, 2], dtype=torch.int32)
    col = torch.tensor([0, 1], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="sparse_linear: crow_indices must be non-decreasing"):
        effnlp_ext.sparse_linear(x, crow, col, torch.randn(2), 3)


@settings(max_examples=40, deadline=None)
@given(out=st.integers(0, 40), inp=st.integers(0, 40), n=st.integers(0, 80),
       density=st.floats(0, 1), bias=st.booleans())
def test_property_matches_dense(out, inp, n, density, bias):
    w, crow, col, val = _csr(out, inp, density, torch.float64)
    x = torch.randn(n, inp, dtype=torch.float64)
    b = torch.randn(out, dtype=torch.float64) if bias else None
    torch.testing.assert_close(effnlp_ext.sparse_linear(x, crow, col, val, inp, b),
                               torch.nn.functional.linear(x, w, b))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cuda_matches_dense(dtype):
    w, crow, col, val = _csr(300, 200, 0.1, dtype, "cuda")
    x = torch.randn(3, 70, 200, dtype=dtype, device="cuda")
    b = torch.randn(300, dtype=dtype, device="cuda")
    y = effnlp_ext.sparse_linear(x, crow, col, val, 200, b)
    tol = dict(rtol=5e-2, atol=5e-2) if dtype in (torch.float16, torch.bfloat16) else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y.double(), torch.nn.functional.linear(x.double(), w.double(), b.double()), **tol)
