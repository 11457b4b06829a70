"""Nearest Kronecker sum, factor-shape enumeration and search, and the paper's presets."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch.utils.flop_counter import FlopCounterMode

from effnlp_ext.kronecker import (choose_factor_shapes, kron_factor_shapes, kron_flops,
                                  kron_params, kroneckerbert_shapes, nearest_kronecker)
from effnlp_ext.reference import kron_weight


def _random_kron_sum(rank, m1, n1, m2, n2, dtype=torch.float64):
    return kron_weight(torch.randn(rank, m1, n1, dtype=dtype), torch.randn(rank, m2, n2, dtype=dtype))


@pytest.mark.parametrize("rank,shapes", [(1, (4, 3, 5, 2)), (3, (6, 4, 3, 8)), (2, (1, 7, 9, 2))])
def test_exact_recovery_of_a_kronecker_sum(rank, shapes):
    W = _random_kron_sum(rank, *shapes)
    A, B, err = nearest_kronecker(W, *shapes, rank=rank)
    assert A.shape == (rank, shapes[0], shapes[1]) and B.shape == (rank, shapes[2], shapes[3])
    assert err < 1e-10
    torch.testing.assert_close(kron_weight(A, B), W, rtol=0, atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(m1=st.integers(1, 5), n1=st.integers(1, 5), m2=st.integers(1, 5), n2=st.integers(1, 5),
       rank=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_exact_recovery_property(m1, n1, m2, n2, rank, seed):
    rank = min(rank, m1 * n1, m2 * n2)
    torch.manual_seed(seed)
    W = _random_kron_sum(rank, m1, n1, m2, n2)
    A, B, err = nearest_kronecker(W, m1, n1, m2, n2, rank=rank)
    assert err < 1e-9
    torch.testing.assert_close(kron_weight(A, B), W, rtol=0, atol=1e-9 * (1 + W.abs().max()))


def test_error_non_increasing_in_rank_and_matches_singular_values():
    W = torch.randn(24, 20, dtype=torch.float64)
    shapes = (4, 5, 6, 4)
    errors = [nearest_kronecker(W, *shapes, rank=r)[2] for r in range(1, 21)]
    assert all(b <= a + 1e-12 for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 1e-10  # full rank of R(W) (20 = min(4*5, 6*4)) is exact
    _, candidates = choose_factor_shapes(W, cf=0.1, max_rank=None, max_svds=10_000)
    from_svals = {c.rank: c.rel_error for c in candidates if c.shapes == shapes}
    for r, err in enumerate(errors, start=1):
        assert from_svals[r] == pytest.approx(err, abs=1e-7)


def test_dtype_and_device_follow_w():
    W = torch.randn(6, 8)
    A, B, err = nearest_kronecker(W, 2, 2, 3, 4)
    assert A.dtype == B.dtype == torch.float32 and 0 < err < 1


def test_bad_factor_sizes_raise():
    W = torch.randn(12, 10)
    with pytest.raises(ValueError, match="do not divide"):
        nearest_kronecker(W, 5, 2, 2, 5)
    with pytest.raises(ValueError, match="do not divide"):
        nearest_kronecker(W, 3, 3, 4, 3)
    with pytest.raises(ValueError, match="rank must lie"):
        nearest_kronecker(W, 2, 2, 6, 5, rank=5)
    with pytest.raises(ValueError, match="2-D"):
        nearest_kronecker(torch.randn(2, 3, 4), 1, 1, 3, 4)
    with pytest.raises(ValueError, match="positive"):
        kron_factor_shapes(0, 4)


def test_factor_shapes_enumeration():
    shapes = kron_factor_shapes(12, 8)
    assert all(m1 * m2 == 12 and n1 * n2 == 8 for m1, n1, m2, n2 in shapes)
    assert len(set(shapes)) == len(shapes)
    assert (1, 1, 12, 8) not in shapes and (12, 8, 1, 1) not in shapes   # scalar factor
    assert (1, 8, 12, 1) not in shapes and (12, 1, 1, 8) not in shapes   # plain low rank
    assert (3, 2, 4, 4) in shapes
    everything = kron_factor_shapes(12, 8, nontrivial=False)
    assert len(everything) == 6 * 4 and set(shapes) < set(everything)


@pytest.mark.parametrize("cf", [1.5, 2, 4, 8])
def test_shape_search_reaches_target_cf(cf):
    W = torch.randn(64, 48)
    choice, candidates = choose_factor_shapes(W, cf, max_rank=4)
    assert choice.cf >= cf and choice in candidates
    assert all(c.cf >= cf and c.rank <= 4 for c in candidates)
    assert choice.rel_error == min(c.rel_error for c in candidates)
    assert choice.params == kron_params(choice.shapes, choice.rank)
    A, B, err = nearest_kronecker(W, *choice.shapes, rank=choice.rank)
    assert err == pytest.approx(choice.rel_error, abs=1e-6)


def test_shape_search_finds_the_true_structure():
    W = _random_kron_sum(2, 4, 6, 8, 4, dtype=torch.float32)
    choice, _ = choose_factor_shapes(W, cf=4)
    assert choice.rel_error < 1e-5 and choice.cf >= 4


def test_shape_search_options_and_errors():
    W = torch.randn(64, 48)
    _, candidates = choose_factor_shapes(W, 2, rank=2)
    assert {c.rank for c in candidates} == {2}
    # on a larger weight the cap on costly SVDs binds
    big = torch.randn(256, 256)
    n_shapes = [len({c.shapes for c in choose_factor_shapes(big, 4, max_svds=k)[1]})
                for k in (3, 4)]
    assert n_shapes[1] == n_shapes[0] + 1
    with pytest.raises(ValueError, match="reaches cf"):
        choose_factor_shapes(W, cf=1e5)
    with pytest.raises(ValueError, match="cf must be positive"):
        choose_factor_shapes(W, cf=0)


def test_flops_ratio_against_a_hand_count():
    # A 4x3, B 5x2, 2 terms; a token is X [3, 2] and each term computes A X B^T.
    #   A first: A X is 4*2 outputs of 3 MACs (24), then (A X) B^T 4*5 outputs of 2 MACs (40);
    #   B first: X B^T is 3*5 outputs of 2 MACs (30), then A (X B^T) 4*5 outputs of 3 (60).
    # The cheaper order, 64 MACs = 128 FLOPs per term, 256 for two; dense: 2 * 20 * 6 = 240.
    shapes = (4, 3, 5, 2)
    assert kron_flops(shapes, 2) == 256
    W = torch.randn(20, 6, dtype=torch.float64)
    _, candidates = choose_factor_shapes(W, cf=1, max_rank=None)
    (cand,) = [c for c in candidates if c.shapes == shapes and c.rank == 2]
    assert cand.flops_ratio == pytest.approx(240 / 256)
    assert cand.as_dict()["flops_ratio"] == cand.flops_ratio
    # the same count from torch's FLOP counter on the A-first composition, per token
    A, B = torch.randn(2, 4, 3), torch.randn(2, 5, 2)
    X = torch.randn(7, 3, 2)
    with FlopCounterMode(display=False) as counter:
        Y = torch.einsum("tril,rjl->tij", torch.einsum("rik,tkl->tril", A, X), B)
    assert counter.get_total_flops() == 7 * kron_flops(shapes, 2)
    torch.testing.assert_close(Y.reshape(7, 20), X.reshape(7, 6) @ kron_weight(A, B).T)


@pytest.mark.parametrize("cf", [1.5, 2, 4])
def test_min_speedup_excludes_slow_candidates(cf):
    W = torch.randn(64, 48)
    free, all_candidates = choose_factor_shapes(W, cf)
    assert free.flops_ratio < 2  # the least-error pick alone needs about as many FLOPs as dense
    choice, candidates = choose_factor_shapes(W, cf, min_speedup=2)
    assert choice.flops_ratio >= 2 and choice.cf >= cf and choice in candidates
    assert all(c.flops_ratio >= 2 for c in candidates)
    assert choice.rel_error == min(c.rel_error for c in candidates)
    assert choice.rel_error >= free.rel_error
    assert choice.flops_ratio == pytest.approx(
        2 * W.numel() / kron_flops(choice.shapes, choice.rank))
    # None is the unconstrained search
    assert choose_factor_shapes(W, cf, min_speedup=None)[0] == free


def test_min_speedup_unreachable_names_the_best_ratio():
    W = torch.randn(64, 48)
    _, candidates = choose_factor_shapes(W, cf=2)  # every shape of this W is decomposed
    best = max(c.flops_ratio for c in candidates)
    with pytest.raises(ValueError, match=rf"min_speedup = 1000.0; the best flops_ratio "
                                         rf"available at that cf is {best:.3g}"):
        choose_factor_shapes(W, cf=2, min_speedup=1e3)
    # the floor is inclusive: at exactly the best ratio only the fastest candidates remain
    choice, kept = choose_factor_shapes(W, cf=2, min_speedup=best)
    assert choice.flops_ratio == best and all(c.flops_ratio == best for c in kept)
    with pytest.raises(ValueError, match="at rank 8 with flops_ratio"):
        choose_factor_shapes(W, cf=2, rank=8, min_speedup=best)
    with pytest.raises(ValueError, match="min_speedup must be positive"):
        choose_factor_shapes(W, cf=2, min_speedup=0)


def test_kroneckerbert_presets():
    # the paper's BERT-base shapes
    assert kroneckerbert_shapes(768, 768) == (384, 384, 2, 2)
    assert kroneckerbert_shapes(3072, 768) == (8, 2, 384, 384)
    assert kroneckerbert_shapes(768, 3072) == (2, 8, 384, 384)
    # MiniLM (hidden 384, FFN 1536): same structure and CFs (4 and 16)
    for out_f, in_f, cf in [(384, 384, 4), (1536, 384, 16), (384, 1536, 16)]:
        shapes = kroneckerbert_shapes(out_f, in_f)
        assert shapes[0] * shapes[2] == out_f and shapes[1] * shapes[3] == in_f
        assert out_f * in_f / kron_params(shapes, 1) == pytest.approx(cf, rel=1e-3)
    with pytest.raises(ValueError, match="even"):
        kroneckerbert_shapes(33, 33)
    with pytest.raises(ValueError, match="2f/h"):
        kroneckerbert_shapes(100, 32)
