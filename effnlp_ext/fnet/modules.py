"""FourierMixing: FNet's token mixing as a drop-in for an HF BERT self-attention block."""
from __future__ import annotations

import torch
from torch import nn

from .._ops import fourier_mix


def lengths_from_attention_mask(attention_mask: torch.Tensor | None, seq_len: int):
    """Per-sequence true lengths from the mask that reaches an HF self-attention module, or
    ``None`` when every position is attended (no mask, or an all-ones mask).

    Accepts the 2-D ``[B, L]`` 0/1 mask a user passes, and the 4-D ``[B, 1, Lq, L]`` masks HF
    builds from it (boolean: True = attend; float: 0 = attend, a large negative = masked). Only
    right padding has a length: a mask that is not a prefix of ones raises.
    """
    if attention_mask is None:
        return None
    m = attention_mask
    if m.dim() == 4:
        m = m[:, 0, 0, :]
        valid = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
    elif m.dim() == 2:
        valid = m.bool()
    else:
        raise ValueError(f"FourierMixing: cannot read sequence lengths from an attention mask of "
                         f"shape {tuple(attention_mask.shape)}")
    if valid.shape[-1] != seq_len:
        raise ValueError(f"FourierMixing: the attention mask covers {valid.shape[-1]} positions "
                         f"but the sequence has {seq_len}")
    lengths = valid.sum(-1)
    if bool(valid.all()):
        return None
    prefix = torch.arange(seq_len, device=valid.device) < lengths[:, None]
    if not torch.equal(prefix, valid):
        raise ValueError("FourierMixing: the attention mask is not right-padded (a prefix of "
                         "attended positions per sequence); pad on the right, or build the "
                         "model with use_lengths=False")
    return lengths


class FourierMixing(nn.Module):
    """``Re(FFT_seq(FFT_hidden(h)))`` in place of ``BertSelfAttention``.

    It takes the self-attention call signature (``hidden_states, attention_mask=None, ...``) and
    returns its structure ``(output, None)``, so ``BertAttention`` keeps working around it.
    With ``use_lengths`` (the default), padded sequences are mixed over their true length only,
    read from the attention mask: padding then leaves the real tokens' outputs unchanged. With
    ``use_lengths=False`` it is exactly HF's ``FNetBasicFourierTransform`` (padding included).
    There are no parameters.
    """

    def __init__(self, use_lengths: bool = True):
        super().__init__()
        self.use_lengths = use_lengths

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                *args, **kwargs):
        lengths = (lengths_from_attention_mask(attention_mask, hidden_states.shape[-2])
                   if self.use_lengths else None)
        return fourier_mix(hidden_states, lengths), None

    def extra_repr(self) -> str:
        return f"use_lengths={self.use_lengths}"
