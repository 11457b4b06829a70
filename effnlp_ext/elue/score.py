"""ELUE score, Pareto frontier and the performance-vs-FLOPs plot.

ELUE (Liu et al., 2022) scores a model by how far it sits above the ElasticBERT baseline
curve at its own cost:

    score = mean_i [ Perf_i - Perf_EB(FLOPs_i) ]

over the tasks i (or the points of one model's curve), with Perf in points (accuracy x 100).
``Perf_EB`` is the baseline's (FLOPs, perf) curve interpolated **piecewise-linearly in
log10(FLOPs)**: compressed models span several orders of magnitude of FLOPs (a DAN student
costs ~1e5 FLOPs per sample, a 6-layer BERT ~1e9), where accuracy is close to linear in
log-compute and a linear-in-FLOPs interpolation would make everything below the cheapest
baseline point look alike. Outside the baseline's FLOPs range the curve is held at its end
value (no extrapolation: a model cheaper than any baseline exit is compared with the cheapest
exit, and the FLOPs ratio is reported beside the score).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Point:
    name: str
    flops: float          # per sample
    perf: float           # points (e.g. accuracy x 100)
    params: int | None = None
    group: str | None = None   # method, for colours in the plot


def baseline_curve(points: Sequence[tuple[float, float]]):
    """``f(flops) -> perf`` interpolating ``points`` (flops, perf) linearly in log10(FLOPs),
    held constant outside their range. Duplicate FLOPs keep the best perf."""
    best: dict[float, float] = {}
    for f, p in points:
        if f <= 0:
            raise ValueError(f"baseline FLOPs must be positive, got {f}")
        best[f] = max(p, best.get(f, -math.inf))
    xs = sorted(best)
    if not xs:
        raise ValueError("the baseline curve needs at least one point")
    lx = [math.log10(x) for x in xs]
    ys = [best[x] for x in xs]

    def f(flops: float) -> float:
        if flops <= 0:
            raise ValueError(f"FLOPs must be positive, got {flops}")
        t = math.log10(flops)
        if t <= lx[0]:
            return ys[0]
        if t >= lx[-1]:
            return ys[-1]
        for i in range(1, len(lx)):
            if t <= lx[i]:
                w = (t - lx[i - 1]) / (lx[i] - lx[i - 1])
                return ys[i - 1] + w * (ys[i] - ys[i - 1])
        return ys[-1]
    return f


def elue_score(points: Sequence[Point], baseline: Sequence[tuple[float, float]]) -> float:
    """Mean of ``perf - Perf_EB(flops)`` over ``points``."""
    if not points:
        raise ValueError("elue_score needs at least one point")
    curve = baseline_curve(baseline)
    return sum(p.perf - curve(p.flops) for p in points) / len(points)


def pareto_frontier(points: Sequence[Point]) -> list[Point]:
    """The points no other point dominates (no more FLOPs and no less perf, one strictly),
    sorted by FLOPs."""
    front = []
    for p in points:
        dominated = any((q.flops <= p.flops and q.perf >= p.perf) and
                        (q.flops < p.flops or q.perf > p.perf) for q in points)
        if not dominated:
            front.append(p)
    return sorted(front, key=lambda p: (p.flops, -p.perf))


def plot(points: Sequence[Point], path, *, baseline: Sequence[tuple[float, float]] | None = None,
         title: str = "", ylabel: str = "accuracy (%)") -> str:
    """Performance vs FLOPs (log x), one colour per group, the Pareto frontier highlighted and
    the baseline curve dashed; written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    groups: dict[str, list[Point]] = {}
    for p in points:
        groups.setdefault(p.group or p.name, []).append(p)
    for g, ps in groups.items():
        ps = sorted(ps, key=lambda p: p.flops)
        ax.plot([p.flops for p in ps], [p.perf for p in ps], marker="o",
                linestyle="-" if len(ps) > 1 else "", label=g)
        # a curve is named by the legend; only its cheapest and dearest points get labels
        for p in (ps if len(ps) == 1 else [ps[0], ps[-1]]):
            ax.annotate(p.name, (p.flops, p.perf), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    front = pareto_frontier(points)
    ax.plot([p.flops for p in front], [p.perf for p in front], color="black", linewidth=2,
            alpha=0.35, label="Pareto frontier", zorder=0)
    if baseline:
        xs = sorted(f for f, _ in baseline)
        curve = baseline_curve(baseline)
        ax.plot(xs, [curve(x) for x in xs], linestyle="--", color="gray", label="baseline (EB)")
    ax.set_xscale("log")
    ax.set_xlabel("FLOPs per sample (multiply and add counted apart)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
