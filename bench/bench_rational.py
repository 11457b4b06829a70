"""rational fwd+bwd and forward vs the torch Horner composition (eager, compiled) and the
rational_activations package, CPU fp32, in one run. `make bench` writes
bench/results/rational.json; `python bench/render_rational.py` prints the README tables."""
from __future__ import annotations

import pytest
import torch

from effnlp_ext.adapters.benchmark import CASES, QUICK_CASES, run_case

from conftest import QUICK, record


@pytest.mark.parametrize("case", QUICK_CASES if QUICK else CASES, ids=str)
def test_rational(benchmark, case):
    rows = benchmark.pedantic(run_case, args=case, kwargs={"quick": QUICK}, rounds=1, iterations=1)
    record("rational", rows)
    benchmark.extra_info.update({f"{r['bench']} {r['contender']}": r["ms"] for r in rows if "ms" in r})
    benchmark.extra_info["threads"] = torch.get_num_threads()
    assert all(r["ms"] > 0 for r in rows if "ms" in r)
