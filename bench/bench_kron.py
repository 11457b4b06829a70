"""kron_linear vs dense nn.Linear, the best torch composition (eager and compiled) and
materialise-then-matmul (PEFT LoKr style). CPU fp32, the session's threads (2 here).

Run: `make bench` (full) or `make bench-quick`; results in bench/results/kron.json and the
table in README (python bench/render_kron.py).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import effnlp_ext
from effnlp_ext.reference import kron_linear_einsum, kron_weight

from conftest import QUICK, machine_ceiling, median_time, record

# name: (R, m1, n1, m2, n2); out = m1*m2, in = n1*n2
CASES = {
    "768->3072 KB8 A8x2 B384x384": (1, 8, 2, 384, 384),
    "3072->768 KB8 A2x8 B384x384": (1, 2, 8, 384, 384),
    "768->768 KB8 A384x384 B2x2": (1, 384, 384, 2, 2),
    "384->1536 A8x2 B192x192": (1, 8, 2, 192, 192),
    "768->3072 balanced A64x32 B48x24": (1, 64, 32, 48, 24),
    "768->768 balanced A32x32 B24x24": (1, 32, 32, 24, 24),
}
TOKENS = [4096] if QUICK else [512, 4096]
if QUICK:
    CASES = {k: v for k, v in CASES.items() if "KB8" in k}

_compiled = torch.compile(kron_linear_einsum, dynamic=False)


def lokr(x, A, B, bias):
    return F.linear(x, kron_weight(A, B), bias)


def contenders(lin):
    return {
        "dense nn.Linear": lambda x, A, B, b: lin(x),
        "kron_linear (ours)": effnlp_ext.kron_linear,
        "torch composition (eager)": kron_linear_einsum,
        "torch composition (compiled)": _compiled,
        "materialise W (LoKr)": lokr,
    }


def flops(shape, n_tokens, contender, mode):
    R, m1, n1, m2, n2 = shape
    if contender.startswith("dense") or contender.startswith("materialise"):
        fwd = 2 * n_tokens * m1 * m2 * n1 * n2
    else:
        fwd = 2 * n_tokens * R * min(n1 * n2 * m2 + m1 * n1 * m2, m1 * n1 * n2 + m1 * n2 * m2)
    return fwd if mode == "fwd" else 3 * fwd


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("n_tokens", TOKENS)
@pytest.mark.parametrize("case", list(CASES))
def test_kron_linear(benchmark, case, n_tokens, mode):
    R, m1, n1, m2, n2 = shape = CASES[case]
    torch.manual_seed(0)
    x = torch.randn(n_tokens, n1 * n2)
    A = torch.randn(R, m1, n1) / n1 ** 0.5
    B = torch.randn(R, m2, n2) / n2 ** 0.5
    bias = torch.zeros(m1 * m2)
    lin = torch.nn.Linear(n1 * n2, m1 * m2)
    ceiling = machine_ceiling()["mm2048_gflops"]
    times = {}
    for name, fn in contenders(lin).items():
        if mode == "fwd":
            def run(fn=fn):
                with torch.no_grad():
                    fn(x, A, B, bias)
        else:
            xs, As, Bs, bs = (t.clone().requires_grad_() for t in (x, A, B, bias))
            params = [xs] + (list(lin.parameters()) if name.startswith("dense") else [As, Bs, bs])
            def run(fn=fn, xs=xs, As=As, Bs=Bs, bs=bs, params=params):
                out = fn(xs, As, Bs, bs)
                torch.autograd.grad(out, params, torch.ones_like(out))
        times[name] = median_time(run, min_rounds=3 if QUICK else 5, min_time=0.3 if QUICK else 1.0)
    benchmark.pedantic(lambda: None, rounds=1)
    best_comp = min(times["torch composition (eager)"], times["torch composition (compiled)"])
    ours = times["kron_linear (ours)"]
    for name, t in times.items():
        gf = flops(shape, n_tokens, name, mode) / t / 1e9
        record("kron", case=case, tokens=n_tokens, mode=mode, contender=name, ms=t * 1e3,
               gflops=gf, pct_of_mm=100 * gf / ceiling,
               params=R * (m1 * n1 + m2 * n2), dense_params=m1 * m2 * n1 * n2,
               speedup_vs_dense=times["dense nn.Linear"] / ours if name.startswith("kron") else None,
               speedup_vs_best_composition=best_comp / ours if name.startswith("kron") else None)
    benchmark.extra_info.update({k: v * 1e3 for k, v in times.items()})
    benchmark.extra_info.update(threads=torch.get_num_threads(), mm2048_gflops=ceiling)
