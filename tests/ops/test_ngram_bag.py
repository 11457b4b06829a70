"""ngram_bag / ngram_ids: the hash against its definition, ids bitwise against the reference,
the bag against F.embedding_bag and the reference, the coalesced sparse backward (values,
ordering, thread-count determinism, SparseAdam), gradcheck, opcheck, torch.compile and input
validation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import effnlp_ext
from effnlp_ext import build_vocab_table, ngram_bag, ngram_ids, restore_coalesced_flag
from effnlp_ext.reference import (NGRAM_EMPTY_KEY, _as_int64, ngram_bag_ref, ngram_hash_py,
                                  ngram_ids_ref, vocab_lookup_ref)

from ..conftest import DEVICES

ORDERS = [(1,), (1, 2, 3), (2, 4)]
# (lengths of the documents): empty batch, N = 0 with docs, empty docs, docs shorter than the
# orders, ordinary ones
LAYOUTS = {"B0": [], "N0": [0, 0, 0], "mixed": [5, 0, 1, 3, 0, 9, 2], "long": [40, 17, 64],
           "one": [1]}
VOCAB = 50


def _docs(lengths, vocab=VOCAB, device="cpu", gen=None):
    lengths = torch.tensor(lengths, dtype=torch.int64)
    tokens = torch.randint(0, vocab, (int(lengths.sum()),), generator=gen)
    offsets = torch.cumsum(lengths, 0) - lengths
    return tokens.to(device), offsets.to(device)


def _layout(name, device="cpu"):
    return _docs(LAYOUTS[name], device=device)


# (U, K): hashed only, fastText layout (unigrams direct), tiny bucket count
TABLES = [(0, 97), (VOCAB, 31), (0, 1)]


def _vocab_for(tokens, offsets, orders, keep_every=2):
    """A vocabulary of every other distinct n-gram hash of the batch (the rest are dropped)."""
    raw, _ = ngram_ids(tokens.cpu(), offsets.cpu(), orders, 0, 0)
    keys = torch.unique(raw)[::keep_every]
    vk, vr = build_vocab_table(keys, torch.randperm(keys.numel()))
    return vk.to(tokens.device), vr.to(tokens.device), max(keys.numel(), 1)


def _tol(n):
    return dict(rtol=1e-5, atol=1e-6 * max(n, 1))


# --- the hash --------------------------------------------------------------------------------

def test_hash_matches_its_definition():
    gen = torch.Generator().manual_seed(3)
    toks = torch.randint(0, 2 ** 62, (12,), generator=gen).tolist() + [0, 1, 2 ** 63 - 1]
    tokens = torch.tensor(toks)
    offsets = torch.tensor([0])
    ids, _ = ngram_ids(tokens, offsets, (1, 2, 3, 5), 0, 0)
    expect = [_as_int64(ngram_hash_py(toks[p:p + n])) for p in range(len(toks)) for n in (1, 2, 3, 5)
              if p + n <= len(toks)]
    assert ids.tolist() == expect


def test_hash_golden_values():
    """Pins the hash: a vocabulary saved with one build must be read by every later one."""
    ids, _ = ngram_ids(torch.tensor([3, 7, 11]), torch.tensor([0]), (1, 2, 3), 0, 0)
    assert ids.tolist() == [-1230703277736733705, 4865694500612359563, -4475506519090114491,
                            7972171598709928023, -3272315418173972377, 4477203438044030107]
    # bucket = top 63 bits mod K; order 1 with U > 0 is the token itself
    ids, _ = ngram_ids(torch.tensor([3, 7, 11]), torch.tensor([0]), (1, 2), 1000, 20)
    assert ids.tolist() == [3, 20 + ((4865694500612359563 % 2 ** 64) >> 1) % 1000, 7,
                            20 + ((-3272315418173972377 % 2 ** 64) >> 1) % 1000, 11]


@pytest.mark.parametrize("K", [1, 2, 3, 97, 2 ** 31 - 1, 2 ** 40 + 3, 2 ** 62 + 1, 2 ** 63 - 1])
def test_bucket_modulo_is_exact(K):
    """The kernel's division-free modulo equals int64 % for bucket counts up to 2^63 - 1."""
    tokens, offsets = _docs([300, 200], vocab=10 ** 6)
    ids, _ = ngram_ids(tokens, offsets, (1, 2, 3), K, 0)
    ref, _ = ngram_ids_ref(tokens, offsets, (1, 2, 3), K, 0)
    assert torch.equal(ids, ref)
    assert bool((ids >= 0).all()) and bool((ids < K).all())


# --- ids --------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("orders", ORDERS, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("table", TABLES + [(0, 0), "vocab"], ids=str)
def test_ids_match_reference_bitwise(device, orders, layout, table):
    tokens, offsets = _layout(layout, device)
    if table == "vocab":
        vk, vr, _ = _vocab_for(tokens, offsets, orders)
        kw = dict(num_buckets=0, unigram_rows=0, vocab=(vk, vr))
    else:
        kw = dict(num_buckets=table[1], unigram_rows=table[0])
    ids, id_offsets = ngram_ids(tokens, offsets, orders, **kw)
    ref_ids, ref_offsets = ngram_ids_ref(tokens, offsets, orders, kw["num_buckets"], kw["unigram_rows"],
                                         kw.get("vocab"))
    assert ids.dtype == id_offsets.dtype == torch.int64
    assert id_offsets.shape == offsets.shape
    assert torch.equal(ids, ref_ids)
    assert torch.equal(id_offsets, ref_offsets)


