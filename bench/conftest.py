"""Shared benchmark plumbing: timing records, the machine ceiling, JSON + markdown output.

Each bench module records (case, contender, mode) -> median seconds through `record`, and at
the end of the session every module's results are written to bench/results/<name>.json with
the machine's own ceiling (a 2048^3 fp32 torch.mm) measured in the same run.
"""
from __future__ import annotations

import json
import os
import platform
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
QUICK = os.environ.get("EFFNLP_BENCH_QUICK") == "1"
_RECORDS: dict[str, list[dict]] = defaultdict(list)
_CEILING: dict[str, float] = {}


def cpu_isa() -> str:
    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover - older torch
        return "unknown"


def median_time(fn, *, warmup: int = 2, min_rounds: int = 5, min_time: float = 0.5) -> float:
    """Median wall time of fn() in seconds (at least min_rounds runs and min_time seconds)."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_rounds or (time.perf_counter() - start < min_time and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def machine_ceiling() -> dict[str, float]:
    """fp32 GEMM GFLOP/s (2048^3 torch.mm) measured now, cached for the session."""
    if not _CEILING:
        a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
        t = median_time(lambda: torch.mm(a, b), min_rounds=5, min_time=1.0)
        _CEILING["mm2048_gflops"] = 2 * 2048 ** 3 / t / 1e9
    return _CEILING


def record(bench: str, **row) -> None:
    _RECORDS[bench].append(row)


@pytest.fixture(scope="session")
def ceiling():
    return machine_ceiling()


def pytest_sessionfinish(session, exitstatus):
    if not _RECORDS:
        return
    RESULTS_DIR.mkdir(exist_ok=True)
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "isa": cpu_isa(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "quick": QUICK,
        "date": time.strftime("%Y-%m-%d"),
        **machine_ceiling(),
    }
    for bench, rows in _RECORDS.items():
        path = RESULTS_DIR / f"{bench}{'_quick' if QUICK else ''}.json"
        path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
