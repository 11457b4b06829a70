"""N-gram vocabularies for the sparse-distillation (DAN) student.

Documents are word ids (``effnlp_ext.hash_words``: raw text -> 63-bit hashes, in C++). Their
n-grams are counted by the same hash the ``ngram_bag`` op uses (``ngram_ids`` with no buckets
returns the raw 64-bit n-gram keys), so a vocabulary built here is exactly what the op looks
up. Two ways to map n-grams to table rows:

* hashing (fastText's trick): every n-gram goes to one of K buckets, no vocabulary at all;
* an exact vocabulary: the top-K n-grams by frequency (optionally only those seen at least
  ``min_count`` times) each get their own row; others are dropped.

Counting the 25k IMDb training reviews (21M n-grams of orders 1-3) takes a few seconds: the
words and n-grams are hashed by the C++ ops, the counting is one sort and run lengths.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .._ops.hash_words import hash_words


def as_word_ids(docs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, offsets)`` of documents given as strings or already as ``(ids, offsets)``."""
    if isinstance(docs, tuple) and len(docs) == 2 and isinstance(docs[0], torch.Tensor) \
            and docs[0].dtype == torch.int64:
        return docs
    return hash_words(list(docs))


def _ngram_keys(ids, offsets, orders):
    from .. import ngram_ids

    keys, _ = ngram_ids(ids, offsets, tuple(orders), 0, 0)
    return keys


def _count_sorted(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct keys (ascending) and their counts: one sort, then run lengths (measured ~2x
    faster than ``torch.unique(return_counts=True)`` on 21M keys)."""
    keys, _ = torch.sort(keys)
    return torch.unique_consecutive(keys, return_counts=True)


def _merge(keys: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.argsort(keys)
    keys, counts = keys[order], counts[order]
    uniq, inverse = torch.unique_consecutive(keys, return_inverse=True)
    return uniq, torch.zeros(uniq.numel(), dtype=torch.int64).index_add_(0, inverse, counts)


@dataclass
class NgramCounts:
    """Distinct n-gram keys with their corpus frequencies, most frequent first (ties by key)."""

    keys: torch.Tensor       # int64 [V]
    counts: torch.Tensor     # int64 [V]
    orders: tuple[int, ...]

    @property
    def occurrences(self) -> int:
        return int(self.counts.sum())

    def __len__(self) -> int:
        return self.keys.numel()


def count_ngrams(docs, orders: Sequence[int] = (1, 2, 3),
                 chunk_ngrams: int = 1 << 26) -> NgramCounts:
    """Counts the n-grams of ``orders`` over ``docs`` (strings or ``(ids, offsets)``).

    Documents are hashed in chunks of about ``chunk_ngrams`` n-grams (bounding memory); each
    chunk is counted by sort + run lengths and the chunks are merged once at the end.
    """
    ids, offsets = as_word_ids(docs)
    orders = tuple(int(o) for o in orders)
    B = offsets.numel()
    per_doc = max(1, ids.numel() * len(orders) // max(B, 1))
    chunk_docs = max(1, chunk_ngrams // per_doc)
    parts_k, parts_c = [], []
    for b0 in range(0, B, chunk_docs):
        b1 = min(B, b0 + chunk_docs)
        start = int(offsets[b0])
        end = int(offsets[b1]) if b1 < B else ids.numel()
        k, c = _count_sorted(_ngram_keys(ids[start:end], offsets[b0:b1] - start, orders))
        parts_k.append(k)
        parts_c.append(c)
    if len(parts_k) == 1:
        keys, counts = parts_k[0], parts_c[0]
    elif parts_k:
        keys, counts = _merge(torch.cat(parts_k), torch.cat(parts_c))
    else:
        keys = counts = torch.empty(0, dtype=torch.int64)
    # most frequent first; ties stay in key order (the keys are sorted), so it is deterministic
    order = torch.argsort(counts, descending=True, stable=True)
    return NgramCounts(keys[order], counts[order], orders)


class NgramVocab:
    """An exact n-gram vocabulary: row ``i`` of the table belongs to ``keys[i]``."""

    def __init__(self, keys: torch.Tensor, counts: torch.Tensor, orders: Sequence[int]):
        if keys.numel() != counts.numel():
            raise ValueError("NgramVocab: keys and counts must have the same length")
        self.keys, self.counts = keys.to(torch.int64), counts.to(torch.int64)
        self.orders = tuple(int(o) for o in orders)

    @classmethod
    def from_counts(cls, counts: NgramCounts, top_k: int | None = None,
                    min_count: int = 1) -> "NgramVocab":
        """The ``top_k`` most frequent n-grams seen at least ``min_count`` times."""
        keep = counts.counts >= min_count
        keys, c = counts.keys[keep], counts.counts[keep]
        if top_k is not None:
            keys, c = keys[:top_k], c[:top_k]
        return cls(keys, c, counts.orders)

    def __len__(self) -> int:
        return self.keys.numel()

    def table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The open-addressing ``(vocab_keys, vocab_rows)`` the ``ngram_bag`` op probes."""
        from .. import build_vocab_table

        return build_vocab_table(self.keys, torch.arange(len(self), dtype=torch.int64))

    def coverage(self, docs) -> dict:
        """Share of the n-gram occurrences (tokens) and of the distinct n-grams (types) of
        ``docs`` that this vocabulary holds, and the share of documents with none at all."""
        ids, offsets = as_word_ids(docs)
        keys = _ngram_keys(ids, offsets, self.orders)
        known = torch.isin(keys, self.keys)
        uniq = torch.unique(keys)
        from .. import ngram_ids

        table = self.table()
        kept, kept_offsets = ngram_ids(ids, offsets, self.orders, 0, 0, vocab=table)
        per_doc = torch.diff(torch.cat([kept_offsets, torch.tensor([kept.numel()])]))
        return {"token_coverage": float(known.float().mean()) if keys.numel() else 1.0,
                "type_coverage": float(torch.isin(uniq, self.keys).float().mean())
                if uniq.numel() else 1.0,
                "empty_docs": float((per_doc == 0).float().mean()) if per_doc.numel() else 0.0}

    def state(self) -> dict:
        return {"keys": self.keys, "counts": self.counts, "orders": list(self.orders)}

    @classmethod
    def from_state(cls, state: dict) -> "NgramVocab":
        return cls(state["keys"], state["counts"], state["orders"])


def pruning_table(counts: NgramCounts, min_counts: Sequence[int]) -> list[dict]:
    """Vocabulary size and corpus-occurrence coverage when pruning below each ``min_count``."""
    total = max(counts.occurrences, 1)
    rows = []
    for m in min_counts:
        keep = counts.counts >= m
        rows.append({"min_count": int(m), "size": int(keep.sum()),
                     "occurrence_coverage": float(counts.counts[keep].sum()) / total})
    return rows
