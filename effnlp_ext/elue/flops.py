"""Per-sample FLOPs and parameters of any model, effnlp ops included.

Built on ``torch.utils.flop_counter.FlopCounterMode``, which counts matmul-like aten ops
(mm/addmm/bmm, convolutions, SDPA on CUDA) and nothing elementwise. Added here:

* every effnlp op:
  ``kron_linear``        2 R min(n1 n2 m2 + m1 n1 m2, m1 n1 n2 + m1 n2 m2) per token (the
                         cheaper factor order, as the kernel takes it) + bias adds;
  ``fourier_mix``        the FFTs it runs: a real FFT along H (2.5 H log2 H per row) and a complex
                         FFT of the H/2+1 kept columns along L (5 L log2 L each), per sequence at
                         its true length;
  ``masked_linear``      2 N in out (the dense GEMM it runs) + bias;
  ``sparse_linear``      2 N nnz + bias (the exported sparse path);
  ``ngram_bag``          D adds per kept n-gram (+ D per document for the mean): data-dependent,
                         so it reads the actual tokens (raw formula);
  ``rational``           (2 m + 2 n + 3) per element (two Horner chains, |.|, +1, divide);
* ATen's FFTs (``_fft_r2c``/``_fft_c2c``/``_fft_c2r``, the 5 N log2 N convention for a complex
  transform, half for real ones), so HF's FNet is counted too;
* CPU SDPA (``_scaled_dot_product_flash_attention_for_cpu``), which the stock counter misses.

FLOPs count a multiply and an add separately; MACs (what ELUE's paper and its counter report)
are FLOPs / 2. Only the forward is counted (inference cost).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

aten = torch.ops.aten
_effnlp = torch.ops.effnlp


def _numel(shape) -> int:
    return math.prod(shape) if shape is not None else 0


def _tokens(shape) -> int:
    return _numel(shape[:-1])


def kron_linear_flop(x_shape, A_shape, B_shape, bias_shape=None, *args, out_shape=None, **kw) -> int:
    R, m1, n1 = A_shape
    _, m2, n2 = B_shape
    per_token = 2 * R * min(n1 * n2 * m2 + m1 * n1 * m2, m1 * n1 * n2 + m1 * n2 * m2)
    bias = m1 * m2 if bias_shape is not None else 0
    return _tokens(x_shape) * (per_token + bias)


def fft_flops(n: int, real: bool = False) -> float:
    """The usual 5 n log2 n estimate of a length-n complex FFT (half for real input/output)."""
    if n <= 1:
        return 0.0
    f = 5.0 * n * math.log2(n)
    return f / 2 if real else f


def fourier_mix_cost(L: int, H: int) -> float:
    return L * fft_flops(H, real=True) + (H // 2 + 1) * fft_flops(L)


def fourier_mix_flop(x, lengths=None, *args, out_val=None, **kw) -> int:
    L, H = x.shape[-2], x.shape[-1]
    if lengths is None:
        return int(_numel(x.shape[:-2]) * fourier_mix_cost(L, H))
    return int(sum(fourier_mix_cost(int(n), H) for n in lengths.reshape(-1).tolist()))


fourier_mix_flop._get_raw = True


def masked_linear_flop(x_shape, w_shape, s_shape, threshold, bias_shape=None, *a, out_shape=None,
                       **kw) -> int:
    out, inp = w_shape
    return _tokens(x_shape) * (2 * inp * out + (out if bias_shape is not None else 0))


def sparse_linear_flop(x_shape, crow_shape, col_shape, values_shape, in_features, bias_shape=None,
                       *a, out_shape=None, **kw) -> int:
    out = crow_shape[0] - 1
    return _tokens(x_shape) * (2 * values_shape[0] + (out if bias_shape is not None else 0))


def ngram_bag_flop(tokens, offsets, weight, orders, num_buckets, unigram_rows, mode,
                   vocab_keys=None, vocab_rows=None, *a, out_val=None, **kw) -> int:
    from .. import ngram_ids

    vocab = (vocab_keys, vocab_rows) if vocab_keys is not None else None
    ids, _ = ngram_ids(tokens, offsets, tuple(orders), num_buckets, unigram_rows, vocab=vocab)
    D = weight.shape[1]
    return int(ids.numel() * D + (offsets.numel() * D if mode == 1 else 0))


ngram_bag_flop._get_raw = True


def rational_flop(x_shape, num_shape, den_shape, *a, out_shape=None, **kw) -> int:
    m = num_shape[-1] - 1
    n = den_shape[-1]
    return _numel(x_shape) * (2 * m + 2 * n + 3)


def _fft_flop(kind: str):
    """ATen's FFTs over ``dim``: r2c transforms the last dim real-to-half first, then the others
    complex on the half width; c2r the others complex first, then the last dim half-to-real."""
    def formula(x, dim, *args, out_val=None, **kw) -> int:
        dims = [d % x.dim() for d in dim]
        shape = list(x.shape)
        total = 0.0

        def along(d, n, real):
            return (_numel(shape) // max(shape[d], 1)) * fft_flops(n, real=real)

        if kind == "c2c":
            for d in dims:
                total += along(d, shape[d], False)
            return int(total)
        last = dims[-1]
        if kind == "r2c":
            total += along(last, shape[last], True)
            shape[last] = shape[last] // 2 + 1
            for d in dims[:-1]:
                total += along(d, shape[d], False)
        else:
            for d in dims[:-1]:
                total += along(d, shape[d], False)
            n = out_val.shape[last] if out_val is not None else 2 * (shape[last] - 1)
            total += along(last, n, True)
        return int(total)
    formula._get_raw = True
    return formula


def sdpa_cpu_flop(q_shape, k_shape, v_shape, *args, out_shape=None, **kw) -> int:
    return sdpa_flop_count(q_shape, k_shape, v_shape)


def flop_mapping() -> dict:
    """The formulas this module adds to FlopCounterMode's registry (only ops that exist)."""
    table: dict = {
        aten._fft_r2c: _fft_flop("r2c"),
        aten._fft_c2r: _fft_flop("c2r"),
        aten._fft_c2c: _fft_flop("c2c"),
        aten._scaled_dot_product_flash_attention_for_cpu: sdpa_cpu_flop,
    }
    ours = {"kron_linear": kron_linear_flop, "_kron_linear_forward": kron_linear_flop,
            "fourier_mix": fourier_mix_flop, "masked_linear": masked_linear_flop,
            "sparse_linear": sparse_linear_flop, "ngram_bag": ngram_bag_flop,
            "rational": rational_flop}
    for name, formula in ours.items():
        if hasattr(_effnlp, name):
            table[getattr(_effnlp, name)] = formula
    return table


