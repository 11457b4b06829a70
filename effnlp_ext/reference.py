"""Pure-PyTorch references of every effnlp op: the oracle for tests and the baseline of benches.

They are written for clarity, not speed: each states the op's mathematical definition.
"""
from __future__ import annotations

import torch


def kron_weight(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """The dense weight ``W = sum_r kron(A[r], B[r])`` of shape [m1*m2, n1*n2]."""
    R, m1, n1 = A.shape
    _, m2, n2 = B.shape
    # kron(A, B)[i1*m2 + i2, j1*n2 + j2] = A[i1, j1] * B[i2, j2]
    W = torch.einsum("rik,rjl->ijkl", A, B)  # [m1, m2, n1, n2]
    return W.reshape(m1 * m2, n1 * n2)


def kron_linear_ref(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x @ W.T + bias`` with ``W = sum_r kron(A[r], B[r])`` (materialises W)."""
    y = x @ kron_weight(A, B).T
    return y if bias is None else y + bias


def kron_linear_einsum(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """The factored composition in torch ops (no dense W): per token ``Y = sum_r A_r X B_r^T``.

    Applies the factor that leaves fewer FLOPs first. This is the best plain-torch composition we
    found and the baseline the fused kernel is measured against.
    """
    R, m1, n1 = A.shape
    _, m2, n2 = B.shape
    lead = x.shape[:-1]
    X = x.reshape(-1, n1, n2)
    cost_b = n1 * n2 * m2 + m1 * n1 * m2
    cost_a = m1 * n1 * n2 + m1 * n2 * m2
    if cost_b <= cost_a:
        T = torch.einsum("njl,rkl->rnjk", X, B)       # X B^T       [R, N, n1, m2]
        Y = torch.einsum("rij,rnjk->nik", A, T)       # A (X B^T)   [N, m1, m2]
    else:
        U = torch.einsum("rij,njl->rnil", A, X)       # A X         [R, N, m1, n2]
        Y = torch.einsum("rnil,rkl->nik", U, B)       # (A X) B^T   [N, m1, m2]
    y = Y.reshape(*lead, m1 * m2)
    return y if bias is None else y + bias


def fourier_mix_ref(x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """``Re(FFT_L(FFT_H(x)))`` over the last two dims (HF FNet's ``fftn(...).real``); with
    ``lengths``, each sequence is transformed over its first ``lengths[b]`` rows and its padding
    rows are 0."""
    if x.numel() == 0:  # torch's FFT rejects empty batches
        return torch.zeros_like(x)
    if lengths is None:
        return torch.fft.fftn(x, dim=(-2, -1)).real
    lead, (L, H) = x.shape[:-2], x.shape[-2:]
    xs, ns = x.reshape(-1, L, H), lengths.reshape(-1).tolist()
    rows = [torch.cat([torch.fft.fftn(xs[b, :n], dim=(-2, -1)).real if n else xs.new_zeros(0, H),
                       xs.new_zeros(L - n, H)]) for b, n in enumerate(ns)]
    out = torch.stack(rows) if rows else xs.new_zeros(xs.shape)
    return out.reshape(*lead, L, H)


def fourier_mix_rfft(x: torch.Tensor) -> torch.Tensor:
    """The best composition in torch ops we found: ``rfftn`` (half the work of a complex fft2),
    then the real part with the Hermitian mirror for the columns above H/2."""
    L, H = x.shape[-2:]
    K = H // 2 + 1
    Z = torch.fft.rfftn(x, dim=(-2, -1)).real                      # [..., L, K]
    if H - K == 0:
        return Z.contiguous()
    rows = (-torch.arange(L, device=x.device)) % L                 # j -> (L - j) mod L
    mirror = Z.index_select(-2, rows)[..., 1:H - K + 1].flip(-1)   # columns H-K+1 .. H-1
    return torch.cat([Z, mirror], dim=-1)


class StraightThroughMask(torch.autograd.Function):
    """``1[scores > threshold]`` as a float mask whose gradient passes straight through to the
    scores (the step function's derivative taken as 1), as in TAMT / edge-popup."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, threshold: float) -> torch.Tensor:
        return (scores > threshold).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def masked_linear_ref(x: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor,
                      threshold: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight * STE(scores > threshold), bias)``: the plain torch composition."""
    return torch.nn.functional.linear(x, weight * StraightThroughMask.apply(scores, threshold), bias)


def sparse_linear_ref(x: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor,
                      values: torch.Tensor, in_features: int,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` with the CSR ``W`` densified."""
    out = crow_indices.numel() - 1
    W = torch.sparse_csr_tensor(crow_indices.long(), col_indices.long(), values,
                                (out, in_features)).to_dense()
    return torch.nn.functional.linear(x, W, bias)


_FNV_OFFSET, _FNV_PRIME, _MASK64 = 14695981039346656037, 1099511628211, (1 << 64) - 1


def _byte_class(b: int) -> int:
    """0 separator, 1 word byte, 2 symbol (csrc/include/effnlp/word_hash.h)."""
    if b <= 0x20 or b == 0x7F:
        return 0
    if b >= 0x80 or b == 0x27 or 0x30 <= b <= 0x39 or 0x41 <= b <= 0x5A or 0x61 <= b <= 0x7A:
        return 1
    return 2


def _fnv_token(token: bytes) -> int:
    h = _FNV_OFFSET
    for b in token.lower():
        h = ((h ^ b) * _FNV_PRIME) & _MASK64
    return h & 0x7FFFFFFFFFFFFFFF


def hash_words_reference(texts) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-Python ``hash_words``: byte classes, ASCII lower-casing and FNV-1a per token."""
    ids, offsets = [], []
    for text in texts:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        offsets.append(len(ids))
        i = 0
        while i < len(data):
            c = _byte_class(data[i])
            if c == 0:
                i += 1
            elif c == 2:
                ids.append(_fnv_token(data[i:i + 1]))
                i += 1
            else:
                j = i
                while j < len(data) and _byte_class(data[j]) == 1:
                    j += 1
                ids.append(_fnv_token(data[i:j]))
                i = j
    return torch.tensor(ids, dtype=torch.int64), torch.tensor(offsets, dtype=torch.int64)

# ---------------------------------------------------------------------------------------------
# Hashed n-gram bags (ngram_ids / ngram_bag): the hash of csrc/include/effnlp/ngram_hash.h,
# once on Python ints (the definition) and once in int64 torch ops (vectorised, bit for bit the
# same: int64 multiplication wraps like uint64's, and right shifts are made logical by masking).

def _as_int64(c: int) -> int:
    """The int64 with the bits of the uint64 ``c``."""
    c &= (1 << 64) - 1
    return c - (1 << 64) if c >= 1 << 63 else c


NGRAM_BASIS = 0xcbf29ce484222325      # FNV-1a 64-bit offset basis
NGRAM_PRIME = 0x00000100000001b3      # FNV-1a 64-bit prime
NGRAM_ORDER_MIX = 0x9e3779b97f4a7c15  # 2^64 / golden ratio
NGRAM_MIX1 = 0xff51afd7ed558ccd       # murmur3 fmix64
NGRAM_MIX2 = 0xc4ceb9fe1a85ec53
NGRAM_EMPTY_KEY = -(1 << 63)          # an empty slot of a vocabulary table (INT64_MIN)
_U64 = (1 << 64) - 1


def ngram_hash_py(window) -> int:
    """The 64-bit hash (as an unsigned Python int) of one n-gram, a sequence of token ids >= 0::

        h = BASIS; for t in window: h = (h ^ t) * PRIME          (FNV-1a over 64-bit tokens)
        h ^= len(window) * ORDER_MIX
        h ^= h >> 33; h *= MIX1; h ^= h >> 33; h *= MIX2; h ^= h >> 33   (murmur3 fmix64)

    all mod 2^64. Its table row is ``U + (h >> 1) % K``; ``ngram_ids`` with ``K = U = 0``
    returns it as an int64 (``_as_int64``)."""
    h = NGRAM_BASIS
    for t in window:
        h = ((h ^ t) * NGRAM_PRIME) & _U64
    return _ngram_finish_py(h, len(window))


def _ngram_finish_py(h: int, order: int) -> int:
    h ^= (order * NGRAM_ORDER_MIX) & _U64
    h ^= h >> 33
    h = (h * NGRAM_MIX1) & _U64
    h ^= h >> 33
    h = (h * NGRAM_MIX2) & _U64
    return h ^ (h >> 33)


def _lshr(h: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 ``h`` by ``k`` (torch's ``>>`` is arithmetic)."""
    return (h >> k) & ((1 << (64 - k)) - 1)


def _ngram_finish(h: torch.Tensor, order: int) -> torch.Tensor:
    h = h ^ _as_int64(order * NGRAM_ORDER_MIX)
    h = h ^ _lshr(h, 33)
    h = h * _as_int64(NGRAM_MIX1)
    h = h ^ _lshr(h, 33)
    h = h * _as_int64(NGRAM_MIX2)
    return h ^ _lshr(h, 33)


def ngram_bucket(h: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """``(h >> 1) % K`` of int64 hashes with a logical shift: the top 63 bits, non-negative."""
    return _lshr(h, 1) % num_buckets


def vocab_lookup_ref(h: torch.Tensor, keys: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows of the int64 keys ``h`` in a linear-probing table (``vocab_keys``, ``vocab_rows``;
    size a power of two, ``NGRAM_EMPTY_KEY`` = empty slot), -1 where absent."""
    T = keys.numel()
    slot = h & (T - 1)
    out = torch.full_like(h, -1)
    pending = torch.ones_like(h, dtype=torch.bool)
    for _ in range(T):
        if not bool(pending.any()):
            break
        k = keys[slot]
        empty = k == NGRAM_EMPTY_KEY
        hit = pending & ~empty & (k == h)
        out[hit] = rows[slot[hit]]
        pending &= ~(hit | empty)
        slot = (slot + 1) & (T - 1)
    return out


def ngram_ids_ref(tokens: torch.Tensor, offsets: torch.Tensor, orders, num_buckets: int,
                  unigram_rows: int = 0, vocab=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, id_offsets)`` of ``ngram_ids`` in vectorised torch ops: an ``[N, |orders|]``
    matrix of the n-gram starting at each position (one FNV chain over the shifted token
    stream gives every order), masked where the n-gram crosses its document's end or is absent
    from the vocabulary, read in row-major order (by position, then increasing order)."""
    tokens, offsets = tokens.reshape(-1), offsets.reshape(-1)
    N, B, dev = tokens.numel(), offsets.numel(), tokens.device
    orders = sorted(int(o) for o in orders)
    U, K = int(unigram_rows), int(num_buckets)
    ends = torch.cat([offsets[1:], offsets.new_tensor([N])]) if B else offsets
    lengths = ends - offsets
    doc = torch.repeat_interleave(torch.arange(B, device=dev), lengths)  # document of each position
    end = ends[doc]
    pos = torch.arange(N, device=dev)
    padded = torch.cat([tokens, tokens.new_zeros(orders[-1])])
    h = torch.full((N,), _as_int64(NGRAM_BASIS), dtype=torch.int64, device=dev)
    cols, keep = [], []
    for k in range(orders[-1]):
        h = (h ^ padded[k:k + N]) * NGRAM_PRIME
        n = k + 1
        if n not in orders:
            continue
        valid = pos + n <= end
        if vocab is not None:
            row = vocab_lookup_ref(_ngram_finish(h, n), *vocab)
            valid = valid & (row >= 0)
        elif n == 1 and U > 0:
            row = tokens.clone()
        elif U == 0 and K == 0:
            row = _ngram_finish(h, n)
        else:
            row = U + ngram_bucket(_ngram_finish(h, n), K)
        cols.append(row)
        keep.append(valid)
    M, V = torch.stack(cols, 1), torch.stack(keep, 1)
    ids = M[V]
    per_doc = torch.zeros(B, dtype=torch.int64, device=dev).index_add_(0, doc, V.sum(1))
    return ids, torch.cumsum(per_doc, 0) - per_doc


def ngram_bag_ref(tokens: torch.Tensor, offsets: torch.Tensor, weight: torch.Tensor, orders,
                  mode: str = "mean", num_buckets: int | None = None, unigram_rows: int = 0,
                  vocab=None) -> torch.Tensor:
    """``ngram_bag`` as ``weight[ids]`` summed per document with ``index_add`` (mean: divided by
    the number of kept n-grams, an empty document gives zeros); differentiable (dense) in
    ``weight``."""
    if num_buckets is None:
        num_buckets = 0 if vocab is not None else weight.shape[0] - unigram_rows
    ids, id_offsets = ngram_ids_ref(tokens, offsets, orders, num_buckets, unigram_rows, vocab)
    B = offsets.numel()
    counts = torch.diff(id_offsets, append=id_offsets.new_tensor([ids.numel()])) if B else id_offsets
    doc = torch.repeat_interleave(torch.arange(B, device=ids.device), counts)
    out = weight.new_zeros(B, weight.shape[1]).index_add(0, doc, weight[ids])
    if mode == "mean":
        out = out / counts.clamp(min=1).to(out.dtype)[:, None]
    return out

def rational_ref(x: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``P(x) / (1 + |S(x)|)`` by Horner in torch ops, ``P = sum_k a_k x^k`` (k = 0..m),
    ``S = sum_k b_k x^(k+1)`` (k = 0..n-1), coefficients ``[G, .]`` (or 1-D for one group)
    applied to ``G`` contiguous channel groups of the last dim."""
    a = numerator if numerator.dim() == 2 else numerator.unsqueeze(0)
    b = denominator if denominator.dim() == 2 else denominator.unsqueeze(0)
    G, C = a.shape[0], x.shape[-1]
    xg = x.reshape(*x.shape[:-1], G, C // G) if C else x.reshape(*x.shape[:-1], G, 0)
    p = a[:, -1:].expand_as(xg)
    for k in range(a.shape[1] - 2, -1, -1):
        p = p * xg + a[:, k:k + 1]
    r = torch.zeros_like(xg)
    for k in range(b.shape[1] - 1, -1, -1):
        r = r * xg + b[:, k:k + 1]
    return (p / (1 + (xg * r).abs())).reshape(x.shape)
