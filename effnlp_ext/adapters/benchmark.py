"""Benchmark of the ``rational`` op against the torch compositions and the rational_activations
package, in one run (CPU fp32, forward+backward with x and the coefficients trainable, and
forward alone).

Contenders:
* ``rational`` (ours): one pass forward, one pass backward (dx and the coefficient sums).
* torch composition (eager / torch.compile): ``reference.rational_ref``, Horner in torch ops.
* rational_activations (PyPI ``rational-activations``), its torch path on CPU: version "B" is
  the same function as ours; version "A" (the package's default, ``1 + sum |b_k x^k|``) is a
  different denominator, timed for reference (full mode only). It is imported when installed
  (its CUDA extension is not needed on CPU); otherwise the rows say why it is missing. The
  package has no channel groups, so it runs only in the one-group cases.
Memory-bound figures: the op's minimal traffic (forward: read x, write y; backward: read x and
dL/dy, write dL/dx) over the time, beside the machine's copy bandwidth measured in the same run.
Used by bench/bench_rational.py.
"""
from __future__ import annotations

import torch

from .._ops import rational
from ..benchmarking import interleaved_median_times, machine_copy_bandwidth
from ..reference import rational_ref

# (tokens, channels, groups): BERT-base FFN activations (the 3x bar is the first), the same
# with 8 groups, an adapter bottleneck (768 / 16 channels, 32 x 512 tokens), a short batch.
CASES = [(4096, 3072, 1), (4096, 3072, 8), (16384, 48, 1), (512, 768, 1)]
QUICK_CASES = [(4096, 3072, 1), (16384, 48, 1)]
OURS = "rational (ours)"
EAGER = "torch composition (eager)"
COMPILED = "torch composition (compiled)"
PEER_B = "rational_activations B (same function)"
PEER_A = "rational_activations A (package default, |b_k x^k| terms)"


def load_peer():
    """``(Rational class, None)`` or ``(None, why it is unavailable)``."""
    try:
        from rational.torch import Rational  # PyPI: rational-activations
    except Exception as e:  # noqa: BLE001 -- any import failure is reported, not raised
        return None, f"rational-activations not importable: {type(e).__name__}: {e}"
    return Rational, None


def _peer_module(Rational, version: str, a: torch.Tensor, b: torch.Tensor):
    r = Rational("relu", degrees=(a.numel() - 1, b.numel()), cuda=False, version=version)
    with torch.no_grad():
        r.numerator.copy_(a)
        r.denominator.copy_(b)
    return r


def run_case(tokens: int, channels: int, groups: int = 1, *, degrees=(5, 4), compiled: bool = True,
             peer: bool = True, quick: bool = False) -> list[dict]:
    from .fits import rational_init

    n = tokens * channels
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(tokens, channels, generator=g) * 2).requires_grad_()
    a0, b0 = rational_init("gelu", degrees)
    a = a0.float().repeat(groups, 1).requires_grad_()
    b = b0.float().repeat(groups, 1).requires_grad_()
    gy = torch.randn(tokens, channels, generator=g)

    fns_train, fns_fwd = {}, {}

    def train_step(f, params):
        def run():
            for p in params:
                p.grad = None
            f().backward(gy)
        return run

    def fwd(f):
        def run():
            with torch.no_grad():
                f()
        return run

    fns_train[OURS] = train_step(lambda: rational(x, a, b), (x, a, b))
    fns_fwd[OURS] = fwd(lambda: rational(x, a, b))
    fns_train[EAGER] = train_step(lambda: rational_ref(x, a, b), (x, a, b))
    fns_fwd[EAGER] = fwd(lambda: rational_ref(x, a, b))
    if compiled:
        ref_c = torch.compile(rational_ref, fullgraph=True)
        fns_train[COMPILED] = train_step(lambda: ref_c(x, a, b), (x, a, b))
        fns_fwd[COMPILED] = fwd(lambda: ref_c(x, a, b))
    # The package's torch path stacks every power of x (~7 s per fwd+bwd at 4096x3072 here):
    # quick mode times it on the small cases only.
    peer = peer and groups == 1 and not (quick and n > 1 << 20)
    Rational, why = load_peer() if peer else (None, None)
    if Rational is not None:
        for name, version in ((PEER_B, "B"), (PEER_A, "A")):
            if quick and version == "A":
                continue
            r = _peer_module(Rational, version, a.detach()[0], b.detach()[0])
            if version == "B":  # same function: check it before timing it
                torch.testing.assert_close(r(x.detach()), rational(x.detach(), a.detach(), b.detach()),
                                           rtol=1e-4, atol=1e-4)
            fns_train[name] = train_step(lambda r=r: r(x), (x, r.numerator, r.denominator))
            fns_fwd[name] = fwd(lambda r=r: r(x))

    rounds = dict(min_rounds=3 if quick else 5, min_time=0.5 if quick else 1.5)
    t_train = interleaved_median_times(fns_train, **rounds)
    t_fwd = interleaved_median_times(fns_fwd, **rounds)
    copy_gbps = machine_copy_bandwidth()
    traffic = {"fwd+bwd": 5 * n * 4, "fwd": 2 * n * 4}
    rows = []
    for bench, times in (("fwd+bwd", t_train), ("fwd", t_fwd)):
        base = times[EAGER]
        for name, t in times.items():
            gbps = traffic[bench] / t / 1e9
            rows.append({"bench": f"rational {bench}", "tokens": tokens, "channels": channels,
                         "groups": groups, "degrees": list(degrees), "contender": name,
                         "ms": t * 1e3, "speedup_vs_eager": base / t, "gbps": gbps,
                         "copy_gbps": copy_gbps, "fraction_of_copy": gbps / copy_gbps})
    if why:
        rows.append({"bench": "rational fwd+bwd", "tokens": tokens, "channels": channels,
                     "groups": groups, "contender": "rational_activations", "unavailable": why})
    return rows


def render(meta: dict, rows: list[dict]) -> str:
    out = [f"torch {meta.get('torch')}, {meta.get('threads')} threads, {meta.get('isa')}; "
           f"copy {meta.get('copy_gbps', 0):.1f} GB/s (large fp32 copy, same run). GB/s counts the "
           f"op's minimal traffic (fwd: x, y; bwd: x, dL/dy, dL/dx), 4 bytes each."]
    missing = {r["unavailable"] for r in rows if "unavailable" in r}
    for bench in ("rational fwd+bwd", "rational fwd"):
        sel = [r for r in rows if r["bench"] == bench and "ms" in r]
        if not sel:
            continue
        out += ["", f"{bench}, fp32, degrees 5/4:", "",
                "| tokens×channels | groups | contender | ms | speedup vs eager | GB/s | of copy |",
                "|---|---|---|---|---|---|---|"]
        for r in sel:
            out.append(f"| {r['tokens']}×{r['channels']} | {r['groups']} | {r['contender']} | "
                       f"{r['ms']:.2f} | {r['speedup_vs_eager']:.2f}× | {r['gbps']:.2f} | "
                       f"{r['fraction_of_copy']:.0%} |")
    for why in sorted(missing):
        out += ["", f"rational_activations: {why}"]
    return "\n".join(out)
