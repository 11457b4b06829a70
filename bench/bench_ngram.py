"""ngram_bag forward and forward+backward vs the torch composition, Python hashing and the
EmbeddingBag gather floor, CPU fp32, in one run. `make bench` writes bench/results/ngram.json;
`python bench/render_ngram.py` prints the README table."""
from __future__ import annotations

import pytest
import torch

from effnlp_ext.dan.benchmark import CASES, QUICK_CASES, run_case

from conftest import QUICK, record


@pytest.mark.parametrize("case", QUICK_CASES if QUICK else CASES, ids=str)
def test_ngram_bag(benchmark, case):
    rows = benchmark.pedantic(run_case, args=case, kwargs={"quick": QUICK}, rounds=1, iterations=1)
    record("ngram", rows)
    benchmark.extra_info.update({f"{r['bench']}: {r['contender']}": r["ms"] for r in rows})
    benchmark.extra_info["threads"] = torch.get_num_threads()
    assert all(r["ms"] > 0 for r in rows)
