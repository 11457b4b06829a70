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
                 use_lengths: bool = True, layers=None) -> nn.Module:
    """Replace self-attention by ``FourierMixing`` in place and return ``model``.

    Args:
        output_projection: keep the attention output projection (``attention.output.dense``)
            after the mixing. FNet has none (False, the default).
        use_lengths: mix padded sequences over their true length (from the attention mask);
            False reproduces HF FNet, where padding changes every token's output.
        layers: indices (in model order) of the self-attention blocks to replace; None: all.
            FNet-Hybrid, the paper's variant that keeps self-attention in the top layers, is
            ``layers=range(n - 2)``.
    """
    blocks = [b for _, b in _attention_blocks(model) if not getattr(b, "is_cross_attention", False)]
    if not blocks:
        raise ValueError("bert_to_fnet: no BERT-style self-attention blocks (attention.self with "
                         "query/key/value, attention.output.dense) found in the model")
    chosen = list(range(len(blocks))) if layers is None else sorted({int(i) for i in layers})
    bad = [i for i in chosen if not 0 <= i < len(blocks)]
    if bad or not chosen:
        raise ValueError(f"bert_to_fnet: layers must be a non-empty subset of "
                         f"0..{len(blocks) - 1}, got {list(layers)}")
    for i in chosen:
        blocks[i].self = FourierMixing(use_lengths=use_lengths)
        if not output_projection:
            blocks[i].output.dense = nn.Identity()
    config = getattr(model, "config", None)
    if config is not None:
        setattr(config, CONFIG_KEY, {"output_projection": output_projection,
                                     "use_lengths": use_lengths,
                                     "layers": None if layers is None else chosen})
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
