"""Benchmark plumbing: rows recorded by the bench modules go to bench/results/<name>.json
together with the machine description and GEMM ceiling measured in the same run."""
from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

from effnlp_ext.benchmarking import machine_info

RESULTS_DIR = Path(__file__).resolve().parent / "results"
QUICK = os.environ.get("EFFNLP_BENCH_QUICK") == "1"
_RECORDS: dict[str, list[dict]] = defaultdict(list)


def record(bench: str, rows: list[dict]) -> None:
    _RECORDS[bench].extend(rows)


def pytest_sessionfinish(session, exitstatus):
    if not _RECORDS:
        return
    RESULTS_DIR.mkdir(exist_ok=True)
    meta = {**machine_info(), "quick": QUICK}
    for bench, rows in _RECORDS.items():
        path = RESULTS_DIR / f"{bench}{'_quick' if QUICK else ''}.json"
        path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
