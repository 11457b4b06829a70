"""hash_words: fake kernel and the text-facing wrapper of the DAN student's tokeniser."""
from __future__ import annotations

from collections.abc import Sequence

import torch

_ops = torch.ops.effnlp


@torch.library.register_fake("effnlp::hash_words")
def _hash_words_fake(text, offsets):
    torch._check(text.dim() == 1 and text.dtype == torch.uint8,
                 lambda: "hash_words: text must be a 1-D uint8 tensor (UTF-8 bytes)")
    torch._check(offsets.dim() == 1 and offsets.dtype == torch.int64,
                 lambda: "hash_words: offsets must be a 1-D int64 tensor")
    total = torch.library.get_ctx().new_dynamic_size()
    return text.new_empty((total,), dtype=torch.int64), offsets.new_empty(offsets.shape)


def encode_texts(texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(bytes uint8 [n], offsets int64 [B])``: the UTF-8 bytes of ``texts``, concatenated."""
    encoded = [t.encode("utf-8") for t in texts]
    buf = bytearray(b"".join(encoded))
    text = torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)
    starts = [0] * len(encoded)
    pos = 0
    for i, e in enumerate(encoded):
        starts[i] = pos
        pos += len(e)
    return text, torch.tensor(starts, dtype=torch.int64)


def hash_words(texts: Sequence[str] | tuple[torch.Tensor, torch.Tensor]
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenises and hashes documents into ``(ids, offsets)``, ready for ``ngram_bag``.

    ``texts`` is a list of strings, or ``(bytes, offsets)`` as ``encode_texts`` returns. Tokens
    are maximal runs of letters, digits, apostrophes and non-ASCII characters, or single ASCII
    symbols; ASCII is lower-cased. Each token's id is its 64-bit FNV-1a hash with the top bit
    cleared (non-negative, stable across runs and platforms). ``offsets[b]`` is where document
    ``b``'s ids start, as ``F.embedding_bag`` takes them.
    """
    if isinstance(texts, tuple) and len(texts) == 2 and isinstance(texts[0], torch.Tensor):
        text, offsets = texts
    else:
        text, offsets = encode_texts(texts)
    return _ops.hash_words(text, offsets)
