"""Distillation losses, Q/K capture and the two KroneckerBERT stages on tiny BERTs."""
from __future__ import annotations

import copy
import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForSequenceClassification

distill = importlib.import_module("effnlp_ext.training.distill")


def tiny_bert(layers: int = 2, hidden: int = 32, heads: int = 2, seed: int = 0, labels: int = 3):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=50, hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=2 * hidden,
                     max_position_embeddings=16, num_labels=labels,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


def tiny_batch(b: int = 3, length: int = 7, labels: int = 3):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask,
            "token_type_ids": torch.zeros_like(ids),
            "labels": torch.randint(0, labels, (b,), generator=g)}


# ----------------------------------------------------------------------------- logits
def test_logit_kd_zero_for_identical_and_positive_otherwise():
    t = torch.randn(4, 5)
    assert distill.logit_kd_loss(t.clone(), t, 2.0).abs().item() < 1e-6
    assert distill.logit_kd_loss(t + torch.randn(4, 5), t, 2.0).item() > 0
    assert distill.logit_kd_loss(t.clone(), t, mode="mse").item() == 0
    assert distill.logit_kd_loss(t + 1, t, mode="mse").item() == pytest.approx(1.0)


def test_logit_kd_temperature_scaling():
    s, t = torch.randn(6, 4), torch.randn(6, 4)
    for temp in (1.0, 2.0, 4.0):
        p_t = F.softmax(t / temp, -1)
        manual = (p_t * (p_t.log() - F.log_softmax(s / temp, -1))).sum(-1).mean() * temp ** 2
        got = distill.logit_kd_loss(s, t, temp)
        torch.testing.assert_close(got, manual, rtol=1e-5, atol=1e-6)
    # Hinton: as T grows, T^2 * KL -> mean squared centred-logit difference / (2C)
    s, t = s.double(), t.double()
    big = distill.logit_kd_loss(s, t, 200.0)
    d = (s - s.mean(-1, keepdim=True)) - (t - t.mean(-1, keepdim=True))
    assert big.item() == pytest.approx((d.pow(2).sum(-1) / (2 * 4)).mean().item(), rel=1e-2)


def test_logit_kd_gradient_reaches_student_only():
    s = torch.randn(4, 3, requires_grad=True)
    t = torch.randn(4, 3, requires_grad=True)
    distill.logit_kd_loss(s, t, 2.0).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


# ----------------------------------------------------------------------------- hidden
def test_hidden_mse_ignores_padding():
    s, t = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    base = distill.hidden_mse_loss(s, t, mask)
    s2 = s.clone()
    s2[mask == 0] += 100.0  # garbage on padding changes nothing
    torch.testing.assert_close(distill.hidden_mse_loss(s2, t, mask), base)
    valid = mask.bool()
    torch.testing.assert_close(base, (s[valid] - t[valid]).pow(2).mean())
    assert distill.hidden_mse_loss(s2, t).item() > base.item()  # unmasked does count it


def test_hidden_mse_projection_fixed_and_learned():
    s, t = torch.randn(2, 4, 6), torch.randn(2, 4, 8)
    with pytest.raises(ValueError):
        distill.hidden_mse_loss(s, t)
    w = torch.randn(6, 8)
    torch.testing.assert_close(distill.hidden_mse_loss(s, t, projection=w), F.mse_loss(s @ w, t))
    proj = torch.nn.Linear(6, 8, bias=False)
    distill.hidden_mse_loss(s, t, projection=proj).backward()
    assert proj.weight.grad is not None


# ----------------------------------------------------------------------------- attention
def test_attention_scores_match_manual_qk():
    model, batch = tiny_bert(), tiny_batch()
    out = distill.capture_outputs(model, batch, no_grad=True)
    assert len(out.scores) == 2 and len(out.hidden) == 2
    heads, d = 2, 16
    for i, layer in enumerate(model.bert.encoder.layer):
        x = out.embeddings if i == 0 else out.hidden[i - 1]  # input of layer i
        att = layer.attention.self
        q = (x @ att.query.weight.T + att.query.bias).view(3, 7, heads, d).transpose(1, 2)
        k = (x @ att.key.weight.T + att.key.bias).view(3, 7, heads, d).transpose(1, 2)
        manual = q @ k.transpose(-1, -2) / math.sqrt(d)
        assert out.scores[i].shape == (3, heads, 7, 7)
        torch.testing.assert_close(out.scores[i], manual, rtol=1e-5, atol=1e-5)
    # softmax of the scores with padded keys masked gives HF's attention probabilities
    model.set_attn_implementation("eager")
    probs = model(**distill.model_inputs(batch), output_attentions=True).attentions
    m = batch["attention_mask"][:, None, None, :].bool()
    for i in range(2):
        mine = out.scores[i].masked_fill(~m, float("-inf")).softmax(-1)
        torch.testing.assert_close(mine, probs[i], rtol=1e-4, atol=1e-5)
    # hooks are gone after the context
    assert not model.bert.encoder.layer[0].attention.self.query._forward_hooks


def test_attention_score_loss_zero_for_copy_and_masks_padding():
    student = tiny_bert()
    teacher = copy.deepcopy(student)
    batch = tiny_batch()
    s = distill.capture_outputs(student, batch)
    t = distill.capture_outputs(teacher, batch, no_grad=True)
    mask = batch["attention_mask"]
    for a, b in zip(s.scores, t.scores):
        assert distill.attention_score_loss(a, b, mask).item() < 1e-10
    noisy = t.scores[0].clone()
    pad_pairs = ~(mask[:, :, None].bool() & mask[:, None, :].bool())
    noisy.masked_fill_(pad_pairs[:, None], 1e3)
    assert distill.attention_score_loss(noisy, t.scores[0], mask).item() < 1e-10
    assert distill.attention_score_loss(noisy, t.scores[0]).item() > 1.0