def test_ids_order_is_by_position_then_order():
    tokens, offsets = torch.tensor([5, 6, 7, 8, 9]), torch.tensor([0, 3])
    K = 2 ** 61 + 1
    h = lambda *w: 10 + (ngram_hash_py(w) >> 1) % K  # noqa: E731
    ids, io = ngram_ids(tokens, offsets, (1, 2), K, 10)
    assert io.tolist() == [0, 5]
    assert ids.tolist() == [5, h(5, 6), 6, h(6, 7), 7, 8, h(8, 9), 9]
    # the orders are a set: any listing gives the same ids
    assert torch.equal(ngram_ids(tokens, offsets, (2, 1), K, 10)[0], ids)


def test_raw_keys_build_a_vocabulary():
    """The vocabulary workflow: raw hashes -> torch.unique counts -> table -> ngram_bag."""
    tokens, offsets = _docs([30, 12, 50, 3])
    raw, _ = ngram_ids(tokens, offsets, (1, 2), 0, 0)
    keys, counts = torch.unique(raw, return_counts=True)
    frequent = keys[counts >= 2]
    vk, vr = build_vocab_table(frequent)
    W = torch.randn(frequent.numel(), 8, dtype=torch.float64)
    y = ngram_bag(tokens, offsets, W, (1, 2), "mean", vocab=(vk, vr))
    kept = torch.isin(raw, frequent)
    ids, io = ngram_ids(tokens, offsets, (1, 2), vocab=(vk, vr))
    assert ids.numel() == int(kept.sum())
    torch.testing.assert_close(y, F.embedding_bag(ids, W, io, mode="mean"))


# --- forward ----------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("orders", ORDERS, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("table", TABLES + ["vocab"], ids=str)
@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("D", [1, 3, 17, 256])
def test_forward_matches_embedding_bag_and_reference(device, orders, layout, table, mode, D):
    tokens, offsets = _layout(layout, device)
    if table == "vocab":
        vk, vr, rows = _vocab_for(tokens, offsets, orders)
        kw = dict(vocab=(vk, vr))
        args = (0, 0)
    else:
        rows = table[0] + table[1]
        kw = dict(num_buckets=table[1], unigram_rows=table[0])
        args = (table[1], table[0])
    W = torch.randn(rows, D, device=device)
    y = ngram_bag(tokens, offsets, W, orders, mode, **kw)
    assert y.shape == (offsets.numel(), D) and y.dtype == W.dtype
    ids, io = ngram_ids(tokens, offsets, orders, *args, vocab=kw.get("vocab"))
    n = max(LAYOUTS[layout] + [1]) * len(orders)
    if offsets.numel():
        torch.testing.assert_close(y, F.embedding_bag(ids, W, io, mode=mode), **_tol(n))
    ref = ngram_bag_ref(tokens, offsets, W.double(), orders, mode, vocab=kw.get("vocab"),
                        unigram_rows=kw.get("unigram_rows", 0))
    torch.testing.assert_close(y.double(), ref, **_tol(n))


def test_mean_of_empty_and_fully_dropped_documents_is_zero():
    tokens, offsets = torch.tensor([1, 2, 3, 4]), torch.tensor([0, 0, 1, 4])  # doc 0 empty
    W = torch.randn(10, 4)
    y = ngram_bag(tokens, offsets, W, (2,), "mean", num_buckets=10)
    assert torch.equal(y[0], torch.zeros(4)) and torch.equal(y[1], torch.zeros(4))  # len 1 < order 2
    assert y[2].abs().sum() > 0
    # a vocabulary that knows none of document 2's n-grams
    vk, vr = build_vocab_table(torch.tensor([12345]))
    y = ngram_bag(tokens, offsets, W, (1, 2), "mean", vocab=(vk, vr))
    assert torch.equal(y, torch.zeros(4, 4))


