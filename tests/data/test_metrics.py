"""Metrics against hand-computed values, edge cases, and scipy where it is installed."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from effnlp_ext.data import (accuracy, average_ranks, compute_metrics, f1_binary, f1_macro,
                             matthews_corrcoef, pearson, spearman)

P = [1, 0, 1, 1, 0, 1]
Y = [1, 0, 0, 1, 1, 1]   # tp=3 fp=1 fn=1 tn=1


def test_accuracy_and_binary_f1():
    assert accuracy(P, Y) == pytest.approx(4 / 6)
    assert f1_binary(P, Y) == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    assert f1_binary([0, 0], [0, 0]) == 0.0


def test_macro_f1():
    # class 1: 6/8; class 0: tp=1 fp=1 fn=1 -> 2/4
    assert f1_macro(P, Y) == pytest.approx((0.75 + 0.5) / 2)
    assert f1_macro([0, 1, 2], [0, 1, 2]) == 1.0


def test_mcc_hand_computed_and_degenerate():
    expected = (3 * 1 - 1 * 1) / math.sqrt((3 + 1) * (3 + 1) * (1 + 1) * (1 + 1))
    assert matthews_corrcoef(P, Y) == pytest.approx(expected)
    assert matthews_corrcoef([1, 1, 1, 1], [0, 1, 0, 1]) == 0.0
    assert matthews_corrcoef([0, 1, 0, 1], [1, 1, 1, 1]) == 0.0
    assert matthews_corrcoef([0, 1, 1], [0, 1, 1]) == pytest.approx(1.0)
    assert matthews_corrcoef([1, 0], [0, 1]) == pytest.approx(-1.0)


def test_pearson_hand_computed():
    # means 2 and 4: dx = [-1, 0, 1], dy = [-2, -1, 3]; sum dx*dy = 5, sum dx^2 = 2, sum dy^2 = 14
    assert pearson([1, 2, 3], [2, 3, 7]) == pytest.approx(5 / math.sqrt(2 * 14))
    assert pearson([1, 1, 1], [1, 2, 3]) == 0.0


def test_average_ranks_and_spearman_with_ties():
    assert average_ranks([10, 20, 20, 5, 20]).tolist() == [2.0, 4.0, 4.0, 1.0, 4.0]
    # ranks x = [1, 2.5, 2.5, 4], y = [1, 2, 3, 4]
    # dx = [-1.5, 0, 0, 1.5], dy = [-1.5, -0.5, 0.5, 1.5]
    expected = 4.5 / math.sqrt(4.5 * 5.0)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(expected)
    assert spearman([1, 4, 9, 16], [0.1, 0.2, 0.3, 0.4]) == pytest.approx(1.0)


def test_against_scipy_when_installed():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 5, 200).astype(float), rng.integers(0, 5, 200).astype(float)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic)
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y).statistic)


def test_size_mismatch_and_empty():
    with pytest.raises(ValueError, match="differ in size"):
        accuracy([1, 0], [1])
    with pytest.raises(ValueError, match="at least one"):
        accuracy([], [])


def test_compute_metrics_per_task():
    logits = torch.tensor([[2.0, -1.0], [0.1, 0.3], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 0])
    assert compute_metrics("MRPC", logits, labels) == pytest.approx(
        {"accuracy": 2 / 3, "f1": 2 / 3})
    assert set(compute_metrics("cola", [1, 0], [1, 0])) == {"mcc"}
    scores = compute_metrics("stsb", torch.tensor([[0.5], [1.5], [3.0]]), [1.0, 2.0, 3.5])
    assert scores == pytest.approx({"pearson": 1.0, "spearman": 1.0})
    assert compute_metrics("snli", [0, 1, 2], [0, 1, 1]) == pytest.approx({"accuracy": 2 / 3})
