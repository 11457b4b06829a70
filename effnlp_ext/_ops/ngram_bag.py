"""ngram_bag and ngram_ids: fake kernels, autograd and the public wrappers of the fused hashed
n-gram embedding bag; ``build_vocab_table`` for its exact-vocabulary mode.

Hash, row layout and table format: csrc/include/effnlp/ngram_hash.h (reproduced in
``effnlp_ext.reference``). In short, for documents of int64 token ids:

* the n-gram of order n at position p hashes to ``h`` (64-bit FNV-1a chain + murmur3 fmix64);
* order 1 with ``unigram_rows = U > 0`` uses row ``token``; every other n-gram row
  ``U + (h >> 1) % num_buckets`` (logical shift: the top 63 bits);
* with a vocabulary ``(keys, rows)`` (a linear-probing table built by ``build_vocab_table``
  from raw hashes), every n-gram of every order is looked up by ``h`` and the absent ones are
  dropped; ``unigram_rows`` and ``num_buckets`` are then unused (0).
"""
from __future__ import annotations

import torch

from ..reference import NGRAM_EMPTY_KEY

_ops = torch.ops.effnlp
_MODES = {"sum": 0, "mean": 1}


def _check_args(op, tokens, offsets, orders, num_buckets, unigram_rows, vocab_keys, vocab_rows):
    torch._check(tokens.dtype == torch.int64, lambda: f"{op}: tokens must be an int64 tensor, got {tokens.dtype}")
    torch._check(offsets.dtype == torch.int64, lambda: f"{op}: offsets must be an int64 tensor, got {offsets.dtype}")
    torch._check(tokens.dim() == 1, lambda: f"{op}: tokens must be 1-D (the flat token ids of all documents)")
    torch._check(offsets.dim() == 1, lambda: f"{op}: offsets must be 1-D (the start of each document)")
    torch._check(offsets.device == tokens.device,
                 lambda: f"{op}: offsets is on {offsets.device} but tokens is on {tokens.device}; "
                         "all inputs must be on one device")
    torch._check(len(orders) > 0, lambda: f"{op}: orders must not be empty")
    torch._check(all(1 <= o <= 32 for o in orders), lambda: f"{op}: every n-gram order must be in [1, 32]")
    torch._check(len(set(orders)) == len(orders), lambda: f"{op}: orders must be distinct, got {list(orders)}")
    torch._check(unigram_rows >= 0 and num_buckets >= 0,
                 lambda: f"{op}: unigram_rows and num_buckets must be >= 0")
    torch._check((vocab_keys is None) == (vocab_rows is None),
                 lambda: f"{op}: vocab_keys and vocab_rows must be given together")
    if vocab_keys is not None:
        T = vocab_keys.shape[0]
        torch._check(vocab_keys.dim() == 1 and vocab_rows.dim() == 1 and vocab_rows.shape[0] == T,
                     lambda: f"{op}: vocab_keys and vocab_rows must be 1-D of one size T")
        torch._check(T > 0 and (T & (T - 1)) == 0,
                     lambda: f"{op}: the vocabulary table size must be a power of two, got {T}")
        torch._check(unigram_rows == 0 and num_buckets == 0,
                     lambda: f"{op}: with a vocabulary every n-gram is looked up in it, so "
                             "unigram_rows and num_buckets must be 0")


def _check_weight(op, weight, tokens, num_buckets, unigram_rows, vocab):
    torch._check(weight.dim() == 2, lambda: f"{op}: weight must be 2-D [rows, D], got {weight.dim()}-D")
    torch._check(weight.dtype.is_floating_point,
                 lambda: f"{op}: weight must be a floating-point tensor, got {weight.dtype}")
    torch._check(weight.device == tokens.device,
                 lambda: f"{op}: weight is on {weight.device} but tokens is on {tokens.device}; "
                         "all inputs must be on one device")
    if not vocab:
        torch._check(weight.shape[0] == unigram_rows + num_buckets,
                     lambda: f"{op}: weight has {weight.shape[0]} rows but unigram_rows + "
                             f"num_buckets = {unigram_rows + num_buckets}")


@torch.library.register_fake("effnlp::ngram_bag")
def _ngram_bag_fake(tokens, offsets, weight, orders, num_buckets, unigram_rows, mode,
                    vocab_keys=None, vocab_rows=None, sparse=True):
    op = "ngram_bag"
    _check_args(op, tokens, offsets, orders, num_buckets, unigram_rows, vocab_keys, vocab_rows)
    torch._check(mode in (0, 1), lambda: f"{op}: mode must be 0 (sum) or 1 (mean), got {mode}")
    _check_weight(op, weight, tokens, num_buckets, unigram_rows, vocab_keys is not None)
    return weight.new_empty((offsets.shape[0], weight.shape[1]))


