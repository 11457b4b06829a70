"""Timing helpers shared by bench/ and the demo: medians, the machine's own GEMM ceiling."""
from __future__ import annotations

import platform
import time

import torch

_CEILING: dict[str, float] = {}


def median_time(fn, *, warmup: int = 2, min_rounds: int = 5, min_time: float = 0.5,
                max_rounds: int = 200) -> float:
    """Median wall time of ``fn()`` in seconds: at least ``min_rounds`` runs and ``min_time`` s."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_rounds or (time.perf_counter() - start < min_time and len(times) < max_rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def interleaved_median_times(fns: dict, *, warmup: int = 2, min_rounds: int = 5,
                             min_time: float = 0.5, max_rounds: int = 100) -> dict:
    """Median wall time (s) of each ``fns[name]()``, timed in interleaved rounds.

    Every round runs each contender once, so a transient state of the machine (another
    process, page-cache or allocator hiccups) hits all of them alike instead of the one that
    happened to be timed then. Rounds continue until ``min_rounds`` and ``min_time`` seconds
    of the slowest contender are reached.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    while True:
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        rounds = len(next(iter(times.values())))
        slowest = max(sum(v) for v in times.values())
        if rounds >= max_rounds or (rounds >= min_rounds and slowest >= min_time):
            break
    return {name: sorted(v)[len(v) // 2] for name, v in times.items()}


def machine_ceiling() -> dict[str, float]:
    """fp32 GEMM GFLOP/s of a 2048^3 ``torch.mm`` measured now (cached for the process)."""
    if "mm2048_gflops" not in _CEILING:
        a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
        t = median_time(lambda: torch.mm(a, b), min_rounds=5, min_time=1.0)
        _CEILING["mm2048_gflops"] = 2 * 2048 ** 3 / t / 1e9
    return {"mm2048_gflops": _CEILING["mm2048_gflops"]}


def machine_copy_bandwidth(nbytes: int = 256 << 20) -> float:
    """Payload GB/s of a large tensor copy into a reused buffer (read + write counted once each
    as ``2 * nbytes`` moved), measured now and cached for the process: the ceiling that
    memory-bound ops (gathers, elementwise kernels) are reported against."""
    if "copy_gbps" not in _CEILING:
        src = torch.empty(nbytes // 4, dtype=torch.float32).uniform_()
        dst = torch.empty_like(src)
        t = median_time(lambda: dst.copy_(src), min_rounds=5, min_time=1.0)
        _CEILING["copy_gbps"] = 2 * nbytes / t / 1e9
    return _CEILING["copy_gbps"]


def machine_info() -> dict:
    """What a benchmark figure depends on: torch build, threads, ISA, the GEMM ceiling."""
    try:
        isa = torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # older torch
        isa = "unknown"
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "isa": isa,
        "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
        **machine_ceiling(),
        "copy_gbps": machine_copy_bandwidth(),
    }
