"""Evaluation helpers every method's recipe shares: task metrics over a loader, CPU latency."""
from __future__ import annotations

import torch

from ..benchmarking import median_time
from ..data import compute_metrics, get_task


def evaluate(model, loader, task: str) -> dict:
    """The task's metrics (``compute_metrics``) of ``model`` over ``loader``, in eval mode."""
    model.eval()
    logits, labels = [], []
    with torch.no_grad():
        for batch in loader:
            batch = dict(batch)
            labels.append(batch.pop("labels"))
            logits.append(model(**batch).logits)
    return compute_metrics(task, torch.cat(logits), torch.cat(labels))


def main_metric(model, loader, task: str) -> float:
    """The task's headline metric (its first: accuracy, Pearson for STS-B, MCC for CoLA)."""
    return evaluate(model, loader, task)[get_task(task).metrics[0]]


def latency_ms(model, features, collator, batch_size: int) -> float:
    """Median CPU latency (ms) of one forward over the first ``batch_size`` features."""
    model.eval()
    batch = collator(features[:batch_size])
    batch.pop("labels", None)
    with torch.no_grad():
        return median_time(lambda: model(**batch), min_rounds=5, min_time=1.0) * 1e3
