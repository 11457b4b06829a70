"""The DAN student against fastText at fastText's own game: accuracy and predict throughput.

fastText (``pip install fasttext-wheel``) is trained supervised on the same texts and gold
labels, with the same embedding dim, bucket count and word n-gram order as the DAN, then both
predict raw text in batches of 32 (tokenisation included) in the same process. fastText's
``predict`` takes a list of strings (a single string breaks on numpy 2).
"""
from __future__ import annotations

import os
import random
import tempfile
import time
from collections.abc import Sequence

import torch

from .modules import DAN


def _clean(text: str) -> str:
    return " ".join(text.split())   # fastText reads one example per line


def train_fasttext(texts: Sequence[str], labels: Sequence[int], *, dim: int, buckets: int,
                   word_ngrams: int, epochs: int = 5, lr: float = 0.5, seed: int = 0,
                   threads: int | None = None):
    """A supervised fastText model; the training file is shuffled (fastText reads it in order)."""
    import fasttext

    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        for i in order:
            f.write(f"__label__{labels[i]} {_clean(texts[i])}\n")
        path = f.name
    try:
        t0 = time.perf_counter()
        model = fasttext.train_supervised(
            path, dim=dim, bucket=buckets, wordNgrams=word_ngrams, epoch=epochs, lr=lr,
            thread=threads or torch.get_num_threads(), verbose=0, seed=seed)
        return model, time.perf_counter() - t0
    finally:
        os.unlink(path)


def fasttext_predict(model, texts: Sequence[str]) -> list[int]:
    labels, _ = model.predict([_clean(t) for t in texts])
    return [int(lab[0].removeprefix("__label__")) for lab in labels]


def throughput(predict, texts: Sequence[str], batch_size: int = 32, min_time: float = 2.0) -> float:
    """Texts per second of ``predict(batch)`` over ``texts`` in batches, repeated for min_time."""
    batches = [list(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]
    for b in batches[:2]:
        predict(b)
    done, t0 = 0, time.perf_counter()
    while True:
        for b in batches:
            predict(b)
            done += len(b)
        if time.perf_counter() - t0 >= min_time:
            return done / (time.perf_counter() - t0)


def dan_vs_fasttext(dan: DAN, train_texts, train_labels, eval_texts, eval_labels, *,
                    epochs: int = 5, batch_size: int = 32, min_time: float = 2.0) -> dict:
    """Trains fastText with the DAN's dim / buckets / max order, then measures both models'
    accuracy on the eval texts and their predict throughput, interleaved in one process."""
    cfg = dan.config
    ft, train_s = train_fasttext(train_texts, train_labels, dim=cfg.dim,
                                 buckets=dan.bag.num_rows, word_ngrams=max(cfg.orders),
                                 epochs=epochs)
    dan.eval()

    @torch.no_grad()
    def dan_predict(texts):
        return dan(*DAN.encode(texts)).logits.argmax(-1)

    gold = torch.tensor(list(eval_labels))
    dan_acc = float((torch.cat([dan_predict(eval_texts[i:i + 256])
                                for i in range(0, len(eval_texts), 256)]) == gold).float().mean())
    ft_acc = float((torch.tensor(fasttext_predict(ft, eval_texts)) == gold).float().mean())
    rounds = {"dan": [], "fasttext": []}
    for _ in range(3):   # interleaved, so load changes hit both alike
        rounds["dan"].append(throughput(dan_predict, eval_texts, batch_size, min_time))
        rounds["fasttext"].append(throughput(lambda b: fasttext_predict(ft, b), eval_texts,
                                             batch_size, min_time))
    med = {k: sorted(v)[len(v) // 2] for k, v in rounds.items()}
    return {"dan_accuracy": dan_acc, "fasttext_accuracy": ft_acc,
            "dan_docs_per_s": med["dan"], "fasttext_docs_per_s": med["fasttext"],
            "dan_vs_fasttext_throughput": med["dan"] / med["fasttext"],
            "fasttext_train_seconds": round(train_s, 1), "fasttext_epochs": epochs,
            "dim": cfg.dim, "buckets": dan.bag.num_rows, "word_ngrams": max(cfg.orders),
            "batch_size": batch_size, "threads": torch.get_num_threads()}