@dataclass
class CostReport:
    flops: float              # per sample, multiply and add counted apart
    params: int
    samples: int
    by_op: dict

    @property
    def macs(self) -> float:
        return self.flops / 2

    def as_dict(self) -> dict:
        return {"flops_per_sample": self.flops, "macs_per_sample": self.macs,
                "params": self.params, "samples": self.samples, "by_op": self.by_op}


def count_flops(fn: Callable[[], object]) -> tuple[int, dict]:
    """Total forward FLOPs of ``fn()`` and the per-op split (op name -> FLOPs)."""
    counter = FlopCounterMode(display=False, custom_mapping=flop_mapping())
    with torch.no_grad(), counter:
        fn()
    by_op = {str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
    return counter.get_total_flops(), by_op


def count_parameters(model: torch.nn.Module, exclude_embeddings: bool = False) -> int:
    """Parameters of ``model`` (shared tensors once); optionally without embedding tables,
    as ELUE reports both."""
    seen, total = set(), 0
    skip = set()
    if exclude_embeddings:
        for m in model.modules():
            if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)):
                skip.add(id(m.weight))
    for p in model.parameters():
        if id(p) in seen or id(p) in skip:
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def per_sample_cost(model: torch.nn.Module, samples: Iterable, run: Callable | None = None
                    ) -> CostReport:
    """Mean forward FLOPs per sample over ``samples``, each run alone (no padding counted).

    ``samples`` yields model inputs (a dict of tensors with a batch dim of 1, or anything
    ``run(model, sample)`` takes; the default calls ``model(**sample)``).
    """
    run = run or (lambda m, s: m(**s))
    model.eval()
    total, n, by_op = 0, 0, {}
    for sample in samples:
        flops, ops = count_flops(lambda: run(model, sample))
        total += flops
        n += 1
        for k, v in ops.items():
            by_op[k] = by_op.get(k, 0) + v
    n = max(n, 1)
    return CostReport(total / n, count_parameters(model), n, {k: v / n for k, v in by_op.items()})


def encoded_flops_per_sample(model: torch.nn.Module, features: Iterable[dict]) -> float:
    """Mean forward FLOPs per sample over encoded ``features`` (dicts of token-id lists).

    A transformer's FLOPs depend on the sequence length only, so one sample per distinct
    length is counted (``per_sample_cost``, batch 1, no padding) and the mean is taken over
    every sample at its own length. Any ``labels`` key is ignored.
    """
    features = list(features)
    one_per_length: dict[int, dict] = {}
    for f in features:
        one_per_length.setdefault(len(f["input_ids"]), f)
    per_length = {n: per_sample_cost(model, [{k: torch.tensor([v]) for k, v in f.items()
                                              if k != "labels"}]).flops
                  for n, f in one_per_length.items()}
    return sum(per_length[len(f["input_ids"])] for f in features) / max(1, len(features))
