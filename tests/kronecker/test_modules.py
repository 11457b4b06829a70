"""KronLinear and KronEmbedding: exactness, gradients, state dicts and padding."""
import pytest
import torch
from torch import nn

from effnlp_ext.kronecker import DEFAULT_MIN_SPEEDUP, KronEmbedding, KronLinear, kron_flops
from effnlp_ext.reference import kron_weight


def _kron_linear_layer(shapes=(4, 2, 8, 16), rank=1):
    m1, n1, m2, n2 = shapes
    lin = nn.Linear(n1 * n2, m1 * m2)
    with torch.no_grad():
        lin.weight.copy_(kron_weight(torch.randn(rank, m1, n1), torch.randn(rank, m2, n2)))
    return lin


def test_from_linear_equals_linear_when_exact():
    lin = _kron_linear_layer()
    x = torch.randn(5, 3, 32)
    kl = KronLinear.from_linear(lin, shapes=(4, 2, 8, 16))
    assert kl.rel_error < 1e-6 and kl.compression_factor == pytest.approx(1024 / 136)
    torch.testing.assert_close(kl(x), lin(x), rtol=1e-5, atol=1e-5)
    searched = KronLinear.from_linear(lin, cf=4)
    assert searched.rel_error < 1e-5 and searched.compression_factor >= 4
    assert searched.choice in searched.candidates
    torch.testing.assert_close(searched(x), lin(x), rtol=1e-4, atol=1e-4)


def test_from_linear_meets_the_flops_floor():
    lin = nn.Linear(48, 64)
    kl = KronLinear.from_linear(lin, cf=2)
    assert kl.flops_ratio >= DEFAULT_MIN_SPEEDUP and kl.compression_factor >= 2
    assert all(c.flops_ratio >= DEFAULT_MIN_SPEEDUP for c in kl.candidates)
    assert kl.flops_per_token == kron_flops(kl.shapes, kl.rank)
    assert kl.flops_ratio == pytest.approx(2 * 48 * 64 / kl.flops_per_token)
    free = KronLinear.from_linear(lin, cf=2, min_speedup=None)
    assert free.flops_ratio < DEFAULT_MIN_SPEEDUP <= kl.flops_ratio
    assert free.rel_error <= kl.rel_error
    with pytest.raises(ValueError, match="best flops_ratio available"):
        KronLinear.from_linear(lin, cf=2, min_speedup=1e3)
    # fixed shapes are taken as given, whatever their FLOPs
    slow = KronLinear.from_linear(lin, shapes=(8, 6, 8, 8), rank=8)
    assert slow.flops_ratio < 1 and "flops_ratio=" in repr(slow)


def test_from_linear_needs_cf_or_shapes():
    with pytest.raises(ValueError, match="shapes or cf"):
        KronLinear.from_linear(nn.Linear(8, 8))


def test_grads_match_dense_reference():
    kl = KronLinear(12, 6, (2, 3, 3, 4), rank=2, dtype=torch.float64)
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    kl(x).pow(2).sum().backward()
    grads = [x.grad, kl.A.grad, kl.B.grad, kl.bias.grad]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    A, B, b = (t.detach().clone().requires_grad_() for t in (kl.A, kl.B, kl.bias))
    x2 = x.detach().clone().requires_grad_()
    (x2 @ kron_weight(A, B).T + b).pow(2).sum().backward()
    for got, want in zip(grads, [x2.grad, A.grad, B.grad, b.grad]):
        torch.testing.assert_close(got, want)


def test_weight_state_dict_round_trip_and_repr():
    kl = KronLinear.from_linear(nn.Linear(32, 24), shapes=(4, 8, 6, 4), rank=2)
    assert set(kl.state_dict()) == {"A", "B", "bias"}
    torch.testing.assert_close(kl.weight, kron_weight(kl.A, kl.B))
    fresh = KronLinear(32, 24, (4, 8, 6, 4), rank=2)
    fresh.load_state_dict(kl.state_dict())
    x = torch.randn(3, 32)
    assert torch.equal(fresh(x), kl(x))
    assert "A=2x4x8" in repr(kl) and "cf=" in repr(kl)


def test_no_bias_and_init_scale():
    kl = KronLinear(256, 128, (16, 16, 8, 16), rank=2, bias=False)
    assert kl.bias is None and "bias" not in kl.state_dict()
    # the dense weight has nn.Linear's variance 1 / (3 * in_features)
    assert kl.weight.var().item() == pytest.approx(1 / (3 * 256), rel=0.2)
    assert kl(torch.randn(2, 256)).shape == (2, 128)


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="do not divide"):
        KronLinear(10, 12, (3, 2, 4, 4))
    with pytest.raises(ValueError, match="must divide"):
        KronEmbedding(10, 12, n=5)
    with pytest.raises(ValueError, match="rank"):
        KronEmbedding(10, 12, n=2, rank=3)


def test_embedding_matches_dense_kron_table():
    emb = KronEmbedding(50, 12, n=3, rank=2)
    table = kron_weight(emb.A, emb.B)
    assert table.shape == (50, 12)
    ids = torch.randint(0, 50, (4, 9))
    torch.testing.assert_close(emb(ids), table[ids])
    torch.testing.assert_close(emb.weight, table)
    assert emb.compression_factor == pytest.approx(600 / (2 * (50 * 4 + 3)))


def test_embedding_from_embedding():
    dense = nn.Embedding(40, 8, padding_idx=0)
    lossless = KronEmbedding.from_embedding(dense, n=2, rank=2)
    assert lossless.rel_error < 1e-5 and lossless.padding_idx == 0
    ids = torch.randint(0, 40, (3, 5))
    torch.testing.assert_close(lossless(ids), dense(ids), rtol=1e-5, atol=1e-5)
    lossy = KronEmbedding.from_embedding(dense, n=4, rank=1)
    assert 0 < lossy.rel_error < 1
    with pytest.raises(ValueError, match="must divide"):
        KronEmbedding.from_embedding(dense, n=3)


def test_embedding_padding_idx_like_nn_embedding():
    fresh = KronEmbedding(20, 6, n=2, padding_idx=3)
    assert torch.all(fresh.weight[3] == 0)
    assert KronEmbedding(20, 6, n=2, padding_idx=-1).padding_idx == 19
    # a non-zero padding row (e.g. from a pretrained table): output is that row, and lookups of
    # the padding index contribute no gradient, as in nn.Embedding
    emb = KronEmbedding(20, 6, n=2, rank=2, padding_idx=3)
    ids = torch.tensor([[1, 3, 5, 3], [3, 3, 2, 7]])
    out = emb(ids)
    torch.testing.assert_close(out, emb.weight.detach()[ids])
    weights = torch.randn(out.shape)
    (out * weights).sum().backward()
    assert torch.all(emb.A.grad[:, 3] == 0)
    keep = ids != 3
    A, B = emb.A.detach().clone().requires_grad_(), emb.B.detach().clone().requires_grad_()
    (kron_weight(A, B)[ids[keep]] * weights[keep]).sum().backward()
    torch.testing.assert_close(emb.A.grad, A.grad)
    torch.testing.assert_close(emb.B.grad, B.grad)
