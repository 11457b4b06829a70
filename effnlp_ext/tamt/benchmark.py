"""Benchmarks of the TAMT ops against the torch compositions, in one run (CPU fp32).

* ``masked_linear`` forward+backward (scores trainable, weight frozen: mask training) vs
  ``F.linear(x, w * STE(s > t))`` eager and torch.compile'd: time and memory. Memory is counted
  two ways: the bytes autograd saves for the backward beyond the inputs (saved-tensor hooks),
  and the peak of live tensor bytes created over one forward+backward (every op's outputs,
  forward, backward and gradient accumulation, tracked by a dispatch mode until freed). Our
  kernel's per-thread scratch (kept across calls, outside torch's allocator: one masked weight
  on the dense path, the CSR of the kept weights on the sparse path, at most
  ``SPARSE_DENSITY`` kept) is invisible to both, so it is added to our peak explicitly.
* ``sparse_linear`` (the exported path) vs dense ``nn.Linear`` and torch's CSR matmul, inference.
* one TAMT mask-training step of the offline MiniLM-L6 encoder (its 37 Q/K/V/O/FFN/pooler
  linears masked, weights frozen, scores trained; forward + backward of 32 × 64 tokens):
  ``MaskedLinear`` on our op vs the same model on the STE composition.
Used by bench/bench_mask.py and ``effnlp tamt bench``.
"""
from __future__ import annotations

import gc
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .._ops import masked_linear, sparse_linear
from ..benchmarking import interleaved_median_times
from ..reference import masked_linear_ref

# kSparseDensity of csrc/cpu/masked_linear.cpp: at or below this density the CPU kernel's
# forward and dX products run on the CSR of the kept weights.
SPARSE_DENSITY = 0.15

# (tokens, in, out)
TRAIN_CASES = [(2048, 384, 1536), (4096, 768, 3072), (512, 768, 3072)]
QUICK_TRAIN_CASES = [(2048, 384, 1536), (4096, 768, 3072)]
SPARSE_CASES = [(4096, 768, 3072), (4096, 3072, 768), (512, 768, 3072), (32, 768, 3072)]
QUICK_SPARSE_CASES = [(4096, 768, 3072), (32, 768, 3072)]


