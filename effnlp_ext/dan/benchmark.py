"""ngram_bag against what a user would otherwise run, at DAN training shapes (CPU fp32).

One batch of 4096 documents with lengths uniform in [32, 256] tokens, token ids drawn from a
Zipf(1) law over BERT's 30522 WordPiece ids (frequent tokens repeat, as in text); orders 1-3;
mean. The table is fastText's layout in 2M x 256 fp32 rows (2.05 GB): U = 30522 unigram rows
(row = token id) then K = 2,000,000 - 30522 hashed buckets for the bigrams and trigrams.

Contenders, timed in interleaved rounds in one process (forward, then forward+backward, where
each round sets ``weight.grad = None`` first, as ``optimizer.zero_grad()`` does):

* ``ngram_bag (ours)``: hash, gather and mean in one pass; coalesced sparse gradient (its
  values written into blocks the previous step's freed gradient handed back).
* ``torch composition``: ``reference.ngram_ids_ref`` (the hash in vectorised int64 torch ops)
  then ``F.embedding_bag(mode="mean", sparse=True)`` (uncoalesced sparse gradient). Not timed
  under torch.compile: boolean masking and ``repeat_interleave`` give it data-dependent shapes,
  so a compiled version runs as eager pieces between graph breaks.
* ``Python hashing + embedding_bag``: a Python loop over the documents builds the id lists
  (the same hash on Python ints, from token lists prepared outside the timing), then the same
  ``F.embedding_bag``.
* ``nn.EmbeddingBag on precomputed ids``: the gather alone with the ids given: the floor any
  hashing scheme built on torch's embedding bag can reach.

Gathered GB/s counts the bytes of the rows summed (n-grams x D x 4) over the time; the
machine's copy bandwidth (payload: read + write of a 256 MB copy) is measured in the same run. Used by bench/bench_ngram.py;
bench/render_ngram.py prints the README table.
"""
from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F

from .._ops import ngram_bag
from ..benchmarking import machine_copy_bandwidth
from ..reference import (NGRAM_BASIS, NGRAM_PRIME, _ngram_finish_py, ngram_ids_ref)

VOCAB = 30522
TABLE_ROWS = 2_000_000
DIM = 256
ORDERS = (1, 2, 3)
OURS = "ngram_bag (ours)"
COMPOSITION = "torch composition (hash ops + F.embedding_bag)"
PYTHON = "Python hashing + F.embedding_bag"
FLOOR = "nn.EmbeddingBag on precomputed ids"
CASES = [(4096, 32, 256)]          # (documents, min length, max length)
QUICK_CASES = [(1024, 32, 256)]

_TABLE: dict = {}


def interleaved_wall_and_cpu_times(fns: dict, *, warmup: int = 1, min_rounds: int = 5,
                                   min_time: float = 2.0, max_rounds: int = 50) -> dict:
    """Median wall time and median CPU time of the process (all its threads) of each
    ``fns[name]()``, in interleaved rounds (as ``benchmarking.interleaved_median_times``).

    The CPU time is the figure to trust on a shared machine: other processes stretch the wall
    time of whichever contender they preempt, but not the CPU seconds it consumes."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    while True:
        for name, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
        rounds = len(wall[next(iter(fns))])
        if rounds >= max_rounds or (rounds >= min_rounds and max(sum(v) for v in wall.values()) >= min_time):
            break
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    return {name: (med(wall[name]), med(cpu[name])) for name in fns}


def make_batch(docs: int, min_len: int, max_len: int, seed: int = 0):
    """Flat tokens and document offsets: lengths uniform in [min_len, max_len], token ids from a
    Zipf(1) law over the vocabulary."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (docs,), generator=g)
    probs = 1.0 / torch.arange(1, VOCAB + 1, dtype=torch.float64)
    tokens = torch.multinomial(probs, int(lengths.sum()), replacement=True, generator=g)
    offsets = torch.cumsum(lengths, 0) - lengths
    return tokens, offsets


def table() -> torch.Tensor:
    """The 2M x 256 fp32 table, made once per process (2 GB)."""
    if "w" not in _TABLE:
        _TABLE["w"] = torch.empty(TABLE_ROWS, DIM).normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    return _TABLE["w"]


def python_ids(docs: list[list[int]], orders, unigram_rows: int, num_buckets: int):
    """ids/offsets of every document by a Python loop over the documents (the hash of
    ``reference.ngram_hash_py`` on Python ints, one FNV chain per position)."""
    mask = (1 << 64) - 1
    want = set(orders)
    top = max(orders)
    ids, offs = [], []
    for doc in docs:
        offs.append(len(ids))
        L = len(doc)
        for p in range(L):
            h = NGRAM_BASIS
            for k in range(min(top, L - p)):
                h = ((h ^ doc[p + k]) * NGRAM_PRIME) & mask
                n = k + 1
                if n in want:
                    if n == 1 and unigram_rows:
                        ids.append(doc[p])
                    else:
                        ids.append(unigram_rows + (_ngram_finish_py(h, n) >> 1) % num_buckets)
    return torch.tensor(ids, dtype=torch.int64), torch.tensor(offs, dtype=torch.int64)