@torch.library.register_fake("effnlp::ngram_ids")
def _ngram_ids_fake(tokens, offsets, orders, num_buckets, unigram_rows=0, vocab_keys=None,
                    vocab_rows=None):
    _check_args("ngram_ids", tokens, offsets, orders, num_buckets, unigram_rows, vocab_keys, vocab_rows)
    n = torch.library.get_ctx().new_dynamic_size()  # the number of kept n-grams: data-dependent
    return tokens.new_empty((n,)), offsets.new_empty((offsets.shape[0],))


@torch.library.register_fake("effnlp::_ngram_bag_backward")
def _ngram_bag_backward_fake(grad, tokens, offsets, orders, num_buckets, unigram_rows, mode,
                             num_weights, vocab_keys, vocab_rows):
    op = "_ngram_bag_backward"
    _check_args(op, tokens, offsets, orders, num_buckets, unigram_rows, vocab_keys, vocab_rows)
    torch._check(grad.dim() == 2 and grad.shape[0] == offsets.shape[0],
                 lambda: f"{op}: grad must be [B, D] with B = {offsets.shape[0]} documents")
    nnz = torch.library.get_ctx().new_dynamic_size()  # distinct rows hit: data-dependent
    return tokens.new_empty((nnz,)), grad.new_empty((nnz, grad.shape[1]))


def _setup(ctx, inputs, output):
    tokens, offsets, weight, orders, num_buckets, unigram_rows, mode, vkeys, vrows, sparse = inputs
    ctx.save_for_backward(tokens, offsets, vkeys, vrows)
    ctx.args = (list(orders), num_buckets, unigram_rows, mode)
    ctx.weight_shape = tuple(weight.shape)
    ctx.sparse = sparse


def _backward(ctx, grad):
    if not ctx.needs_input_grad[2]:
        return (None,) * 10
    tokens, offsets, vkeys, vrows = ctx.saved_tensors
    orders, num_buckets, unigram_rows, mode = ctx.args
    rows, values = _ops._ngram_bag_backward(grad, tokens, offsets, orders, num_buckets, unigram_rows,
                                            mode, ctx.weight_shape[0], vkeys, vrows)
    if ctx.sparse:
        gw = torch.sparse_coo_tensor(rows[None], values, ctx.weight_shape, is_coalesced=True,
                                     check_invariants=False)
    else:
        gw = values.new_zeros(ctx.weight_shape).index_add_(0, rows, values)
    return None, None, gw, None, None, None, None, None, None, None


torch.library.register_autograd("effnlp::ngram_bag", _backward, setup_context=_setup)


def _vocab_args(vocab):
    if vocab is None:
        return None, None
    keys, rows = vocab
    return keys, rows


def ngram_bag(tokens: torch.Tensor, offsets: torch.Tensor, weight: torch.Tensor, orders=(1, 2, 3),
              mode: str = "mean", num_buckets: int | None = None, unigram_rows: int = 0,
              vocab: tuple[torch.Tensor, torch.Tensor] | None = None,
              sparse: bool = True) -> torch.Tensor:
    """Hashed n-gram embedding bag: for every document, the sum or mean of the table rows of all
    its n-grams of the given ``orders``, in one pass (hash, gather, reduce; no id tensor).

    Args:
        tokens: int64 ``[N]``, the token ids (>= 0) of all documents back to back.
        offsets: int64 ``[B]``, the start of each document in ``tokens`` (``offsets[0] == 0``,
            non-decreasing; document b spans ``[offsets[b], offsets[b+1])``, the last one ends at
            N), as ``F.embedding_bag`` without ``include_last_offset``. N-grams never cross
            documents; a document shorter than an order has no n-gram of that order.
        weight: ``[unigram_rows + num_buckets, D]`` table (any rows with a vocabulary), float32
            or float64 (float16/bfloat16 accumulate in float32).
        orders: distinct n-gram orders >= 1.
        mode: ``"mean"`` (over the kept n-grams; an empty document gives zeros) or ``"sum"``.
        num_buckets: K, the hashed rows; default ``weight.shape[0] - unigram_rows``.
        unigram_rows: U; if > 0, order 1 uses row ``token`` (tokens must be < U) and the other
            n-grams rows ``U + (h >> 1) % K`` (fastText's layout); if 0, every n-gram is hashed.
        vocab: ``(keys, rows)`` from ``build_vocab_table``: every n-gram is looked up by its
            64-bit hash and dropped when absent (``num_buckets``/``unigram_rows`` unused).
        sparse: the weight's gradient as a coalesced sparse COO tensor (for ``SparseAdam`` /
            ``SGD``), or dense.
    Returns:
        ``[B, D]`` in the weight's dtype. Equals ``F.embedding_bag(ids, weight, id_offsets)``
        with ``ids, id_offsets = ngram_ids(...)`` on the same arguments.
    """
    mode_i = _MODES.get(mode, mode) if isinstance(mode, str) else int(mode)
    if isinstance(mode_i, str):
        raise ValueError(f"ngram_bag: mode must be 'sum' or 'mean', got {mode!r}")
    keys, rows = _vocab_args(vocab)
    if vocab is not None:
        if unigram_rows or num_buckets:
            raise ValueError("ngram_bag: with a vocabulary every n-gram is looked up in it; "
                             "leave num_buckets and unigram_rows unset")
        num_buckets = 0
    elif num_buckets is None:
        num_buckets = weight.shape[0] - unigram_rows
    return _ops.ngram_bag(tokens, offsets, weight, [int(o) for o in orders], int(num_buckets),
                          int(unigram_rows), mode_i, keys, rows, bool(sparse))