def test_unused_orders_leave_tokens_unchecked_against_unigram_rows():
    """Tokens must be < U only when order 1 maps to row = token."""
    tokens, offsets = torch.tensor([100, 200, 300]), torch.tensor([0])
    W = torch.randn(5 + 7, 3)
    ngram_bag(tokens, offsets, W, (2,), "sum", num_buckets=7, unigram_rows=5)
    with pytest.raises(RuntimeError, match="unigram_rows"):
        ngram_bag(tokens, offsets, W, (1, 2), "sum", num_buckets=7, unigram_rows=5)


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_non_contiguous_inputs(mode):
    tokens, offsets = _docs([7, 0, 12, 3, 1])
    W = torch.randn(8, 97 + VOCAB, dtype=torch.float64).t()  # [rows, 8], column-major
    tok_nc = torch.stack([tokens, tokens], 1)[:, 0]
    off_nc = torch.stack([offsets, offsets], 1)[:, 1]
    assert not (tok_nc.is_contiguous() or off_nc.is_contiguous() or W.is_contiguous())
    y = ngram_bag(tok_nc, off_nc, W, (1, 2, 3), mode, unigram_rows=VOCAB)
    torch.testing.assert_close(y, ngram_bag(tokens, offsets, W.contiguous(), (1, 2, 3), mode, unigram_rows=VOCAB))
    # rows strided in a wider table (read in place), and zero-stride rows
    Wv = torch.randn(97 + VOCAB, 20, dtype=torch.float64)[:, 3:11]
    torch.testing.assert_close(ngram_bag(tokens, offsets, Wv, (1, 2, 3), mode, unigram_rows=VOCAB),
                               ngram_bag(tokens, offsets, Wv.contiguous(), (1, 2, 3), mode, unigram_rows=VOCAB))
    We = torch.randn(1, 8, dtype=torch.float64).expand(97 + VOCAB, 8)
    torch.testing.assert_close(ngram_bag(tokens, offsets, We, (1, 2, 3), mode, unigram_rows=VOCAB),
                               ngram_bag(tokens, offsets, We.contiguous(), (1, 2, 3), mode, unigram_rows=VOCAB))
    ids, io = ngram_ids(tok_nc, off_nc, (1, 2, 3), 97, VOCAB)
    assert torch.equal(ids, ngram_ids(tokens, offsets, (1, 2, 3), 97, VOCAB)[0])
    Wr = W.clone().requires_grad_()
    ngram_bag(tok_nc, off_nc, Wr, (1, 2, 3), mode, unigram_rows=VOCAB).sum().backward()  # expanded grad
    Wd = W.clone().requires_grad_()
    ngram_bag_ref(tokens, offsets, Wd, (1, 2, 3), mode, unigram_rows=VOCAB).sum().backward()
    torch.testing.assert_close(Wr.grad.to_dense(), Wd.grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_accumulates_in_float32(dtype):
    tokens, offsets = _docs([200, 150, 3, 0])
    W = torch.randn(VOCAB + 97, 33).to(dtype)
    y = ngram_bag(tokens, offsets, W, (1, 2, 3), "mean", unigram_rows=VOCAB)
    assert y.dtype == dtype
    ref64 = ngram_bag_ref(tokens, offsets, W.double(), (1, 2, 3), "mean", unigram_rows=VOCAB)
    ids, io = ngram_ids(tokens, offsets, (1, 2, 3), 97, VOCAB)
    torch_err = (F.embedding_bag(ids, W, io, mode="mean").double() - ref64).abs().max()
    assert (y.double() - ref64).abs().max() <= 2 * torch_err + 1e-6
    # backward in the same dtype, summed in float32
    Wr = W.clone().requires_grad_()
    g = torch.randn(4, 33).to(dtype)
    (ngram_bag(tokens, offsets, Wr, (1, 2, 3), "mean", unigram_rows=VOCAB) * g).sum().backward()
    Wd = W.double().requires_grad_()
    (ngram_bag_ref(tokens, offsets, Wd, (1, 2, 3), "mean", unigram_rows=VOCAB) * g.double()).sum().backward()
    assert Wr.grad.dtype == dtype
    torch.testing.assert_close(Wr.grad.to_dense().double(), Wd.grad, rtol=2e-2, atol=2e-2)


def test_large_batch_across_threads_matches_embedding_bag():
    tokens, offsets = _docs(torch.randint(0, 300, (257,)).tolist(), vocab=30000)
    W = torch.randn(30000 + 4099, 64)
    y = ngram_bag(tokens, offsets, W, (1, 2, 3), "mean", unigram_rows=30000)
    ids, io = ngram_ids(tokens, offsets, (1, 2, 3), 4099, 30000)
    torch.testing.assert_close(y, F.embedding_bag(ids, W, io, mode="mean"))


# --- backward ---------------------------------------------------------------------------------

def _dense_grad(tokens, offsets, W, orders, mode, g, kw):
    ids, io = ngram_ids(tokens, offsets, orders, kw.get("num_buckets", 0), kw.get("unigram_rows", 0),
                        vocab=kw.get("vocab"))
    Wd = W.detach().clone().requires_grad_()
    if offsets.numel():
        (F.embedding_bag(ids, Wd, io, mode=mode) * g).sum().backward()
    return Wd.grad if Wd.grad is not None else torch.zeros_like(W)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("orders", ORDERS, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("table", [(0, 97), (VOCAB, 31), "vocab"], ids=str)
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_sparse_backward_matches_embedding_bag(device, orders, layout, table, mode):
    tokens, offsets = _layout(layout, device)
    if table == "vocab":
        vk, vr, rows = _vocab_for(tokens, offsets, orders)
        kw = dict(vocab=(vk, vr))
    else:
        rows = table[0] + table[1]
        kw = dict(num_buckets=table[1], unigram_rows=table[0])
    W = torch.randn(rows, 17, device=device, dtype=torch.float64, requires_grad=True)
    g = torch.randn(offsets.numel(), 17, device=device, dtype=torch.float64)
    # torch.autograd.grad hands over the op's gradient as is; W.grad would lose the coalesced
    # flag in autograd's AccumulateGrad (pytorch/pytorch#105916), though not the layout
    (grad,) = torch.autograd.grad((ngram_bag(tokens, offsets, W, orders, mode, **kw) * g).sum(), [W])
    assert grad.is_sparse and grad.is_coalesced() and grad.shape == W.shape
    idx = grad.indices()[0]
    assert bool((idx[1:] > idx[:-1]).all()), "row indices must be unique and ascending"
    torch.testing.assert_close(grad.to_dense(), _dense_grad(tokens, offsets, W, orders, mode, g, kw))
    # exactly the rows some kept n-gram hits
    ids, _ = ngram_ids(tokens, offsets, orders, kw.get("num_buckets", 0), kw.get("unigram_rows", 0),
                       vocab=kw.get("vocab"))
    assert torch.equal(idx, torch.unique(ids))


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_dense_backward_option(mode):
    tokens, offsets = _docs([9, 4, 0, 13])
    W = torch.randn(VOCAB + 13, 6, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, 6, dtype=torch.float64)
    (ngram_bag(tokens, offsets, W, (1, 2), mode, unigram_rows=VOCAB, sparse=False) * g).sum().backward()
    assert not W.grad.is_sparse
    kw = dict(num_buckets=13, unigram_rows=VOCAB)
    torch.testing.assert_close(W.grad, _dense_grad(tokens, offsets, W, (1, 2), mode, g, kw))


def test_backward_is_bitwise_deterministic_across_thread_counts():
    tokens, offsets = _docs(torch.randint(0, 200, (300,)).tolist(), vocab=2000)
    W = torch.randn(2000 + 501, 40)
    g = torch.randn(300, 40)
    prev = torch.get_num_threads()
    res = []
    try:
        for threads in (1, 2, 1, 2):
            torch.set_num_threads(threads)
            Wr = W.clone().requires_grad_()
            y = ngram_bag(tokens, offsets, Wr, (1, 2, 3), "mean", unigram_rows=2000)
            y.backward(g)
            res.append((y, Wr.grad._indices(), Wr.grad._values()))
    finally:
        torch.set_num_threads(prev)
    for y, i, v in res[1:]:
        assert torch.equal(y, res[0][0]) and torch.equal(i, res[0][1]) and torch.equal(v, res[0][2])


def test_large_gradient_from_the_buffer_pool():
    """Values of >= 16 MB come from reused blocks: a gradient kept alive is never overwritten by
    the next backward, freed ones are reused, and accumulation into .grad still works."""
    tokens, offsets = _docs([120] * 300, vocab=30000)
    W = torch.randn(30000 + 100003, 256)
    g = torch.randn(300, 256)
    dense = _dense_grad(tokens, offsets, W, (1, 2, 3), "mean", g, dict(num_buckets=100003, unigram_rows=30000))

    def grad_once():
        Wr = W.clone().requires_grad_()
        (gw,) = torch.autograd.grad(ngram_bag(tokens, offsets, Wr, (1, 2, 3), "mean", unigram_rows=30000), [Wr], g)
        return gw

    first = grad_once()
    assert first.values().numel() * 4 >= 16 << 20
    kept = first.values().clone()
    second = grad_once()  # `first` is alive: a different block
    assert first.values().data_ptr() != second.values().data_ptr()
    assert torch.equal(first.values(), kept) and torch.equal(second.values(), kept)
    torch.testing.assert_close(second.to_dense(), dense)
    del first, second
    for _ in range(2):  # freed blocks come back
        torch.testing.assert_close(grad_once().to_dense(), dense)
    Wr = W.clone().requires_grad_()
    for _ in range(2):  # gradient accumulation into .grad (sparse + sparse)
        ngram_bag(tokens, offsets, Wr, (1, 2, 3), "mean", unigram_rows=30000).backward(g)
    torch.testing.assert_close(Wr.grad.to_dense(), 2 * dense)


def test_backward_op_returns_sorted_unique_rows():
    tokens, offsets = _docs([20, 30, 1, 0])
    g = torch.randn(4, 5)
    rows, values = torch.ops.effnlp._ngram_bag_backward(g, tokens, offsets, [1, 2], 7, VOCAB, 0, VOCAB + 7,
                                                        None, None)
    assert rows.dtype == torch.int64 and values.shape == (rows.numel(), 5)
    assert bool((rows[1:] > rows[:-1]).all())
    # zero-stride (expanded) grad
    ge = torch.randn(1, 5).expand(4, 5)
    r2, v2 = torch.ops.effnlp._ngram_bag_backward(ge, tokens, offsets, [1, 2], 7, VOCAB, 1, VOCAB + 7, None, None)
    r3, v3 = torch.ops.effnlp._ngram_bag_backward(ge.contiguous(), tokens, offsets, [1, 2], 7, VOCAB, 1,
                                                  VOCAB + 7, None, None)
    assert torch.equal(r2, r3) and torch.equal(v2, v3)


def test_sparse_adam_step():
    tokens, offsets = _docs([10, 25, 7])
    W0 = torch.randn(VOCAB + 61, 8)
    emb = torch.nn.Parameter(W0.clone())
    ref = torch.nn.Parameter(W0.clone())
    opt, opt_ref = torch.optim.SparseAdam([emb], lr=0.1), torch.optim.SparseAdam([ref], lr=0.1)
    ids, io = ngram_ids(tokens, offsets, (1, 2, 3), 61, VOCAB)
    for _ in range(3):
        opt.zero_grad()
        opt_ref.zero_grad()
        ngram_bag(tokens, offsets, emb, (1, 2, 3), "mean", unigram_rows=VOCAB).pow(2).sum().backward()
        F.embedding_bag(ids, ref, io, mode="mean", sparse=True).pow(2).sum().backward()
        opt.step()
        opt_ref.step()
    torch.testing.assert_close(emb.detach(), ref.detach())
    untouched = torch.ones(W0.shape[0], dtype=torch.bool)
    untouched[ids] = False
    assert torch.equal(emb.detach()[untouched], W0[untouched])


def test_restore_coalesced_flag():
    """W.grad loses the coalesced flag in AccumulateGrad (pytorch/pytorch#105916); the helper
    restores it only where the indices prove it (strictly increasing)."""
    tokens, offsets = _docs([10, 25, 7])
    W = torch.randn(VOCAB + 61, 8, requires_grad=True)
    ngram_bag(tokens, offsets, W, (1, 2, 3), unigram_rows=VOCAB).sum().backward()
    assert not W.grad.is_coalesced()
    before = W.grad._values().clone()
    assert restore_coalesced_flag(W) and W.grad.is_coalesced()
    assert torch.equal(W.grad.values(), before)
    # an uncoalesced gradient (embedding_bag's, with repeated rows) is left alone
    W2 = torch.randn(VOCAB + 61, 8, requires_grad=True)
    ids, io = ngram_ids(tokens, offsets, (1, 2, 3), 61, VOCAB)
    F.embedding_bag(ids, W2, io, sparse=True).sum().backward()
    assert not restore_coalesced_flag(W2) and not W2.grad.is_coalesced()
    assert not restore_coalesced_flag(torch.zeros(3, requires_grad=True))


def test_empty_batch_backward():
    W = torch.randn(11, 3, requires_grad=True)
    y = ngram_bag(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), W, (1, 2),
                  num_buckets=11)
    assert y.shape == (0, 3)
    y.sum().backward()
    assert W.grad.is_sparse and W.grad._nnz() == 0
    W.grad = None
    ngram_bag(torch.tensor([1]), torch.tensor([0, 1]), W, (2,), num_buckets=11, sparse=False).sum().backward()
    assert torch.equal(W.grad, torch.zeros(11, 3))


@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("table", [(0, 5), (6, 3), "vocab"], ids=str)
def test_gradcheck_float64_dense(mode, table):
    tokens, offsets = _docs([4, 0, 2, 5], vocab=6)
    if table == "vocab":
        vk, vr, rows = _vocab_for(tokens, offsets, (1, 2))
        kw = dict(vocab=(vk, vr))
    else:
        rows = table[0] + table[1]
        kw = dict(num_buckets=table[1], unigram_rows=table[0])
    W = torch.randn(rows, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w: ngram_bag(tokens, offsets, w, (1, 2), mode, sparse=False, **kw), [W])


def test_only_weight_gets_a_gradient():
    tokens, offsets = _docs([5, 6])
    W = torch.randn(VOCAB + 3, 2, requires_grad=True)
    y = ngram_bag(tokens, offsets, W, (1, 2), unigram_rows=VOCAB)
    (gw,) = torch.autograd.grad(y.sum(), [W])
    assert gw.is_sparse
    # a frozen table: no backward op runs, nothing to differentiate
    assert not ngram_bag(tokens, offsets, W.detach(), (1, 2), unigram_rows=VOCAB).requires_grad


# --- opcheck, fake tensors, torch.compile ----------------------------------------------------

# All of opcheck's utils apply, the AOT-dispatch one included: ngram_ids and
# _ngram_bag_backward have data-dependent output sizes, which their fake kernels express as
# unbacked sizes (torch.library.get_ctx().new_dynamic_size()), and the sparse gradient of
# ngram_bag traces through AOT autograd. The outputs are deterministic, so eager and traced
# results compare exactly.

def test_opcheck_ngram_bag():
    tokens, offsets = _docs([6, 0, 3, 11])
    W = torch.randn(VOCAB + 29, 5, requires_grad=True)
    for sparse in (False, True):
        torch.library.opcheck(torch.ops.effnlp.ngram_bag,
                              (tokens, offsets, W, [1, 2, 3], 29, VOCAB, 1, None, None, sparse))
    vk, vr, rows = _vocab_for(tokens, offsets, [1, 2])
    Wv = torch.randn(rows, 4, requires_grad=True)
    torch.library.opcheck(torch.ops.effnlp.ngram_bag, (tokens, offsets, Wv, [1, 2], 0, 0, 0, vk, vr, False))


def test_opcheck_ngram_ids_and_backward():
    tokens, offsets = _docs([6, 0, 3, 11])
    vk, vr, _ = _vocab_for(tokens, offsets, [1, 2])
    for args in ((tokens, offsets, [1, 2, 3], 29, VOCAB, None, None), (tokens, offsets, [2], 0, 0, None, None),
                 (tokens, offsets, [1, 2], 0, 0, vk, vr)):
        torch.library.opcheck(torch.ops.effnlp.ngram_ids, args)
    g = torch.randn(4, 5)
    torch.library.opcheck(torch.ops.effnlp._ngram_bag_backward,
                          (g, tokens, offsets, [1, 2, 3], 29, VOCAB, 1, VOCAB + 29, None, None))


def test_fake_tensor_shapes_and_errors():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    with FakeTensorMode(shape_env=ShapeEnv()):
        tokens = torch.zeros(10, dtype=torch.int64)
        offsets = torch.zeros(3, dtype=torch.int64)
        y = torch.ops.effnlp.ngram_bag(tokens, offsets, torch.randn(40, 7), [1, 2], 40, 0, 1)
        assert y.shape == (3, 7)
        ids, io = torch.ops.effnlp.ngram_ids(tokens, offsets, [1, 2], 40, 0)
        assert io.shape == (3,) and ids.dim() == 1
        with pytest.raises(RuntimeError, match="weight has 41 rows"):
            torch.ops.effnlp.ngram_bag(tokens, offsets, torch.randn(41, 7), [1, 2], 40, 0, 1)


def test_torch_compile_fullgraph_aot_eager():
    tokens, offsets = _docs([7, 0, 19, 4])
    W = torch.randn(VOCAB + 37, 6)
    lin = torch.nn.Linear(6, 2)

    def f(tokens, offsets, w):
        return lin(torch.tanh(ngram_bag(tokens, offsets, w, (1, 2, 3), "mean", unigram_rows=VOCAB,
                                        sparse=False)))

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    Wc, We = W.clone().requires_grad_(), W.clone().requires_grad_()
    yc, ye = compiled(tokens, offsets, Wc), f(tokens, offsets, We)
    torch.testing.assert_close(yc, ye)
    yc.sum().backward()
    ye.sum().backward()
    torch.testing.assert_close(Wc.grad, We.grad)


def test_torch_compile_sparse_gradient():
    tokens, offsets = _docs([7, 0, 19, 4])
    W = torch.randn(VOCAB + 37, 6)
    f = lambda t, o, w: ngram_bag(t, o, w, (1, 2, 3), "sum", unigram_rows=VOCAB).square().sum()  # noqa: E731
    Wc, We = W.clone().requires_grad_(), W.clone().requires_grad_()
    torch.compile(f, fullgraph=True, backend="aot_eager")(tokens, offsets, Wc).backward()
    f(tokens, offsets, We).backward()
    assert Wc.grad.is_sparse
    torch.testing.assert_close(Wc.grad.to_dense(), We.grad.to_dense())


def test_torch_compile_inductor_forward():
    tokens, offsets = _docs([7, 0, 19, 4])
    W = torch.randn(VOCAB + 37, 6)
    f = lambda t, o: torch.relu(ngram_bag(t, o, W, (1, 2), "mean", unigram_rows=VOCAB)) * 2  # noqa: E731
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(tokens, offsets), f(tokens, offsets))