def run_case(docs: int, min_len: int, max_len: int, *, quick: bool = False) -> list[dict]:
    tokens, offsets = make_batch(docs, min_len, max_len)
    W = table()
    U, K = VOCAB, TABLE_ROWS - VOCAB
    doc_lists = [t.tolist() for t in torch.split(tokens, torch.diff(offsets, append=torch.tensor([tokens.numel()])).tolist())]
    ids, id_offsets = ngram_ids_ref(tokens, offsets, ORDERS, K, U)
    py_ids, py_offs = python_ids(doc_lists, ORDERS, U, K)
    assert torch.equal(py_ids, ids) and torch.equal(py_offs, id_offsets)
    ours_y = ngram_bag(tokens, offsets, W, ORDERS, "mean", unigram_rows=U)
    torch.testing.assert_close(ours_y, F.embedding_bag(ids, W, id_offsets, mode="mean"))
    n_ids = ids.numel()
    unique_rows = int(torch.unique(ids).numel())
    bag = torch.nn.EmbeddingBag.from_pretrained(W, freeze=False, mode="mean", sparse=True)
    Wg = W.requires_grad_(True)
    gy = torch.randn(docs, DIM, generator=torch.Generator().manual_seed(2))

    def composition(weight, **kw):
        ids, offs = ngram_ids_ref(tokens, offsets, ORDERS, K, U)
        return F.embedding_bag(ids, weight, offs, mode="mean", **kw)

    def python_loop(weight, **kw):
        ids, offs = python_ids(doc_lists, ORDERS, U, K)
        return F.embedding_bag(ids, weight, offs, mode="mean", **kw)

    fwd = {
        OURS: lambda: ngram_bag(tokens, offsets, W, ORDERS, "mean", unigram_rows=U),
        COMPOSITION: lambda: composition(W),
        PYTHON: lambda: python_loop(W),
        FLOOR: lambda: bag(ids, id_offsets),
    }

    def train(f):
        def run():
            Wg.grad = None
            bag.weight.grad = None
            f().backward(gy)
        return run

    fwdbwd = {
        OURS: train(lambda: ngram_bag(tokens, offsets, Wg, ORDERS, "mean", unigram_rows=U)),
        COMPOSITION: train(lambda: composition(Wg, sparse=True)),
        PYTHON: train(lambda: python_loop(Wg, sparse=True)),
        FLOOR: train(lambda: bag(ids, id_offsets)),
    }
    rounds = dict(warmup=1, min_rounds=3 if quick else 7, min_time=0.5 if quick else 2.0)
    with torch.no_grad():
        t_fwd = interleaved_wall_and_cpu_times(fwd, **rounds)
    t_train = interleaved_wall_and_cpu_times(fwdbwd, **rounds)
    Wg.requires_grad_(False)
    Wg.grad = None
    copy = machine_copy_bandwidth()
    rows = []
    for bench, times in (("forward", t_fwd), ("forward+backward", t_train)):
        for name, (t, c) in times.items():
            rows.append({
                "bench": bench, "docs": docs, "min_len": min_len, "max_len": max_len,
                "tokens": tokens.numel(), "ngrams": n_ids, "unique_rows": unique_rows, "D": DIM,
                "table_rows": TABLE_ROWS, "unigram_rows": U, "orders": list(ORDERS),
                "contender": name, "ms": t * 1e3, "cpu_ms": c * 1e3,
                "speedup_of_ours": t / times[OURS][0], "cpu_speedup_of_ours": c / times[OURS][1],
                "gathered_gbps": n_ids * DIM * 4 / t / 1e9, "copy_gbps": copy,
                "threads": torch.get_num_threads(),
                "load_avg_1min": os.getloadavg()[0], "cpus": os.cpu_count(),
            })
    return rows


BARS = {COMPOSITION: 1.5, PYTHON: 10.0}


def render(meta: dict, rows: list[dict]) -> str:
    out = [f"torch {meta.get('torch')}, {meta.get('threads')} threads, {meta.get('isa')}; "
           f"copy {meta.get('copy_gbps', 0):.1f} GB/s (payload, measured in the same run)"]
    for bench in ("forward", "forward+backward"):
        sel = [r for r in rows if r["bench"] == bench]
        if not sel:
            continue
        r0 = sel[0]
        load = max(r.get("load_avg_1min", 0.0) for r in sel)
        out += ["", f"ngram_bag {bench}, {r0['docs']} docs x {r0['min_len']}-{r0['max_len']} tokens "
                    f"({r0['tokens']} tokens, {r0['ngrams']} n-grams of orders {r0['orders']}, "
                    f"{r0['unique_rows']} distinct rows), {r0['table_rows']}x{r0['D']} fp32 table "
                    f"(U = {r0['unigram_rows']}), mean; machine load average up to {load:.1f} "
                    f"on {r0.get('cpus')} CPUs:", "",
                "| contender | ms (wall) | ours faster by | bar | CPU ms | ours faster by (CPU) | "
                "gathered GB/s | % of copy |",
                "|---|---|---|---|---|---|---|---|"]
        for r in sel:
            bar = BARS.get(r["contender"])
            bar_s = "" if bar is None else f"≥{bar:g}× {'met' if r['speedup_of_ours'] >= bar else 'MISSED'}"
            out.append(f"| {r['contender']} | {r['ms']:.1f} | {r['speedup_of_ours']:.2f}× | {bar_s} | "
                       f"{r.get('cpu_ms', float('nan')):.1f} | {r.get('cpu_speedup_of_ours', float('nan')):.2f}× | "
                       f"{r['gathered_gbps']:.2f} | {100 * r['gathered_gbps'] / r['copy_gbps']:.0f}% |")
    return "\n".join(out)