def ngram_ids(tokens: torch.Tensor, offsets: torch.Tensor, orders=(1, 2, 3), num_buckets: int = 0,
              unigram_rows: int = 0,
              vocab: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The table rows ``ngram_bag`` gathers: ``(ids, id_offsets)``, int64.

    ``ids`` lists each document's kept n-grams by start position, then by increasing order;
    ``id_offsets [B]`` is where each document's ids start, so that
    ``F.embedding_bag(ids, weight, id_offsets, mode=...)`` equals ``ngram_bag``. With
    ``num_buckets = unigram_rows = 0`` and no vocabulary, the ids are the raw 64-bit hashes as
    int64 (count them with ``torch.unique`` to build a vocabulary).
    """
    keys, rows = _vocab_args(vocab)
    return _ops.ngram_ids(tokens, offsets, [int(o) for o in orders], int(num_buckets),
                          int(unigram_rows), keys, rows)


def restore_coalesced_flag(param: torch.Tensor) -> bool:
    """Marks ``param.grad`` coalesced again when it is: autograd's gradient accumulation drops
    the flag of the coalesced gradient ``ngram_bag`` returns (pytorch/pytorch#105916), and
    ``SparseAdam`` then coalesces it once more (~0.25 s for 770k rows x 256 here). Call it
    between ``backward()`` and ``optimizer.step()``.

    Safe for any sparse gradient: the flag is set only if the row indices are strictly
    increasing (one pass over them), i.e. if it is coalesced by definition; a gradient summed
    from several backward passes is left as it is. Returns whether ``param.grad`` is flagged
    coalesced afterwards."""
    g = param.grad
    if g is None or not g.is_sparse:
        return False
    if g.is_coalesced():
        return True
    idx = g._indices()
    if g.sparse_dim() != 1 or not bool((idx[0, 1:] > idx[0, :-1]).all()):
        return False
    g._coalesced_(True)
    return True


def build_vocab_table(keys: torch.Tensor, rows: torch.Tensor | None = None, *,
                      load_factor: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """An open-addressing (linear probing) table of the int64 n-gram hashes ``keys`` mapping to
    ``rows`` (default ``arange(len(keys))``): ``(vocab_keys, vocab_rows)`` of a power-of-two
    size T >= len(keys) / load_factor, empty slots holding ``NGRAM_EMPTY_KEY`` (INT64_MIN) and
    row -1. Key k lives in the first slot from ``k & (T - 1)`` on (wrapping) not taken by
    another key, so a lookup probes from there to the key or an empty slot.

    Keys must be distinct and differ from INT64_MIN. Built with vectorised torch ops: each round
    every unplaced key tries its current slot; among keys that find the same free slot the one
    listed first wins, the others move on one slot (deterministic)."""
    keys = keys.reshape(-1).to(torch.int64)
    n = keys.numel()
    rows = torch.arange(n, dtype=torch.int64, device=keys.device) if rows is None else \
        rows.reshape(-1).to(torch.int64)
    if rows.numel() != n:
        raise ValueError(f"build_vocab_table: {n} keys but {rows.numel()} rows")
    if not 0 < load_factor < 1:
        raise ValueError(f"build_vocab_table: load_factor must be in (0, 1), got {load_factor}")
    if n and bool((keys == NGRAM_EMPTY_KEY).any()):
        raise ValueError("build_vocab_table: a key equals the empty-slot marker INT64_MIN")
    if n and torch.unique(keys).numel() != n:
        raise ValueError("build_vocab_table: keys must be distinct")
    T = 1
    while T * load_factor < n or T <= n:
        T *= 2
    table_keys = torch.full((T,), NGRAM_EMPTY_KEY, dtype=torch.int64, device=keys.device)
    table_rows = torch.full((T,), -1, dtype=torch.int64, device=keys.device)
    slot = keys & (T - 1)
    pending = torch.arange(n, device=keys.device)
    while pending.numel():
        s = slot[pending]
        free = table_keys[s] == NGRAM_EMPTY_KEY
        cand, cs = pending[free], s[free]
        first = torch.full((T,), n, dtype=torch.int64, device=keys.device)
        first.scatter_reduce_(0, cs, cand, "amin")
        won = first[cs] == cand
        wi, ws = cand[won], cs[won]
        table_keys[ws] = keys[wi]
        table_rows[ws] = rows[wi]
        placed = torch.zeros(n, dtype=torch.bool, device=keys.device)
        placed[wi] = True
        pending = pending[~placed[pending]]
        slot[pending] = (slot[pending] + 1) & (T - 1)
    return table_keys, table_rows
