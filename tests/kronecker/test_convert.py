"""compress() on tiny random HF BERT models, the compression report, and save/load."""
import inspect

import pytest
import torch
import transformers
from torch import nn

from effnlp_ext.kronecker import (DEFAULT_MIN_SPEEDUP, KronEmbedding, KronLinear, compress,
                                  compression_report, kron_flops, load_compressed,
                                  save_compressed)
from effnlp_ext.kronecker.convert import _matches
from effnlp_ext.kronecker.report import resolve_data_dir


def _classifier(config):
    return transformers.BertForSequenceClassification(config).eval()


def _kron_names(model):
    return {name for name, mod in model.named_modules() if isinstance(mod, KronLinear)}


def test_compress_keeps_signature_and_shapes(tiny_config, tiny_batch):
    model = _classifier(tiny_config)
    signature = inspect.signature(model.forward)
    before = sum(p.numel() for p in model.parameters())
    ref = model(**tiny_batch).logits
    assert compress(model, cf=2) is model
    assert inspect.signature(model.forward) == signature
    out = model(**tiny_batch)
    assert out.logits.shape == ref.shape and torch.isfinite(out.logits).all()
    names = _kron_names(model)
    assert len(names) == 2 * 6
    assert all(".encoder.layer." in n for n in names)
    assert isinstance(model.bert.pooler.dense, nn.Linear)
    assert isinstance(model.classifier, nn.Linear)
    report = model.kron_report
    assert report["params_total_dense"] == before
    assert report["params_total"] < before and report["cf_layers"] >= 2
    assert all(e["cf"] >= 2 and "candidates" in e for e in report["layers"])
    # faster as well as smaller: every searched layer meets the default FLOPs floor
    assert all(e["flops_ratio"] >= DEFAULT_MIN_SPEEDUP for e in report["layers"])
    assert all(c["flops_ratio"] >= DEFAULT_MIN_SPEEDUP
               for e in report["layers"] for c in e["candidates"])
    assert report["flops_layers"] == sum(kron_flops(e["shapes"], e["rank"])
                                         for e in report["layers"])
    assert report["flops_layers_dense"] == 2 * 2 * (4 * 32 * 32 + 2 * 32 * 64)
    assert report["flops_ratio_layers"] == report["flops_layers_dense"] / report["flops_layers"]


def test_compress_flops_floor_is_a_keyword(tiny_config):
    fast = compress(_classifier(tiny_config), cf=2, min_speedup=4).kron_report
    assert min(e["flops_ratio"] for e in fast["layers"]) >= 4
    with pytest.raises(ValueError, match=r"layer bert\.encoder\.layer\.0\..*min_speedup"):
        compress(_classifier(tiny_config), cf=2, min_speedup=1e4)
    preset = compress(_classifier(tiny_config), preset="kroneckerbert", min_speedup=1e4)
    assert all("flops_ratio" in e for e in preset.kron_report["layers"])


def test_lossless_setting_matches_original(tiny_config, tiny_batch):
    model = _classifier(tiny_config)
    ref = model(**tiny_batch).logits
    # an exact (full-rank) Kronecker sum costs more FLOPs than the dense layer, so the default
    # floor on the FLOPs ratio must be lifted to ask for it
    with pytest.raises(ValueError, match="min_speedup"):
        compress(_classifier(tiny_config), cf=0.5, max_rank=None, rank=32)
    compress(model, cf=0.5, max_rank=None, min_speedup=None)
    assert max(e["rel_error"] for e in model.kron_report["layers"]) < 1e-5
    torch.testing.assert_close(model(**tiny_batch).logits, ref, rtol=1e-4, atol=1e-4)


def test_bert_model_and_preset(tiny_config, tiny_batch):
    model = transformers.BertModel(tiny_config).eval()
    compress(model, preset="kroneckerbert")
    layer = model.encoder.layer[0]
    assert layer.attention.self.query.shapes == (16, 16, 2, 2)
    assert layer.intermediate.dense.shapes == (4, 2, 16, 16)
    assert layer.output.dense.shapes == (2, 4, 16, 16)
    assert model(**tiny_batch).last_hidden_state.shape == (3, 7, 32)


def test_target_matching():
    assert _matches("bert.encoder.layer.1.attention.self.query", ["query"])
    assert _matches("encoder.layer.0.output.dense", ["output.dense"])
    assert not _matches("encoder.layer.0.attention.output.dense", ["output.dense"])
    assert not _matches("bert.pooler.dense", ["dense"])
    assert not _matches("classifier", ["classifier"])


def test_compress_selected_targets(tiny_config):
    model = _classifier(tiny_config)
    compress(model, cf=2, targets=("output.dense",))
    assert _kron_names(model) == {f"bert.encoder.layer.{i}.output.dense" for i in range(2)}
    with pytest.raises(ValueError, match="no nn.Linear"):
        compress(_classifier(tiny_config), cf=2, targets=("pooler",))


def test_compress_argument_errors(tiny_config):
    model = _classifier(tiny_config)
    with pytest.raises(ValueError, match="exactly one"):
        compress(model)
    with pytest.raises(ValueError, match="exactly one"):
        compress(model, cf=2, preset="kroneckerbert")
    with pytest.raises(ValueError, match="unknown preset"):
        compress(model, preset="tucker")
    tied = transformers.BertForMaskedLM(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        vocab_size=100))
    with pytest.raises(ValueError, match="ties its output embedding"):
        compress(tied, cf=2, compress_embeddings=True)


def test_compress_embeddings(tiny_config, tiny_batch):
    model = _classifier(tiny_config)
    compress(model, cf=2, compress_embeddings=True, embedding_n=4)
    emb = model.get_input_embeddings()
    assert isinstance(emb, KronEmbedding) and emb.n == 4 and emb.padding_idx == 0
    assert model(**tiny_batch).logits.shape == (3, 2)
    kinds = {e["type"] for e in compression_report(model)["layers"]}
    assert kinds == {"KronLinear", "KronEmbedding"}


def test_report_of_uncompressed_model(tiny_config):
    report = compression_report(_classifier(tiny_config))
    assert report["layers"] == [] and report["cf_model"] == 1.0


@pytest.mark.parametrize("embeddings", [False, True])
def test_save_load_round_trip(tiny_config, tiny_batch, tmp_path, embeddings):
    model = compress(_classifier(tiny_config), cf=3, compress_embeddings=embeddings)
    out = model(**tiny_batch).logits
    save_compressed(model, tmp_path)
    loaded = load_compressed(tmp_path)
    assert type(loaded) is type(model) and not loaded.training
    assert torch.equal(loaded(**tiny_batch).logits, out)
    assert _kron_names(loaded) == _kron_names(model)
    assert loaded.kron_report["params_total"] == model.kron_report["params_total"]
    assert loaded.bert.encoder.layer[0].attention.self.query.rel_error == \
        model.bert.encoder.layer[0].attention.self.query.rel_error


def test_load_needs_metadata(tmp_path, tiny_config):
    _classifier(tiny_config).save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="save_compressed"):
        load_compressed(tmp_path)


def test_missing_data_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_dir="):
        resolve_data_dir(tmp_path / "absent")
