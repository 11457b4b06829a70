"""The sparse-distillation student: a Deep Averaging Network over hashed word n-grams.

``HashedNgramBag`` is the input layer: a large table (millions of rows) whose rows are
n-gram buckets (hashing) or the n-grams of an exact vocabulary, reduced per document by the
fused ``ngram_bag`` op (hash, gather and mean in one pass; sparse gradient for SparseAdam).
``DAN`` = bag -> dropout -> Linear -> ReLU -> dropout -> Linear, on raw text through the C++
``hash_words`` tokeniser, so the whole student never touches a WordPiece tokenizer.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .._ops.hash_words import hash_words
from .vocab import NgramVocab


class HashedNgramBag(nn.Module):
    """Mean (or sum) of the table rows of every n-gram of each document.

    Args:
        num_rows: table rows: the hash buckets, or ``len(vocab)`` with a vocabulary.
        dim: embedding size.
        orders: n-gram orders over word ids (1 = words, 2 = word bigrams, ...).
        vocab: an exact ``NgramVocab`` (n-grams outside it are dropped); None: hashing.
        mode: "mean" or "sum".
        sparse: sparse weight gradient (train the table with SparseAdam; the Trainer does).
    The table is initialised uniform in ``±1/dim`` (fastText's input matrix).
    """

    def __init__(self, num_rows: int, dim: int, orders: Sequence[int] = (1, 2),
                 vocab: NgramVocab | None = None, mode: str = "mean", sparse: bool = True):
        super().__init__()
        if vocab is not None and num_rows != len(vocab):
            raise ValueError(f"HashedNgramBag: num_rows ({num_rows}) must equal the vocabulary "
                             f"size ({len(vocab)})")
        if mode not in ("mean", "sum"):
            raise ValueError(f"HashedNgramBag: mode must be 'mean' or 'sum', got {mode!r}")
        self.orders, self.mode, self.sparse = tuple(int(o) for o in orders), mode, sparse
        self.weight = nn.Parameter(torch.empty(num_rows, dim).uniform_(-1.0 / dim, 1.0 / dim))
        self.has_vocab = vocab is not None
        keys, rows = vocab.table() if vocab is not None else (torch.empty(0, dtype=torch.int64),) * 2
        self.register_buffer("vocab_keys", keys)
        self.register_buffer("vocab_rows", rows)

    @property
    def num_rows(self) -> int:
        return self.weight.shape[0]

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        from .. import ngram_bag

        vocab = (self.vocab_keys, self.vocab_rows) if self.has_vocab else None
        return ngram_bag(ids, offsets, self.weight, orders=self.orders, mode=self.mode,
                         num_buckets=0 if self.has_vocab else self.num_rows, unigram_rows=0,
                         vocab=vocab, sparse=self.sparse and self.training)

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [self.weight] if self.sparse else []

    def extra_repr(self) -> str:
        kind = "vocabulary" if self.has_vocab else "hash buckets"
        return (f"{self.num_rows} {kind} x {self.weight.shape[1]}, orders={self.orders}, "
                f"mode={self.mode}")


@dataclass
class DANConfig:
    num_labels: int = 2
    num_rows: int = 1 << 21          # hash buckets (ignored with a vocabulary)
    dim: int = 256
    hidden: int = 256
    orders: tuple[int, ...] = (1, 2, 3)
    dropout: float = 0.1
    mode: str = "mean"
    extra: dict = field(default_factory=dict)


@dataclass
class DANOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None


class DAN(nn.Module):
    """Deep Averaging Network: ``HashedNgramBag`` then two linear layers with dropout."""

    def __init__(self, config: DANConfig, vocab: NgramVocab | None = None):
        super().__init__()
        self.config = config
        rows = len(vocab) if vocab is not None else config.num_rows
        self.bag = HashedNgramBag(rows, config.dim, config.orders, vocab, config.mode)
        self.vocab = vocab
        self.head = nn.Sequential(
            nn.Dropout(config.dropout), nn.Linear(config.dim, config.hidden), nn.ReLU(),
            nn.Dropout(config.dropout), nn.Linear(config.hidden, config.num_labels))

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor,
                labels: torch.Tensor | None = None) -> DANOutput:
        logits = self.head(self.bag(ids, offsets))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits, labels)
        return DANOutput(logits, loss)

    def sparse_parameters(self) -> list[nn.Parameter]:
        return self.bag.sparse_parameters()

    @staticmethod
    def encode(texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw text -> ``(word ids, offsets)`` (the C++ ``hash_words`` tokeniser)."""
        return hash_words(list(texts))

    @torch.no_grad()
    def predict_logits(self, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """Logits of raw texts end to end: tokenisation, n-gram bag, MLP."""
        was_training = self.training
        self.eval()
        out = [self(*self.encode(texts[i:i + batch_size])).logits
               for i in range(0, len(texts), batch_size)]
        self.train(was_training)
        return torch.cat(out) if out else torch.empty(0, self.config.num_labels)

    def num_parameters(self) -> dict:
        table = self.bag.weight.numel()
        return {"table": table, "dense": sum(p.numel() for p in self.head.parameters()),
                "total": table + sum(p.numel() for p in self.head.parameters())}

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        cfg = asdict(self.config)
        cfg["orders"] = list(cfg["orders"])
        (path / "dan.json").write_text(json.dumps(cfg, indent=2))
        state = {"model": self.state_dict()}
        if self.vocab is not None:
            state["vocab"] = self.vocab.state()
        torch.save(state, path / "dan.pt")

    @classmethod
    def load(cls, path: str | Path) -> "DAN":
        path = Path(path)
        cfg = json.loads((path / "dan.json").read_text())
        cfg["orders"] = tuple(cfg["orders"])
        state = torch.load(path / "dan.pt", map_location="cpu", weights_only=False)
        vocab = NgramVocab.from_state(state["vocab"]) if "vocab" in state else None
        model = cls(DANConfig(**cfg), vocab)
        model.load_state_dict(state["model"])
        return model.eval()


def collate_docs(items: Sequence[dict]) -> dict:
    """Batch of ``{"ids": int64 [n_i], "labels": ..., "teacher_logits": ...}`` documents ->
    ``{"ids": [sum n_i], "offsets": [B], ...}`` (the flat layout ``ngram_bag`` takes)."""
    lengths = [int(it["ids"].numel()) for it in items]
    offsets = torch.zeros(len(items), dtype=torch.int64)
    if len(items) > 1:
        offsets[1:] = torch.tensor(lengths[:-1]).cumsum(0)
    batch = {"ids": torch.cat([it["ids"] for it in items]) if items else
             torch.empty(0, dtype=torch.int64), "offsets": offsets}
    for key in ("labels", "teacher_logits"):
        if items and key in items[0]:
            batch[key] = torch.stack([torch.as_tensor(it[key]) for it in items])
    return batch


def split_docs(ids: torch.Tensor, offsets: torch.Tensor) -> list[torch.Tensor]:
    """Per-document id tensors of a flat ``(ids, offsets)`` pair."""
    ends = torch.cat([offsets[1:], torch.tensor([ids.numel()])]).tolist()
    return [ids[s:e] for s, e in zip(offsets.tolist(), ends)]