# --- bad input --------------------------------------------------------------------------------

def _ok():
    return torch.tensor([1, 2, 3, 4]), torch.tensor([0, 2]), torch.randn(10, 3)


@pytest.mark.parametrize("make,match", [
    (lambda t, o, w: (t.int(), o, w, (1, 2), 10, 0, 1), "tokens must be an int64"),
    (lambda t, o, w: (t, o.int(), w, (1, 2), 10, 0, 1), "offsets must be an int64"),
    (lambda t, o, w: (t[None], o, w, (1, 2), 10, 0, 1), "tokens must be 1-D"),
    (lambda t, o, w: (t, o[None], w, (1, 2), 10, 0, 1), "offsets must be 1-D"),
    (lambda t, o, w: (t, torch.tensor([0, 3, 2]), w, (1, 2), 10, 0, 1), "non-decreasing"),
    (lambda t, o, w: (t, torch.tensor([1, 2]), w, (1, 2), 10, 0, 1), r"offsets\[0\] must be 0"),
    (lambda t, o, w: (t, torch.tensor([0, 5]), w, (1, 2), 10, 0, 1), "past the end"),
    (lambda t, o, w: (torch.tensor([1, -2, 3]), o, w, (1, 2), 10, 0, 1), "must be >= 0"),
    (lambda t, o, w: (t, o, torch.randn(12, 3), (1, 2), 8, 4, 1), "token id 4 >= unigram_rows"),
    (lambda t, o, w: (t, o, w, (1, 2), 9, 0, 1), "weight has 10 rows"),
    (lambda t, o, w: (t, o, w, (), 10, 0, 1), "orders must not be empty"),
    (lambda t, o, w: (t, o, w, (0, 1), 10, 0, 1), "order must be in"),
    (lambda t, o, w: (t, o, w, (2, 2), 10, 0, 1), "distinct"),
    (lambda t, o, w: (t, o, w, (1, 2), 10, 0, 2), "mode must be 0"),
    (lambda t, o, w: (t, o, w.int(), (1, 2), 10, 0, 1), "floating-point"),
    (lambda t, o, w: (t, o, w[None], (1, 2), 10, 0, 1), "weight must be 2-D"),
    (lambda t, o, w: (t, o, torch.randn(10, 3, device="meta"), (1, 2), 10, 0, 1), "device"),
    (lambda t, o, w: (t, o, torch.randn(5, 3), (1, 2), 0, 5, 1), "num_buckets must be > 0"),
    (lambda t, o, w: (t, o, w, (1, 2), 10, 0, 1, torch.full((3,), -1), torch.zeros(3, dtype=torch.int64)),
     "power of two"),
    (lambda t, o, w: (t, o, w, (1, 2), 10, 0, 1, torch.full((4,), -1), None), "given together"),
    (lambda t, o, w: (t, o, w, (1, 2), 10, 0, 1, torch.full((4,), -1), torch.zeros(4, dtype=torch.int64)),
     "must be 0"),
])
def test_bad_input_raises(make, match):
    args = make(*_ok())
    with pytest.raises(RuntimeError, match=match):
        torch.ops.effnlp.ngram_bag(*args)


