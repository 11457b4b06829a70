"""Task metrics in plain numpy: accuracy, F1, Pearson, Spearman, Matthews correlation.

Written out here rather than taken from sklearn/scipy so that the library has no such
dependency; the definitions follow the GLUE conventions (binary F1 on the positive class 1,
Spearman as the Pearson correlation of average ranks, MCC of 0 when it is undefined).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .tasks import get_task


def _as_array(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _check(preds, labels) -> tuple[np.ndarray, np.ndarray]:
    p, y = _as_array(preds).reshape(-1), _as_array(labels).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"preds and labels differ in size: {p.size} vs {y.size}")
    if p.size == 0:
        raise ValueError("metrics need at least one prediction")
    return p, y


def accuracy(preds, labels) -> float:
    """Fraction of predictions equal to the label."""
    p, y = _check(preds, labels)
    return float(np.mean(p == y))


def _f1_for(p: np.ndarray, y: np.ndarray, positive) -> float:
    tp = np.sum((p == positive) & (y == positive))
    fp = np.sum((p == positive) & (y != positive))
    fn = np.sum((p != positive) & (y == positive))
    denom = 2 * tp + fp + fn
    return float(2 * tp / denom) if denom else 0.0


def f1_binary(preds, labels, positive: int = 1) -> float:
    """F1 of the ``positive`` class; 0 when that class is neither predicted nor present."""
    p, y = _check(preds, labels)
    return _f1_for(p, y, positive)


def f1_macro(preds, labels) -> float:
    """Unweighted mean of per-class F1 over the classes present in labels or predictions."""
    p, y = _check(preds, labels)
    return float(np.mean([_f1_for(p, y, c) for c in np.union1d(p, y)]))


def pearson(preds, labels) -> float:
    """Pearson correlation; 0 when either side is constant (the correlation is undefined)."""
    p, y = _check(preds, labels)
    p, y = p.astype(np.float64), y.astype(np.float64)
    dp, dy = p - p.mean(), y - y.mean()
    denom = np.sqrt(np.sum(dp * dp) * np.sum(dy * dy))
    return float(np.sum(dp * dy) / denom) if denom > 0 else 0.0


def average_ranks(x) -> np.ndarray:
    """1-based ranks where tied values share the mean of the ranks they span."""
    x = _as_array(x).reshape(-1)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], x.size]
    ranks = np.empty(x.size, dtype=np.float64)
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + 1 + e) / 2.0
    return ranks


def spearman(preds, labels) -> float:
    """Spearman correlation: Pearson correlation of the average ranks (handles ties)."""
    p, y = _check(preds, labels)
    return pearson(average_ranks(p), average_ranks(y))


def matthews_corrcoef(preds, labels) -> float:
    """Matthews correlation (multi-class form); 0 when all predictions or labels are one class."""
    p, y = _check(preds, labels)
    classes = np.union1d(p, y)
    index = {c: i for i, c in enumerate(classes.tolist())}
    conf = np.zeros((len(classes), len(classes)), dtype=np.float64)
    for yi, pi in zip(y.tolist(), p.tolist()):
        conf[index[yi], index[pi]] += 1
    n = conf.sum()
    correct = np.trace(conf)
    t, q = conf.sum(axis=1), conf.sum(axis=0)
    cov = correct * n - t @ q
    denom = np.sqrt((n * n - q @ q) * (n * n - t @ t))
    return float(cov / denom) if denom > 0 else 0.0


METRICS: dict[str, Callable[..., float]] = {
    "accuracy": accuracy,
    "f1": f1_binary,
    "f1_macro": f1_macro,
    "pearson": pearson,
    "spearman": spearman,
    "mcc": matthews_corrcoef,
}


def compute_metrics(task_name: str, preds, labels) -> dict[str, float]:
    """The task's metrics as ``{name: value}``.

    ``preds`` may be class ids, logits of shape (N, num_labels) for classification (argmax
    is taken), or scores of shape (N,) or (N, 1) for regression.
    """
    task = get_task(task_name)
    p = _as_array(preds)
    if task.is_regression:
        p = p.reshape(len(p), -1)[:, 0] if p.ndim > 1 else p
    elif p.ndim == 2:
        p = p.argmax(axis=-1)
    return {name: METRICS[name](p, labels) for name in task.metrics}
