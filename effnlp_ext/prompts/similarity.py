"""Similarity between soft prompts: embedding cosines and activated-neuron overlap (ON).

ON (Su et al., 2022, "On Transferability of Prompt Tuning for NLP"): feed a prompt alone to the
frozen model (``[CLS] p_1 .. p_n [SEP]``), binarise the FFN intermediate activations after the
nonlinearity at the prompt positions (active = > 0), and compare two prompts by the cosine of
those binary vectors, layer by layer, averaged over layers. It reflects what the prompts make
the model do rather than where they sit in embedding space, and it tracks transferability
better than embedding cosines in the paper.

``positions`` picks the activations compared: ``"prompt"`` (the paper's: every prompt position,
flattened, so the i-th virtual token of one prompt meets the i-th of the other; prompts of the
same length only) or ``"cls"`` (the [CLS] position alone, which attends to the whole prompt and
is what a classification head reads: it barely depends on the order of the virtual tokens,
which is arbitrary (only their position embeddings change), and it is defined for prompts of
any length). The metric names are ``"on"`` and ``"on_cls"`` (``ON_METRICS``).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .modules import SoftPrompt, insert_prompt


def cosine(a: SoftPrompt | torch.Tensor, b: SoftPrompt | torch.Tensor) -> float:
    """Cosine of the flattened prompt embeddings (prompts of the same shape)."""
    x, y = _w(a).flatten(), _w(b).flatten()
    if x.shape != y.shape:
        raise ValueError(f"cosine: prompts of different shapes {tuple(_w(a).shape)} and "
                         f"{tuple(_w(b).shape)}")
    return float(torch.nn.functional.cosine_similarity(x, y, dim=0))


def token_cosine(a: SoftPrompt | torch.Tensor, b: SoftPrompt | torch.Tensor) -> float:
    """Mean over positions of the cosine between the i-th virtual tokens."""
    x, y = _w(a), _w(b)
    if x.shape != y.shape:
        raise ValueError("token_cosine: prompts of different shapes")
    return float(torch.nn.functional.cosine_similarity(x, y, dim=-1).mean())


def _w(p) -> torch.Tensor:
    return (p.weight if isinstance(p, SoftPrompt) else p).detach().float()


def _ffn_modules(model: nn.Module) -> list[nn.Module]:
    mods = [m for name, m in model.named_modules()
            if name.endswith("intermediate") and hasattr(m, "dense")]
    if not mods:
        raise ValueError("activated_neurons: no BERT-style `intermediate` FFN modules found")
    return mods


POSITIONS = ("prompt", "cls")
ON_METRICS = {"on": "prompt", "on_cls": "cls"}     # metric name -> positions compared


@torch.no_grad()
def activated_neurons(model: nn.Module, prompt: SoftPrompt, cls_id: int = 101,
                      sep_id: int = 102, positions: str = "prompt") -> torch.Tensor:
    """Binary FFN activations of the prompt alone: ``[layers, n_tokens * intermediate]`` at the
    prompt positions, or ``[layers, intermediate]`` at [CLS] (``positions="cls"``)."""
    if positions not in POSITIONS:
        raise ValueError(f"activated_neurons: positions must be one of {POSITIONS}, "
                         f"got {positions!r}")
    base = getattr(model, "base_model", model)
    acts: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: acts.append(out.detach()))
             for m in _ffn_modules(base)]
    try:
        was = base.training
        base.eval()
        ids = torch.tensor([[cls_id, sep_id]])
        embeds = base.get_input_embeddings()(ids)
        embeds, mask, types = insert_prompt(prompt(1), embeds, torch.ones_like(ids),
                                            torch.zeros_like(ids))
        base(inputs_embeds=embeds, attention_mask=mask, token_type_ids=types)
        base.train(was)
    finally:
        for h in hooks:
            h.remove()
    lo, hi = (1, 1 + prompt.n_tokens) if positions == "prompt" else (0, 1)
    return torch.stack([(a[0, lo:hi] > 0).flatten().float() for a in acts])


def on_similarity(acts_a: torch.Tensor, acts_b: torch.Tensor, per_layer: bool = False):
    """Cosine of binary activation patterns, averaged over layers (or the per-layer list)."""
    if acts_a.shape != acts_b.shape:
        raise ValueError(f"on_similarity: activation patterns of different shapes "
                         f"{tuple(acts_a.shape)} and {tuple(acts_b.shape)} (prompts of different "
                         f"lengths, or models of different depth or FFN width)")
    sims = torch.nn.functional.cosine_similarity(acts_a, acts_b, dim=-1, eps=1e-8)
    return sims.tolist() if per_layer else float(sims.mean())


def similarity_matrix(prompts: Mapping[str, SoftPrompt], model: nn.Module | None = None,
                      metrics: Sequence[str] = ("cosine", "token_cosine", "on", "on_cls")) -> dict:
    """``{metric: {a: {b: value}}}`` over every pair of a prompt library (ON needs ``model``)."""
    names = list(prompts)
    acts = {m: {k: activated_neurons(model, p, positions=ON_METRICS[m]) for k, p in prompts.items()}
            for m in metrics if m in ON_METRICS}
    out: dict = {}
    for metric in metrics:
        table = {}
        for a in names:
            row = {}
            for b in names:
                if metric == "cosine":
                    row[b] = cosine(prompts[a], prompts[b])
                elif metric == "token_cosine":
                    row[b] = token_cosine(prompts[a], prompts[b])
                elif metric in ON_METRICS:
                    row[b] = on_similarity(acts[metric][a], acts[metric][b])
                else:
                    raise ValueError(f"unknown similarity metric {metric!r}")
            table[a] = row
        out[metric] = table
    return out


def most_similar(target: SoftPrompt, library: Mapping[str, SoftPrompt], model: nn.Module,
                 exclude: Sequence[str] = (), positions: str = "prompt") -> tuple[str, dict]:
    """The library prompt whose ON similarity to ``target`` is highest, and all the scores."""
    t = activated_neurons(model, target, positions=positions)
    scores = {k: on_similarity(t, activated_neurons(model, p, positions=positions))
              for k, p in library.items() if k not in set(exclude)}
    if not scores:
        raise ValueError("most_similar: the library has no candidate prompt")
    return max(scores, key=scores.get), scores