class _LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created by ops while active (forward and backward: the
    autograd engine dispatches in this thread on CPU). A storage counts from the op that
    creates it until the last op-produced tensor viewing it is freed."""

    def __init__(self, preexisting):
        super().__init__()
        self.refs: dict[int, int] = {}
        self.size: dict[int, int] = {}
        self.skip = {t.untyped_storage().data_ptr() for t in preexisting}
        self.cur = self.peak = 0

    def _release(self, key):
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.cur -= self.size.pop(key)
            del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            st = t.untyped_storage()
            key = st.data_ptr()
            if key in self.skip or st.nbytes() == 0:
                continue
            if key not in self.refs:
                self.refs[key] = 0
                self.size[key] = st.nbytes()
                self.cur += st.nbytes()
                self.peak = max(self.peak, self.cur)
            self.refs[key] += 1
            weakref.finalize(t, self._release, key)
        return out


def _peak_bytes(fn, preexisting) -> int:
    gc.collect()
    with _LiveBytes(preexisting) as mode:
        fn()
    gc.collect()
    return mode.peak


def _saved_bytes(fn_forward, inputs) -> int:
    seen, total = {t.untyped_storage().data_ptr() for t in inputs}, 0

    def pack(t):
        nonlocal total
        p = t.untyped_storage().data_ptr()
        if p not in seen:
            seen.add(p)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn_forward()
    return total


def run_train_case(tokens: int, n_in: int, n_out: int, sparsity: float = 0.7, *,
                   compiled: bool = True, quick: bool = False) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, n_in, generator=g, requires_grad=True)
    w = torch.randn(n_out, n_in, generator=g) * 0.05
    s = torch.rand(n_out, n_in, generator=g).requires_grad_()
    b = torch.randn(n_out, generator=g)
    t = float(torch.quantile(s.detach().reshape(-1)[:1 << 20], sparsity))
    gy = torch.randn(tokens, n_out, generator=g)
    ref_c = torch.compile(masked_linear_ref, fullgraph=True) if compiled else None

    def step(f):
        def run():
            x.grad = s.grad = None
            f(x, w, s, t, b).backward(gy)
        return run

    fns = {"masked_linear (ours)": step(masked_linear), "torch composition (eager)": step(masked_linear_ref)}
    if ref_c is not None:
        fns["torch composition (compiled)"] = step(ref_c)
    times = interleaved_median_times(fns, min_rounds=3 if quick else 5, min_time=0.5 if quick else 1.5)
    flops = 3 * 2 * tokens * n_in * n_out
    rows = []
    base = times["torch composition (eager)"]
    nnz = int((s.detach() > t).sum())
    if nnz <= SPARSE_DENSITY * s.numel():   # CSR: int32 column + fp32 value per kept weight
        scratch = nnz * 8 + (max(n_in, n_out) + 1) * 4
    else:                                   # the masked weight
        scratch = n_in * n_out * 4
    for name, fn in fns.items():
        ours = name.startswith("masked_linear")
        f = {"masked_linear (ours)": masked_linear, "torch composition (eager)": masked_linear_ref}.get(name, ref_c)
        if "compiled" in name:  # dispatch modes and saved-tensor hooks do not trace through
            peak = saved = float("nan")
        else:
            peak = _peak_bytes(fn, [x, w, s, b, gy]) + (scratch if ours else 0)
            saved = _saved_bytes(lambda: f(x, w, s, t, b), [x, w, s, b])
        rows.append({"bench": "masked_linear fwd+bwd", "tokens": tokens, "in": n_in, "out": n_out,
                     "sparsity": sparsity, "contender": name, "ms": times[name] * 1e3,
                     "gflops": flops / times[name] / 1e9, "speedup_vs_eager": base / times[name],
                     "peak_mib": peak / 2 ** 20, "saved_mib": saved / 2 ** 20,
                     "scratch_mib": scratch / 2 ** 20 if ours else 0.0})
    return rows


def run_model_case(sparsity: float = 0.9, batch: int = 32, length: int = 64, *,
                   quick: bool = False) -> list[dict]:
    from unittest import mock

    from transformers import AutoModel

    from ..training.teacher import OFFLINE_BASE, base_model_path
    from . import modules
    from .modules import apply_masks, masked_modules
    from .pruning import init_scores

    model = AutoModel.from_pretrained(base_model_path(OFFLINE_BASE))
    model.requires_grad_(False)
    apply_masks(model, train_weight=False)
    init_scores(model, "omp", sparsity, "layer")
    for m in masked_modules(model).values():
        m.train_scores(True)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, model.config.vocab_size, (batch, length), generator=g)
    mask = torch.ones_like(ids)

    def step():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, attention_mask=mask).last_hidden_state.pow(2).mean().backward()

    def composition():
        with mock.patch.object(modules, "masked_linear", masked_linear_ref):
            step()

    fns = {"MaskedLinear on masked_linear (ours)": step, "MaskedLinear on the torch composition": composition}
    times = interleaved_median_times(fns, min_rounds=3 if quick else 5, min_time=0.5 if quick else 1.5)
    base = times["MaskedLinear on the torch composition"]
    n_masked = len(masked_modules(model))
    return [{"bench": "TAMT mask-training step", "tokens": batch * length, "masked_linears": n_masked,
             "sparsity": sparsity, "contender": name, "ms": times[name] * 1e3,
             "speedup_vs_composition": base / times[name]} for name in fns]


def run_sparse_case(tokens: int, n_in: int, n_out: int, sparsity: float = 0.9, *,
                    quick: bool = False) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, n_in, generator=g)
    w = torch.randn(n_out, n_in, generator=g) * (torch.rand(n_out, n_in, generator=g) >= sparsity)
    b = torch.randn(n_out, generator=g)
    lin = torch.nn.Linear(n_in, n_out)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    csr = w.to_sparse_csr()
    crow, col, val = csr.crow_indices().int(), csr.col_indices().int(), csr.values().clone()
    wt_csr = w.t().contiguous().to_sparse_csr()  # x @ W.T as CSR(W) @ x.T or x @ CSR(W.T)
    ours = lambda: sparse_linear(x, crow, col, val, n_in, b)
    with torch.no_grad():
        fns = {"sparse_linear (ours)": ours, "dense nn.Linear": lambda: lin(x),
               "torch.sparse CSR (W @ x.T).T": lambda: torch.sparse.mm(csr, x.t()).t() + b}
        try:
            torch.mm(x[:2], wt_csr)
            fns["torch.sparse x @ CSR(W.T)"] = lambda: torch.mm(x, wt_csr) + b
        except RuntimeError:
            pass
        times = interleaved_median_times(fns, min_rounds=3 if quick else 5, min_time=0.5 if quick else 1.5)
    ref = lin(x).detach()
    torch.testing.assert_close(ours(), ref, rtol=1e-4, atol=1e-3)
    base = times["dense nn.Linear"]
    nnz = val.numel()
    weight_bytes = {"sparse_linear (ours)": nnz * 8 + crow.numel() * 4, "dense nn.Linear": w.numel() * 4}
    rows = []
    for name in fns:
        rows.append({"bench": "exported linear (inference)", "tokens": tokens, "in": n_in, "out": n_out,
                     "sparsity": sparsity, "contender": name, "ms": times[name] * 1e3,
                     "speedup_vs_dense": base / times[name],
                     "effective_gflops": 2 * tokens * nnz / times[name] / 1e9,
                     "weight_mib": weight_bytes.get(name, nnz * 12 + crow.numel() * 8) / 2 ** 20})
    return rows


def render(meta: dict, rows: list[dict]) -> str:
    out = [f"torch {meta.get('torch')}, {meta.get('threads')} threads, {meta.get('isa')}; "
           f"GEMM ceiling {meta.get('mm2048_gflops', 0):.0f} GFLOP/s, copy {meta.get('copy_gbps', 0):.1f} GB/s"]
    train = [r for r in rows if r["bench"].startswith("masked")]
    if train:
        out += ["", "masked_linear forward+backward (scores trainable, weight frozen), fp32:", "",
                "| tokens×in→out | sparsity | contender | ms | GFLOP/s | speedup vs eager | peak MiB | saved MiB |",
                "|---|---|---|---|---|---|---|---|"]
        for r in train:
            scratch = f" (incl. {r['scratch_mib']:.1f} scratch)" if r["scratch_mib"] else ""
            out.append(f"| {r['tokens']}×{r['in']}→{r['out']} | {r['sparsity']:.0%} | {r['contender']} | "
                       f"{r['ms']:.1f} | {r['gflops']:.0f} | {r['speedup_vs_eager']:.2f}× | "
                       f"{r['peak_mib']:.1f}{scratch} | {r['saved_mib']:.1f} |")
    steps = [r for r in rows if r["bench"].startswith("TAMT")]
    if steps:
        out += ["", f"one TAMT mask-training step, MiniLM-L6 encoder ({steps[0]['masked_linears']} masked "
                    f"linears, weights frozen), {steps[0]['tokens']} tokens (32 × 64), forward + backward, fp32:", "",
                "| sparsity | contender | ms | speedup vs composition |", "|---|---|---|---|"]
        for r in steps:
            out.append(f"| {r['sparsity']:.0%} | {r['contender']} | {r['ms']:.1f} | "
                       f"{r['speedup_vs_composition']:.2f}× |")
    sp = [r for r in rows if r["bench"].startswith("exported")]
    if sp:
        out += ["", "exported linear, inference, fp32:", "",
                "| tokens×in→out | sparsity | contender | ms | speedup vs dense | useful GFLOP/s | weight MiB |",
                "|---|---|---|---|---|---|---|"]
        for r in sp:
            out.append(f"| {r['tokens']}×{r['in']}→{r['out']} | {r['sparsity']:.0%} | {r['contender']} | "
                       f"{r['ms']:.2f} | {r['speedup_vs_dense']:.2f}× | {r['effective_gflops']:.0f} | "
                       f"{r['weight_mib']:.2f} |")
    return "\n".join(out)