# ----------------------------------------------------------------------------- layer map
def test_layer_map_uniform_and_explicit():
    assert distill.LayerMap.uniform(3, 6).pairs == ((0, 1), (1, 3), (2, 5))
    assert distill.LayerMap.uniform(4, 4).pairs == ((0, 0), (1, 1), (2, 2), (3, 3))
    assert distill.LayerMap.uniform(1, 12).pairs == ((0, 11),)
    assert distill.LayerMap.explicit([0, 2, 5]).pairs == ((0, 0), (1, 2), (2, 5))
    assert distill.LayerMap.explicit([(0, 3), (2, 5)]).pairs == ((0, 3), (2, 5))
    assert distill.LayerMap.explicit({1: 4}).pairs == ((1, 4),)
    with pytest.raises(ValueError):
        distill.LayerMap.uniform(6, 3)
    with pytest.raises(ValueError):
        distill.LayerMap.explicit([0, 7]).check(2, 6)


# ----------------------------------------------------------------------------- stages
def _grads(model):
    return [p.grad for p in model.parameters()]


def test_intermediate_kd_stage_deeper_teacher():
    teacher, student = tiny_bert(layers=4, seed=1), tiny_bert(layers=2, seed=2).train()
    batch = tiny_batch()
    kd = distill.IntermediateKD(attention_weight=1.0, hidden_weight=1.0, embedding_weight=1.0)
    loss, logs = kd(student, teacher, batch)
    assert torch.isfinite(loss) and loss.item() > 0
    assert set(logs) >= {"loss", "kd_embedding", "kd_attention", "kd_hidden"}
    assert logs["loss"] == pytest.approx(logs["kd_embedding"] + logs["kd_attention"]
                                         + logs["kd_hidden"], rel=1e-5)
    loss.backward()
    enc = student.bert.encoder.layer
    assert enc[0].attention.self.query.weight.grad.abs().sum() > 0
    assert enc[1].output.dense.weight.grad.abs().sum() > 0
    assert student.bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    assert all(g is None for g in _grads(teacher))
    # the same callable as a step_fn(model, batch); a copy of the student scores zero
    step = kd.bind(copy.deepcopy(student).eval())
    zero, _ = step(student.eval(), batch)
    assert zero.item() < 1e-8


def test_intermediate_kd_width_projection():
    teacher, student = tiny_bert(layers=2, hidden=32), tiny_bert(layers=2, hidden=16)
    kd = distill.IntermediateKD(attention_weight=0.0, student_width=16, teacher_width=32)
    loss, logs = kd(student, teacher, tiny_batch())
    loss.backward()
    assert torch.isfinite(loss) and logs["kd_attention"] == 0
    assert kd.hidden_projection.weight.grad is not None
    assert len(list(kd.parameters())) == 2


def test_intermediate_kd_with_prediction_terms_is_the_sum_of_both_stages():
    """Hidden-state and logit/label losses from one pair of forwards equal the two stages' sum."""
    teacher, student = tiny_bert(seed=1).eval(), tiny_bert(seed=2).eval()
    batch = tiny_batch()
    hidden = distill.IntermediateKD(embedding_weight=0.0, attention_weight=0.0, hidden_weight=0.7)
    pred = distill.PredictionKD(temperature=2.0, label_weight=0.5)
    both = distill.IntermediateKD(embedding_weight=0.0, attention_weight=0.0, hidden_weight=0.7,
                                  prediction=pred)
    loss, logs = both(student, teacher, batch)
    expected = hidden(student, teacher, batch)[0] + pred(student, teacher, batch)[0]
    torch.testing.assert_close(loss, expected)
    assert {"kd_hidden", "kd_logits", "hard_label", "loss"} <= set(logs)
    assert logs["kd_hidden"] > 0 and logs["kd_logits"] > 0
    loss.backward()
    assert student.classifier.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="logits"):
        distill.IntermediateKD(prediction=pred)(student.bert, teacher.bert, batch)


@pytest.mark.parametrize("label_weight", [0.0, 0.5])
def test_prediction_kd_stage(label_weight):
    teacher, student = tiny_bert(seed=1), tiny_bert(seed=2).train()
    batch = tiny_batch()
    kd = distill.PredictionKD(temperature=2.0, label_weight=label_weight)
    loss, logs = kd.bind(teacher)(student, batch)
    assert torch.isfinite(loss) and loss.item() > 0
    assert ("hard_label" in logs) == bool(label_weight)
    loss.backward()
    assert student.classifier.weight.grad.abs().sum() > 0
    assert student.bert.encoder.layer[0].attention.self.key.weight.grad is not None
    assert all(g is None for g in _grads(teacher))


def test_prediction_kd_regression_mse():
    teacher, student = tiny_bert(seed=1, labels=1), tiny_bert(seed=2, labels=1)
    batch = {**tiny_batch(), "labels": torch.randn(3)}
    loss, logs = distill.PredictionKD(mode="mse", label_weight=1.0)(student, teacher, batch)
    assert torch.isfinite(loss) and logs["hard_label"] > 0


def test_logit_kd_one_column_is_mse_not_a_constant_kl():
    """A regression head's one logit has a constant softmax: KD must fall back to the MSE."""
    s = torch.tensor([[0.5], [2.0], [4.0]], requires_grad=True)
    t = torch.tensor([[1.0], [2.0], [3.0]])
    for mode in ("kl", "mse"):
        loss = distill.logit_kd_loss(s, t, temperature=2.0, mode=mode)
        torch.testing.assert_close(loss, ((s - t) ** 2).mean())
    loss.backward()
    assert s.grad.abs().sum() > 0
