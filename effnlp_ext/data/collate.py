"""Tokenisation, per-batch padding and length bucketing for task examples.

Padding every batch to the corpus maximum wastes most of the compute on short GLUE sentences;
`DynamicPaddingCollator` pads only to the longest sequence of the batch, and
`LengthBucketBatchSampler` groups sequences of similar length so that even that padding
stays small, while seeded shuffling keeps the batch order random and reproducible.
"""
from __future__ import annotations

import random
from typing import Any, Iterator, Mapping, Sequence

import torch

from .tasks import Example

Feature = dict[str, Any]


def encode(examples: Sequence[Example], tokenizer, max_length: int) -> list[Feature]:
    """Tokenise examples (single sentences or pairs) with truncation to ``max_length``.

    Returns one unpadded feature dict per example: the tokenizer's ``input_ids``,
    ``attention_mask`` and, when it produces them, ``token_type_ids``, plus ``labels``.
    Pairs are truncated longest-first so that neither side is dropped entirely.
    """
    if not examples:
        return []
    has_b = [e.text_b is not None for e in examples]
    if any(has_b) and not all(has_b):
        raise ValueError("encode: examples mix single sentences and sentence pairs")
    text_a = [e.text_a for e in examples]
    text_b = [e.text_b for e in examples] if has_b[0] else None
    enc = tokenizer(text_a, text_b, truncation=True, max_length=max_length, padding=False)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    return [{**{k: enc[k][i] for k in keys}, "labels": e.label} for i, e in enumerate(examples)]


class DynamicPaddingCollator:
    """Pad a list of features to the longest in the batch and stack them into tensors.

    ``input_ids`` are padded with ``pad_token_id``, ``attention_mask`` and ``token_type_ids``
    with 0 (right padding). ``labels`` become a long tensor for class ids and a float tensor
    when any label is a float (regression). ``token_type_ids`` appear only when every feature
    carries them.
    """

    def __init__(self, pad_token_id: int = 0):
        self.pad_token_id = int(pad_token_id)

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "DynamicPaddingCollator":
        pad = tokenizer.pad_token_id
        if pad is None:
            raise ValueError("tokenizer has no pad token; set tokenizer.pad_token first")
        return cls(pad)

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("DynamicPaddingCollator: empty batch")
        longest = max(len(f["input_ids"]) for f in features)
        batch = {"input_ids": self._pad(features, "input_ids", longest, self.pad_token_id)}
        if all("attention_mask" in f for f in features):
            batch["attention_mask"] = self._pad(features, "attention_mask", longest, 0)
        else:
            batch["attention_mask"] = torch.tensor(
                [[1] * len(f["input_ids"]) + [0] * (longest - len(f["input_ids"]))
                 for f in features], dtype=torch.long)
        if all("token_type_ids" in f for f in features):
            batch["token_type_ids"] = self._pad(features, "token_type_ids", longest, 0)
        if all("labels" in f for f in features):
            labels = [f["labels"] for f in features]
            is_float = any(isinstance(v, float) for v in labels)
            batch["labels"] = torch.tensor(labels, dtype=torch.float32 if is_float else torch.long)
        return batch

    @staticmethod
    def _pad(features, key: str, length: int, value: int) -> torch.Tensor:
        out = torch.full((len(features), length), value, dtype=torch.long)
        for i, f in enumerate(features):
            seq = f[key]
            out[i, :len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        return out


class LengthBucketBatchSampler:
    """Batches of indices whose sequences have similar lengths, in a seeded random order.

    Each epoch: shuffle all indices, cut them into pools of ``batch_size * pool_batches``,
    sort each pool by length, cut the pools into batches and shuffle the batch order. The
    pools keep some randomness in which examples meet; the sort cuts padding. Every index
    appears exactly once per epoch. Call `set_epoch` to get a different, still reproducible,
    order each epoch (as with ``DistributedSampler``).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, *, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = False, pool_batches: int = 50):
        if batch_size < 1 or pool_batches < 1:
            raise ValueError("batch_size and pool_batches must be positive")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.pool_batches = pool_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        rng = random.Random(self.seed + self.epoch)
        order = list(range(len(self.lengths)))
        if self.shuffle:
            rng.shuffle(order)
        pool = self.batch_size * self.pool_batches if self.shuffle else max(len(order), 1)
        batches = []
        for start in range(0, len(order), pool):
            chunk = sorted(order[start:start + pool], key=self.lengths.__getitem__)
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk),
                                                                    self.batch_size)]
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        if self.shuffle:
            rng.shuffle(batches)
        return iter(batches)

    def __len__(self) -> int:
        n = len(self.lengths)
        pool = self.batch_size * self.pool_batches if self.shuffle else max(n, 1)
        full, rest = divmod(n, pool)

        def batches_in(size: int) -> int:
            return size // self.batch_size if self.drop_last else -(-size // self.batch_size)

        return full * batches_in(pool) + batches_in(rest)
