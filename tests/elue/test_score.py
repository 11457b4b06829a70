"""ELUE score (log-FLOPs interpolation, clamped ends), Pareto frontier, plot."""
from __future__ import annotations

import pytest

from effnlp_ext.elue.score import Point, baseline_curve, elue_score, pareto_frontier, plot

BASE = [(1e6, 80.0), (1e8, 90.0), (1e7, 85.0)]


def test_curve_interpolates_in_log_flops_and_clamps():
    f = baseline_curve(BASE)
    assert f(1e6) == 80.0 and f(1e7) == 85.0 and f(1e8) == 90.0
    assert f(10 ** 6.5) == pytest.approx(82.5)        # halfway in log10, not in FLOPs
    assert f(1e3) == 80.0 and f(1e12) == 90.0          # held at the ends
    assert baseline_curve([(1e6, 70.0), (1e6, 75.0)])(1e6) == 75.0
    with pytest.raises(ValueError, match="positive"):
        baseline_curve([(0.0, 1.0)])
    with pytest.raises(ValueError, match="at least one"):
        baseline_curve([])


def test_score_is_mean_gap_to_the_curve():
    pts = [Point("a", 1e7, 87.0), Point("b", 10 ** 7.5, 86.5)]
    assert elue_score(pts, BASE) == pytest.approx(((87 - 85) + (86.5 - 87.5)) / 2)
    assert elue_score([Point("on", 1e8, 90.0)], BASE) == 0.0
    with pytest.raises(ValueError):
        elue_score([], BASE)


def test_pareto_frontier():
    pts = [Point("big", 1e9, 91.0), Point("mid", 1e8, 90.0), Point("worse", 2e8, 89.0),
           Point("tiny", 1e5, 80.0), Point("tie", 1e8, 90.0), Point("dominated", 1e5, 79.0)]
    names = [p.name for p in pareto_frontier(pts)]
    assert names[0] == "tiny" and names[-1] == "big"
    assert "worse" not in names and "dominated" not in names
    assert {"mid", "tie"} <= set(names)      # equal points do not dominate each other


def test_plot_writes_png(tmp_path):
    pts = [Point("teacher", 1e9, 91.0, group="teacher"), Point("exit-2", 3e8, 85.0, group="EB"),
           Point("dan", 1e5, 82.0, group="DAN")]
    out = plot(pts, tmp_path / "p.png", baseline=[(3e8, 85.0), (1e9, 91.0)], title="SST-2")
    data = (tmp_path / "p.png").read_bytes()
    assert out.endswith("p.png") and data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