def test_bad_input_names_the_op():
    t, o, w = _ok()
    with pytest.raises(RuntimeError, match="^ngram_bag: "):
        torch.ops.effnlp.ngram_bag(t, o, w, [1], 9, 0, 1)
    with pytest.raises(RuntimeError, match="^ngram_ids: num_buckets must be > 0"):
        torch.ops.effnlp.ngram_ids(t, o, [1, 2], 0, 5)
    with pytest.raises(RuntimeError, match="^_ngram_bag_backward: grad must be"):
        torch.ops.effnlp._ngram_bag_backward(torch.randn(3, 2), t, o, [1], 10, 0, 1, 10, None, None)
    with pytest.raises(RuntimeError, match="^_ngram_bag_backward: num_weights"):
        torch.ops.effnlp._ngram_bag_backward(torch.randn(2, 2), t, o, [1], 10, 0, 1, 11, None, None)


def test_vocab_rows_out_of_range_raise():
    t, o, _ = _ok()
    raw, _ = ngram_ids(t, o, (1,), 0, 0)
    vk, vr = build_vocab_table(raw[:1], torch.tensor([99]))
    with pytest.raises(RuntimeError, match="outside the table"):
        ngram_bag(t, o, torch.randn(10, 2), (1,), vocab=(vk, vr))


