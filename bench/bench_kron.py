"""kron_linear vs dense nn.Linear, the best torch composition (eager and compiled) and
materialise-then-matmul (LoKr), CPU fp32. `make bench` (or `make bench-quick`) writes
bench/results/kron.json; `python bench/render_kron.py` prints the README table."""
from __future__ import annotations

import pytest
import torch

from effnlp_ext.kronecker.benchmark import CASES, OURS, QUICK_CASES, run_case

from conftest import QUICK, record

TOKENS = [4096] if QUICK else [512, 4096]


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("n_tokens", TOKENS)
@pytest.mark.parametrize("case", QUICK_CASES if QUICK else list(CASES))
def test_kron_linear(benchmark, case, n_tokens, mode):
    rows = benchmark.pedantic(run_case, args=(case, n_tokens, mode), kwargs={"quick": QUICK},
                              rounds=1, iterations=1)
    record("kron", rows)
    benchmark.extra_info.update({r["contender"]: r["ms"] for r in rows})
    benchmark.extra_info["threads"] = torch.get_num_threads()
    ours = next(r for r in rows if r["contender"] == OURS)
    assert ours["ms"] > 0
