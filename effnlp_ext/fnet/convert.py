"""BERT -> FNet: replace the self-attention of an HF BERT-family model by Fourier mixing.

FNet's mixing sublayer is ``LayerNorm(x + Re(FFT2(x)))``: no query/key/value and no output
projection. ``bert_to_fnet`` therefore swaps ``attention.self`` for ``FourierMixing`` and, by
default, the output projection ``attention.output.dense`` for an identity, keeping the
sublayer's dropout and LayerNorm, the embeddings and the feed-forward blocks (their pretrained
weights are the starting point of fine-tuning). The settings are recorded in the model config
(``effnlp_fnet``), so ``save_pretrained`` + ``load_fnet`` round-trip.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from ..checkpoint import load_saved_weights
from .modules import FourierMixing

CONFIG_KEY = "effnlp_fnet"


def _attention_blocks(model: nn.Module):
    """``(name, block)`` of every self-attention wrapper: a module with ``.self`` holding
    query/key/value projections and ``.output.dense`` (BERT, RoBERTa, ELECTRA, MiniLM, ...)."""
    for name, mod in model.named_modules():
        inner = getattr(mod, "self", None)
        if (isinstance(inner, nn.Module) and all(hasattr(inner, p) for p in ("query", "key", "value"))
                and hasattr(getattr(mod, "output", None), "dense")):
            yield name, mod


def bert_to_fnet(model: nn.Module, *, output_projection: bool = False,
                 use_lengths: bool = True) -> nn.Module:
    """Replace self-attention by ``FourierMixing`` in place and return ``model``.

    Args:
        output_projection: keep the attention output projection (``attention.output.dense``)
            after the mixing. FNet has none (False, the default).
        use_lengths: mix padded sequences over their true length (from the attention mask);
            False reproduces HF FNet, where padding changes every token's output.
    """
    blocks = list(_attention_blocks(model))
    if not blocks:
        raise ValueError("bert_to_fnet: no BERT-style self-attention blocks (attention.self with "
                         "query/key/value, attention.output.dense) found in the model")
    for _, block in blocks:
        if getattr(block, "is_cross_attention", False):
            continue
        block.self = FourierMixing(use_lengths=use_lengths)
        if not output_projection:
            block.output.dense = nn.Identity()
    config = getattr(model, "config", None)
    if config is not None:
        setattr(config, CONFIG_KEY, {"output_projection": output_projection,
                                     "use_lengths": use_lengths})
    return model


def load_fnet(path: str | Path, model_class=None) -> nn.Module:
    """Load a model saved with ``save_pretrained`` after ``bert_to_fnet``, in eval mode.

    ``model_class`` defaults to the saved architecture (``config.architectures[0]``).
    """
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    settings = getattr(config, CONFIG_KEY, None)
    if settings is None:
        raise ValueError(f"load_fnet: {path} has no '{CONFIG_KEY}' entry in its config; was it "
                         f"saved after bert_to_fnet?")
    if model_class is None:
        model_class = getattr(transformers, config.architectures[0])
    # Build the FNet skeleton first, then load: the checkpoint has no attention projections.
    model = model_class(config)
    bert_to_fnet(model, **settings)
    load_saved_weights(model, path, "load_fnet")
    return model.eval()