def test_python_wrapper_errors():
    t, o, w = _ok()
    with pytest.raises(ValueError, match="mode"):
        ngram_bag(t, o, w, (1,), mode="max")
    vk, vr = build_vocab_table(torch.tensor([5, 6]))
    with pytest.raises(ValueError, match="vocabulary"):
        ngram_bag(t, o, w, (1,), vocab=(vk, vr), num_buckets=10)


# --- the vocabulary table ---------------------------------------------------------------------

def test_build_vocab_table_finds_every_key_and_no_other():
    gen = torch.Generator().manual_seed(1)
    keys = torch.unique(torch.randint(-2 ** 63, 2 ** 63 - 1, (3000,), generator=gen))
    # plus a cluster sharing one home slot, forcing long probes and wrap-around
    keys = torch.cat([keys, torch.arange(1, 40) * 8192 - 1])
    rows = torch.randperm(keys.numel(), generator=gen)
    vk, vr = build_vocab_table(keys, rows)
    T = vk.numel()
    assert T & (T - 1) == 0 and T >= 2 * keys.numel()
    assert int((vk != NGRAM_EMPTY_KEY).sum()) == keys.numel()
    assert torch.equal(vocab_lookup_ref(keys, vk, vr), rows)
    absent = torch.randint(-2 ** 63, 2 ** 63 - 1, (500,), generator=gen)
    absent = absent[~torch.isin(absent, keys)]
    assert bool((vocab_lookup_ref(absent, vk, vr) == -1).all())
    assert int(vocab_lookup_ref(torch.tensor([NGRAM_EMPTY_KEY]), vk, vr)) == -1


