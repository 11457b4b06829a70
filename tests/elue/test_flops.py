"""FLOPs counter: closed-form counts of a BERT layer, an FNet layer and Kronecker/TAMT/DAN ops."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import BertConfig, BertModel

import effnlp_ext
from effnlp_ext.elue.flops import (count_flops, count_parameters, encoded_flops_per_sample,
                                   fourier_mix_cost, per_sample_cost)
from effnlp_ext.fnet import bert_to_fnet

H, I, L, HEADS = 32, 64, 12, 4


def _layer(attn="eager"):
    cfg = BertConfig(vocab_size=50, hidden_size=H, num_hidden_layers=1, num_attention_heads=HEADS,
                     intermediate_size=I, max_position_embeddings=64, attn_implementation=attn)
    torch.manual_seed(0)
    return BertModel(cfg, add_pooling_layer=False).eval()


def _run(model, B=1):
    x = torch.randn(B, L, H)
    return lambda: model.encoder.layer[0](x)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_bert_layer_closed_form(attn):
    model = _layer(attn)
    flops, by_op = count_flops(_run(model))
    linears = 2 * L * (4 * H * H + 2 * H * I)         # Q, K, V, O and the two FFN matmuls
    attention = 2 * 2 * L * L * H                     # Q K^T and A V over all heads
    assert flops == linears + attention, by_op


def test_fnet_layer_closed_form():
    model = bert_to_fnet(_layer())
    flops, by_op = count_flops(_run(model, B=3))
    assert flops == 3 * 2 * L * 2 * H * I + int(3 * fourier_mix_cost(L, H)), by_op
    assert "effnlp.fourier_mix" in by_op


def test_fourier_mix_counts_true_lengths_and_matches_hf_rfft_convention():
    x = torch.randn(3, 16, 64)
    lengths = torch.tensor([16, 5, 0])
    flops, _ = count_flops(lambda: effnlp_ext.fourier_mix(x, lengths))
    assert flops == sum(int(fourier_mix_cost(n, 64)) for n in (16, 5, 0))
    # one sequence, no lengths: a real 2-D FFT of the same size costs the same
    f_ours, _ = count_flops(lambda: effnlp_ext.fourier_mix(x[:1]))
    f_rfft, _ = count_flops(lambda: torch.fft.rfftn(x[:1], dim=(1, 2)))
    assert f_ours == f_rfft == int(16 * 2.5 * 64 * 6 + 33 * 5 * 16 * 4)
    f_fftn, _ = count_flops(lambda: torch.fft.fftn(x[:1], dim=(1, 2)).real)
    assert f_fftn == 16 * 5 * 64 * 6 + 64 * 5 * 16 * 4


@pytest.mark.parametrize("shapes", [(8, 2, 32, 16, 1), (4, 8, 4, 8, 2), (32, 16, 2, 2, 3)])
def test_kron_op_closed_form(shapes):
    m1, n1, m2, n2, R = shapes
    A, B = torch.randn(R, m1, n1), torch.randn(R, m2, n2)
    bias = torch.randn(m1 * m2)
    x = torch.randn(5, 7, n1 * n2)
    flops, by_op = count_flops(lambda: effnlp_ext.kron_linear(x, A, B, bias))
    per_token = 2 * R * min(n1 * n2 * m2 + m1 * n1 * m2, m1 * n1 * n2 + m1 * n2 * m2) + m1 * m2
    assert flops == 35 * per_token, by_op


def test_masked_and_sparse_linear():
    x = torch.randn(6, 20)
    w = torch.randn(30, 20)
    s = torch.randn(30, 20)
    flops, _ = count_flops(lambda: effnlp_ext.masked_linear(x, w, s, 0.5, None))
    assert flops == 6 * 2 * 20 * 30
    dense = w * (s > 0.5)
    c = dense.to_sparse_csr()
    flops, _ = count_flops(lambda: effnlp_ext.sparse_linear(
        x, c.crow_indices().int(), c.col_indices().int(), c.values(), 20, torch.zeros(30)))
    assert flops == 6 * (2 * int((s > 0.5).sum()) + 30)


def test_ngram_bag_counts_kept_ngrams():
    ids, offsets = effnlp_ext.hash_words(["a b c d", "e", ""])
    weight = torch.randn(101, 8)
    flops, _ = count_flops(lambda: effnlp_ext.ngram_bag(ids, offsets, weight, orders=(1, 2),
                                                        mode="mean"))
    ngrams = (4 + 3) + 1 + 0
    assert flops == ngrams * 8 + 3 * 8


def test_per_sample_cost_and_params():
    model = _layer()
    samples = [{"input_ids": torch.randint(0, 50, (1, n))} for n in (3, 9)]
    report = per_sample_cost(model, samples)

    def one(n):
        return 2 * n * (4 * H * H + 2 * H * I) + 4 * n * n * H
    assert report.flops == pytest.approx((one(3) + one(9)) / 2)
    assert report.macs == report.flops / 2 and report.samples == 2
    assert report.params == sum(p.numel() for p in model.parameters())
    emb = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    assert count_parameters(model, exclude_embeddings=True) == report.params - emb
    assert math.isfinite(report.flops)


def test_encoded_flops_per_sample_weights_each_length_by_its_count():
    model = _layer()

    def one(n):
        return 2 * n * (4 * H * H + 2 * H * I) + 4 * n * n * H
    lengths = [3, 9, 3, 3, 5, 9]
    feats = [{"input_ids": list(range(1, n + 1)), "attention_mask": [1] * n, "labels": 0}
             for n in lengths]
    assert encoded_flops_per_sample(model, feats) == pytest.approx(
        sum(one(n) for n in lengths) / len(lengths))
    assert encoded_flops_per_sample(model, []) == 0


def test_kron_compressed_layer_closed_form():
    from effnlp_ext.kronecker import compress

    model = _layer()
    compress(model, preset="kroneckerbert")
    flops, by_op = count_flops(_run(model))
    want = 4 * L * L * H       # attention scores and mixing are unchanged
    for mod in model.encoder.layer[0].modules():
        if hasattr(mod, "A") and hasattr(mod, "B") and isinstance(mod.A, torch.Tensor):
            R, m1, n1 = mod.A.shape
            _, m2, n2 = mod.B.shape
            bias = m1 * m2 if getattr(mod, "bias", None) is not None else 0
            want += L * (2 * R * min(n1 * n2 * m2 + m1 * n1 * m2, m1 * n1 * n2 + m1 * n2 * m2) + bias)
    for mod in model.encoder.layer[0].modules():
        if isinstance(mod, torch.nn.Linear):
            want += 2 * L * mod.in_features * mod.out_features
    assert flops == want, by_op
    assert "effnlp._kron_linear_forward" in by_op


def test_rational_counts_both_horner_chains():
    x = torch.randn(7, 10)
    num, den = torch.randn(6), torch.randn(4)
    flops, by_op = count_flops(lambda: effnlp_ext.rational(x, num, den))
    assert flops == 70 * (2 * 5 + 2 * 4 + 3), by_op
