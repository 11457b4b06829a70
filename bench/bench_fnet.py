"""fourier_mix vs HF FNet's fftn (eager, compiled), the rfftn composition, HF's DFT einsum and
BERT self-attention (SDPA), CPU fp32; the kernel's GEMM/FFT crossover; MiniLM vs MiniLM-FNet.
`make bench` writes bench/results/fnet.json; `python bench/render_fnet.py` prints the tables."""
from __future__ import annotations

import pytest
import torch

from effnlp_ext.fnet.benchmark import OURS, SHAPES, crossover, model_latency, run_case

from conftest import QUICK, record

CASES = SHAPES[:2] if QUICK else SHAPES


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", CASES, ids=lambda s: "x".join(map(str, s)))
def test_fourier_mix(benchmark, shape, mode):
    rows = benchmark.pedantic(run_case, args=(shape, mode), kwargs={"quick": QUICK}, rounds=1,
                              iterations=1)
    record("fnet", rows)
    benchmark.extra_info.update({r["contender"]: r["ms"] for r in rows})
    benchmark.extra_info["threads"] = torch.get_num_threads()
    assert next(r for r in rows if r["contender"] == OURS)["ms"] > 0


def test_gemm_fft_crossover(benchmark):
    rows = benchmark.pedantic(crossover, rounds=1, iterations=1)
    record("fnet_crossover", rows)


def test_model_latency(benchmark):
    rows = benchmark.pedantic(model_latency, kwargs={"quick": QUICK}, rounds=1, iterations=1)
    record("fnet_models", rows)