def test_build_vocab_table_rejects_bad_keys():
    with pytest.raises(ValueError, match="distinct"):
        build_vocab_table(torch.tensor([3, 3]))
    with pytest.raises(ValueError, match="empty-slot"):
        build_vocab_table(torch.tensor([NGRAM_EMPTY_KEY]))
    vk, vr = build_vocab_table(torch.zeros(0, dtype=torch.int64))
    assert vk.numel() == 1 and int(vk[0]) == NGRAM_EMPTY_KEY


# --- property test ----------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(0, 12), min_size=0, max_size=6),
       orders=st.sets(st.integers(1, 5), min_size=1, max_size=3),
       U=st.sampled_from([0, 8]), K=st.integers(1, 40), mode=st.sampled_from(["sum", "mean"]),
       vocab=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_property_matches_reference(lengths, orders, U, K, mode, vocab, seed):
    gen = torch.Generator().manual_seed(seed)
    tokens, offsets = _docs(lengths, vocab=8, gen=gen)
    orders = sorted(orders)
    if vocab:
        vk, vr, rows = _vocab_for(tokens, offsets, orders, keep_every=3)
        kw, args = dict(vocab=(vk, vr)), (0, 0)
    else:
        rows = U + K
        kw, args = dict(num_buckets=K, unigram_rows=U), (K, U)
    ids, io = ngram_ids(tokens, offsets, orders, *args, vocab=kw.get("vocab"))
    rids, rio = ngram_ids_ref(tokens, offsets, orders, *args, kw.get("vocab"))
    assert torch.equal(ids, rids) and torch.equal(io, rio)
    W = torch.randn(rows, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    Wd = W.detach().clone().requires_grad_()
    y = ngram_bag(tokens, offsets, W, orders, mode, **kw)
    r = ngram_bag_ref(tokens, offsets, Wd, orders, mode, vocab=kw.get("vocab"), unigram_rows=U if not vocab else 0)
    torch.testing.assert_close(y, r)
    g = torch.randn(y.shape, dtype=torch.float64, generator=gen)
    y.backward(g)
    r.backward(g)
    torch.testing.assert_close(W.grad.to_dense(), Wd.grad)


# --- CUDA -------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("table", [(0, 97), (VOCAB, 31), "vocab"], ids=str)
@pytest.mark.parametrize("D", [1, 17, 256, 300])
def test_cuda_matches_cpu(dtype, table, D):
    tokens, offsets = _docs([40, 0, 3, 1, 17, 250])
    if table == "vocab":
        vk, vr, rows = _vocab_for(tokens, offsets, (1, 2, 3))
        kw = dict(vocab=(vk, vr))
        kwc = dict(vocab=(vk.cuda(), vr.cuda()))
    else:
        rows = table[0] + table[1]
        kw = kwc = dict(num_buckets=table[1], unigram_rows=table[0])
    W = torch.randn(rows, D).to(dtype)
    tc, oc, Wc = tokens.cuda(), offsets.cuda(), W.cuda().requires_grad_()
    ids, io = ngram_ids(tokens, offsets, (1, 2, 3), kw.get("num_buckets", 0), kw.get("unigram_rows", 0),
                        vocab=kw.get("vocab"))
    idc, ioc = ngram_ids(tc, oc, (1, 2, 3), kw.get("num_buckets", 0), kw.get("unigram_rows", 0),
                         vocab=kwc.get("vocab"))
    assert torch.equal(idc.cpu(), ids) and torch.equal(ioc.cpu(), io)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype in (torch.float16, torch.bfloat16) else dict(rtol=1e-5, atol=1e-5)
    for mode in ("sum", "mean"):
        y = ngram_bag(tc, oc, Wc, (1, 2, 3), mode, **kwc)
        ref = ngram_bag_ref(tokens, offsets, W.double(), (1, 2, 3), mode, vocab=kw.get("vocab"),
                            unigram_rows=kw.get("unigram_rows", 0))
        torch.testing.assert_close(y.double().cpu(), ref, **tol)
        g = torch.randn(y.shape, device="cuda").to(dtype)
        (gw,) = torch.autograd.grad(y, [Wc], g)
        assert gw.is_sparse and gw.is_coalesced()
        idx = gw.indices()[0]
        assert bool((idx[1:] > idx[:-1]).all())
        Wd = W.double().requires_grad_()
        (ngram_bag_ref(tokens, offsets, Wd, (1, 2, 3), mode, vocab=kw.get("vocab"),
                       unigram_rows=kw.get("unigram_rows", 0)) * g.double().cpu()).sum().backward()
        torch.testing.assert_close(gw.to_dense().double().cpu(), Wd.grad, **tol)


@pytest.mark.cuda
def test_cuda_backward_is_deterministic():
    tokens, offsets = _docs(torch.randint(0, 300, (500,)).tolist(), vocab=3000)
    tc, oc = tokens.cuda(), offsets.cuda()
    g = torch.randn(500, 64, device="cuda")
    outs = [torch.ops.effnlp._ngram_bag_backward(g, tc, oc, [1, 2, 3], 1001, 3000, 1, 4001, None, None)
            for _ in range(3)]
    for r, v in outs[1:]:
        assert torch.equal(r, outs[0][0]) and torch.equal(v, outs[0][1])


@pytest.mark.cuda
def test_cuda_bad_input_raises():
    t, o = torch.tensor([1, -2, 3], device="cuda"), torch.tensor([0], device="cuda")
    with pytest.raises(RuntimeError, match="must be >= 0"):
        ngram_bag(t, o, torch.randn(10, 2, device="cuda"), (1, 2), num_buckets=10)
    with pytest.raises(RuntimeError, match="device"):
        ngram_bag(t.cpu(), o.cpu(), torch.randn(10, 2, device="cuda"), (1, 2), num_buckets=10)


def test_cuda_kernel_registered_when_built_with_cuda():
    if torch.version.cuda is None:
        pytest.skip("CPU-only torch: CUDA kernels are checked by `make cuda-check`")
    for op in ("ngram_bag", "ngram_ids", "_ngram_bag_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"effnlp::{op}", "CUDA")
