"""kron_linear against what a user would otherwise run, on KroneckerBERT layer shapes.

Contenders, timed in the same process: dense ``nn.Linear`` of the same in/out features, the
best factored composition in torch ops (eager and ``torch.compile``), materialise-then-matmul
(PEFT LoKr style) and ``kron_linear``. Used by bench/bench_kron.py and ``effnlp demo``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._ops import kron_linear
from ..benchmarking import interleaved_median_times, machine_ceiling
from ..reference import kron_linear_einsum, kron_weight

# name: (R, m1, n1, m2, n2); out = m1*m2, in = n1*n2. "KB8" are the KroneckerBERT-8 factor
# shapes of the paper (BERT-base); 384->1536 is the MiniLM FFN with the same recipe.
CASES = {
    "768->3072 KB8 A8x2 B384x384": (1, 8, 2, 384, 384),
    "3072->768 KB8 A2x8 B384x384": (1, 2, 8, 384, 384),
    "768->768 KB8 A384x384 B2x2": (1, 384, 384, 2, 2),
    "384->1536 A8x2 B192x192": (1, 8, 2, 192, 192),
    "768->3072 balanced A64x32 B48x24": (1, 64, 32, 48, 24),
    "768->768 balanced A32x32 B24x24": (1, 32, 32, 24, 24),
}
QUICK_CASES = ["768->3072 KB8 A8x2 B384x384", "3072->768 KB8 A2x8 B384x384",
               "768->768 KB8 A384x384 B2x2"]
OURS, DENSE = "kron_linear (ours)", "dense nn.Linear"
EAGER, COMPILED, LOKR = "torch composition (eager)", "torch composition (compiled)", "materialise W (LoKr)"

_compiled = None


def _compiled_composition():
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(kron_linear_einsum, dynamic=False)
    return _compiled


def _lokr(x, A, B, bias):
    return F.linear(x, kron_weight(A, B), bias)


def flops(shape, n_tokens: int, contender: str, mode: str) -> int:
    """FLOPs (multiply and add counted separately) each contender must do; bwd = 2x fwd."""
    R, m1, n1, m2, n2 = shape
    if contender in (DENSE, LOKR):
        fwd = 2 * n_tokens * m1 * m2 * n1 * n2
    else:
        fwd = 2 * n_tokens * R * min(n1 * n2 * m2 + m1 * n1 * m2, m1 * n1 * n2 + m1 * n2 * m2)
    return fwd if mode == "fwd" else 3 * fwd


def run_case(case: str, n_tokens: int, mode: str, *, quick: bool = False) -> list[dict]:
    """Times every contender on one layer shape; returns one row per contender."""
    R, m1, n1, m2, n2 = shape = CASES[case]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_tokens, n1 * n2, generator=g)
    A = torch.randn(R, m1, n1, generator=g) / n1 ** 0.5
    B = torch.randn(R, m2, n2, generator=g) / n2 ** 0.5
    bias = torch.zeros(m1 * m2)
    lin = torch.nn.Linear(n1 * n2, m1 * m2)
    fns = {DENSE: lambda x, A, B, b: lin(x), OURS: kron_linear, EAGER: kron_linear_einsum,
           COMPILED: _compiled_composition(), LOKR: _lokr}
    runs = {}
    for name, fn in fns.items():
        if mode == "fwd":
            def run(fn=fn):
                with torch.no_grad():
                    fn(x, A, B, bias)
        else:
            xs, As, Bs, bs = (t.clone().requires_grad_() for t in (x, A, B, bias))
            params = [xs] + (list(lin.parameters()) if name == DENSE else [As, Bs, bs])

            def run(fn=fn, xs=xs, As=As, Bs=Bs, bs=bs, params=params):
                out = fn(xs, As, Bs, bs)
                torch.autograd.grad(out, params, torch.ones_like(out))
        runs[name] = run
    times = interleaved_median_times(runs, min_rounds=3 if quick else 7,
                                     min_time=0.5 if quick else 1.5)
    ceiling = machine_ceiling()["mm2048_gflops"]
    best_comp = min(times[EAGER], times[COMPILED])
    rows = []
    for name, t in times.items():
        gf = flops(shape, n_tokens, name, mode) / t / 1e9
        rows.append(dict(case=case, tokens=n_tokens, mode=mode, contender=name, ms=t * 1e3,
                         gflops=gf, pct_of_mm=100 * gf / ceiling,
                         params=R * (m1 * n1 + m2 * n2), dense_params=m1 * m2 * n1 * n2,
                         speedup_vs_dense=times[DENSE] / t if name == OURS else None,
                         speedup_vs_best_composition=best_comp / t if name == OURS else None))
    return rows


def render_table(meta: dict, rows: list[dict]) -> str:
    """The README's markdown table: one line per (layer, tokens, mode)."""
    out = [f"CPU fp32, torch {meta['torch']}, {meta['threads']} threads, ISA {meta['isa']}; "
           f"machine ceiling (2048³ fp32 torch.mm, same run): {meta['mm2048_gflops']:.0f} GFLOP/s; "
           f"{meta['date']}.", "",
           "| layer (CF) | tokens | mode | dense ms | composition eager / compiled ms | LoKr ms "
           "| **ours ms** | vs dense | vs best composition | ours GFLOP/s (% of mm) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    keys = list(dict.fromkeys((r["case"], r["tokens"], r["mode"]) for r in rows))
    for k in keys:
        by = {r["contender"]: r for r in rows if (r["case"], r["tokens"], r["mode"]) == k}
        ours = by[OURS]
        cf = ours["dense_params"] / ours["params"]
        out.append(
            f"| {k[0]} ({cf:.1f}) | {k[1]} | {k[2]} | {by[DENSE]['ms']:.2f} | "
            f"{by[EAGER]['ms']:.2f} / {by[COMPILED]['ms']:.2f} | {by[LOKR]['ms']:.2f} | "
            f"**{ours['ms']:.2f}** | {ours['speedup_vs_dense']:.2f}× | "
            f"{ours['speedup_vs_best_composition']:.2f}× | {ours['gflops']:.0f} ({ours['pct_of_mm']:.0f}%) |")
    return "\n".join(out)
