"""Multi-exit baseline: gradient equilibrium, early exit (entropy, patience), exit costs, curves."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import BertConfig, BertModel

from effnlp_ext.elue.multi_exit import (MultiExitBert, _ScaleGrad, collect_exits,
                                        default_thresholds, dynamic_curve, entropy, exit_costs,
                                        static_curve, task_metric)

H, I = 32, 64


def _model(layers=3, ge=True, pooling="cls", num_labels=2):
    cfg = BertConfig(vocab_size=60, hidden_size=H, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=I, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, attn_implementation="eager")
    torch.manual_seed(0)
    return MultiExitBert(BertModel(cfg), num_labels, dropout=0.0, gradient_equilibrium=ge,
                         pooling=pooling)


def _batch(B=6, L=9):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 60, (B, L), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    mask[3, 2:] = 0
    return ids, mask, torch.randint(0, 2, (B,), generator=g)


def test_scale_grad():
    x = torch.randn(3, requires_grad=True)
    y = _ScaleGrad.apply(x, 0.25)
    assert torch.equal(y, x)
    y.sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 0.25))


def test_gradient_equilibrium_two_exits():
    """With 2 layers: exit 1's and the continuing path's gradients are halved below layer 1, so
    the embeddings get 0.5 g(L1) + 0.5 g(L2) while layer 2 gets g(L2) unscaled."""
    ids, mask, labels = _batch()
    plain = _model(2, ge=False).train()
    emb = plain.bert.embeddings.word_embeddings.weight
    top = plain.bert.encoder.layer[1].output.dense.weight

    def grads(model, which):
        model.zero_grad()
        out = model(ids, mask)
        losses = [torch.nn.functional.cross_entropy(lg, labels) for lg in out.all_logits]
        sum(losses[i] for i in which).backward()
        return emb.grad.clone(), top.grad.clone()
    g1, _ = grads(plain, [0])
    g2, t2 = grads(plain, [1])
    ge = _model(2, ge=True).train()
    ge.zero_grad()
    ge(ids, mask, labels=labels).loss.backward()
    torch.testing.assert_close(ge.bert.embeddings.word_embeddings.weight.grad, 0.5 * g1 + 0.5 * g2)
    torch.testing.assert_close(ge.bert.encoder.layer[1].output.dense.weight.grad, t2)


def test_exit_costs_closed_form():
    model = _model()
    c = exit_costs(model, 9)
    layer = 2 * 9 * (4 * H * H + 2 * H * I) + 4 * 9 * 9 * H
    head = 2 * H * H + 2 * H * 2
    assert c == {"layers": [layer] * 3, "heads": [head] * 3}


@pytest.mark.parametrize("policy, values", [("entropy", [0.0, 0.3, 0.6, 0.7]),
                                            ("patience", [0, 1, 2])])
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_early_exit_matches_curve_decisions(policy, values, pooling):
    model = _model(pooling=pooling).eval()
    ids, mask, labels = _batch()
    loader = [{"input_ids": ids, "attention_mask": mask, "labels": labels}]
    all_logits, lab, lengths = collect_exits(model, loader)
    assert lengths == mask.sum(-1).tolist()
    rows = dynamic_curve(model, all_logits, lab, lengths, policy=policy, values=values)
    for v, row in zip(values, rows):
        kw = {"threshold": v} if policy == "entropy" else {"patience": int(v)}
        logits, exit_at = model.early_exit(ids, mask, policy=policy, **kw)
        assert row["mean_exit"] == pytest.approx(exit_at.float().mean().item())
        acc = (logits.argmax(-1) == labels).float().mean().item()
        assert row["accuracy"] == pytest.approx(acc)
        for b, k in enumerate(exit_at.tolist()):
            torch.testing.assert_close(logits[b], all_logits[k - 1, b], rtol=1e-4, atol=1e-5)


def test_early_exit_stops_computing_and_curves_span_cost():
    model = _model().eval()
    ids, mask, labels = _batch()
    calls = []
    hook = model.bert.encoder.layer[2].register_forward_hook(lambda *a: calls.append(1))
    _, exit_at = model.early_exit(ids, mask, threshold=math.log(2) + 1)   # everyone exits at 1
    assert exit_at.tolist() == [1] * 6 and not calls
    hook.remove()
    all_logits, lab, lengths = collect_exits(model, [{"input_ids": ids, "attention_mask": mask,
                                                      "labels": labels}])
    static = static_curve(model, all_logits, lab, lengths)
    assert [r["exit"] for r in static] == [1, 2, 3]
    assert static[0]["flops"] < static[1]["flops"] < static[2]["flops"]
    th = default_thresholds(2)
    assert th[0] == 0.0 and th[-1] == pytest.approx(math.log(2), abs=1e-4)
    dyn = dynamic_curve(model, all_logits, lab, lengths, policy="entropy", values=[0.0, 10.0])
    assert dyn[0]["accuracy"] == static[-1]["accuracy"] and dyn[0]["mean_exit"] == 3
    assert dyn[1]["accuracy"] == static[0]["accuracy"] and dyn[1]["mean_exit"] == 1
    assert dyn[0]["flops"] > static[-1]["flops"]       # all heads on the way were evaluated
    assert (entropy(torch.zeros(2, 2)) - math.log(2)).abs().max() < 1e-6
    with pytest.raises(ValueError, match="policy"):
        model.early_exit(ids, mask, policy="random")


def test_mean_pooling_ignores_padding():
    model = _model(pooling="mean").eval()
    ids, mask, _ = _batch()
    full = model(ids, mask).all_logits[:, 1]
    alone = model(ids[1:2, :5], mask[1:2, :5]).all_logits[:, 0]
    torch.testing.assert_close(full, alone, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="pooling"):
        _model(pooling="max")


def test_regression_head_mse_loss_pearson_curves_and_patience_within_tolerance():
    """STS-B-style head (one output): MSE at every exit, the task metric on the curves, and
    patience that counts consecutive exits within ``tolerance`` of each other."""
    model = _model(num_labels=1).eval()
    ids, mask, _ = _batch()
    scores = torch.linspace(0.0, 5.0, 6)
    out = model(ids, mask, labels=scores)
    expected = sum(torch.nn.functional.mse_loss(lg.squeeze(-1), scores) for lg in out.all_logits)
    torch.testing.assert_close(out.loss, expected)
    loader = [{"input_ids": ids, "attention_mask": mask, "labels": scores}]
    all_logits, lab, lengths = collect_exits(model, loader)
    metric = task_metric("stsb")
    static = static_curve(model, all_logits, lab, lengths, metric)
    pearson = torch.corrcoef(torch.stack([all_logits[0, :, 0], scores]))[0, 1].item()
    assert static[0]["accuracy"] == pytest.approx(pearson, abs=1e-5)
    for tol in (0.0, 1e-4, 10.0):
        rows = dynamic_curve(model, all_logits, lab, lengths, policy="patience", values=[1, 2],
                             metric=metric, tolerance=tol)
        for v, row in zip([1, 2], rows):
            _, exit_at = model.early_exit(ids, mask, policy="patience", patience=v, tolerance=tol)
            assert row["mean_exit"] == pytest.approx(exit_at.float().mean().item())
            if tol == 10.0:                  # every exit agrees: the earliest allowed exit
                assert exit_at.tolist() == [v + 1] * 6
    with pytest.raises(ValueError, match="regression head exits by patience"):
        model.early_exit(ids, mask, policy="entropy")
    with pytest.raises(ValueError, match="regression head exits by patience"):
        dynamic_curve(model, all_logits, lab, lengths, policy="entropy", values=[0.1])


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_exits_see_the_encoders_own_hidden_states(pooling):
    """The layer-by-layer forward (with its own attention mask) equals BertModel's forward."""
    model = _model(pooling=pooling).eval()
    ids, mask, _ = _batch()
    with torch.no_grad():
        hidden = model.bert(ids, attention_mask=mask, output_hidden_states=True).hidden_states
        all_logits = model(ids, mask).all_logits
        for k, head in enumerate(model.exits):
            torch.testing.assert_close(all_logits[k], head(hidden[k + 1], mask),
                                       rtol=1e-4, atol=1e-5)
