"""FNet: self-attention replaced by the real part of a 2D DFT (sequence x hidden)."""
from .convert import bert_to_fnet, load_fnet
from .modules import FourierMixing, lengths_from_attention_mask

__all__ = ["FourierMixing", "bert_to_fnet", "load_fnet", "lengths_from_attention_mask"]
