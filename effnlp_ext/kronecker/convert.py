"""Compress a Hugging Face BERT-family model with Kronecker-factored layers, and save/load it.

``compress`` swaps the ``nn.Linear`` layers of the encoder blocks (attention Q/K/V/O and the
FFN) for ``KronLinear`` initialised by the nearest Kronecker sum, and optionally the word
embedding for ``KronEmbedding``, in place. The result is the same HF model object with the same
forward signature; only the encoder's weights are factored (pooler and task heads stay dense).

A compressed model cannot be reloaded with ``from_pretrained`` alone, because the checkpoint
holds factors ``A``/``B`` where the architecture expects ``weight``. ``save_compressed`` writes
``save_pretrained``'s output plus ``kronecker.json`` with every factored layer's shapes, and
``load_compressed`` rebuilds the architecture from the config, re-creates those layers, then
loads the saved state dict strictly.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import load_saved_weights
from .decompose import DEFAULT_MIN_SPEEDUP, kron_flops, kroneckerbert_shapes
from .modules import KronEmbedding, KronLinear

__all__ = ["DEFAULT_TARGETS", "compress", "compression_report", "save_compressed",
           "load_compressed"]

DEFAULT_TARGETS = ("query", "key", "value", "attention.output.dense", "intermediate.dense",
                   "output.dense")
_LAYER_PATH = re.compile(r"(?:^|\.)encoder\.layer\.\d+\.(.+)$")
_META_FILE = "kronecker.json"


def _matches(name: str, targets) -> bool:
    """Whether module ``name`` is an encoder-block layer named by ``targets``.

    A dotted target names the full path inside the block (``"output.dense"`` is the FFN's
    output, not ``"attention.output.dense"``); a bare target matches the last path component
    (``"query"`` matches ``"attention.self.query"``).
    """
    m = _LAYER_PATH.search(name)
    if m is None:
        return False
    inner = m.group(1)
    return any(inner == t or ("." not in t and inner.endswith("." + t)) for t in targets)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def compress(model: nn.Module, cf: float | None = None, targets=DEFAULT_TARGETS,
             compress_embeddings: bool = False, rank: int | None = None,
             max_rank: int | None = 8, preset: str | None = None, embedding_n: int = 2,
             embedding_rank: int = 1, min_speedup: float | None = DEFAULT_MIN_SPEEDUP
             ) -> nn.Module:
    """Replace the targeted encoder linears of an HF BERT-family model by ``KronLinear``, in place.

    Args:
        model: e.g. ``BertModel`` or ``BertForSequenceClassification`` (anything whose encoder
            blocks live at ``...encoder.layer.<i>``).
        cf: target compression factor per layer; the factor shapes (and the rank, unless
            ``rank`` is given) are searched per layer by ``choose_factor_shapes``.
        targets: layer paths inside an encoder block to factor (see ``_matches``).
        compress_embeddings: also factor the word embedding as ``A (v x d/n) (x) B (1 x n)``
            with ``n = embedding_n`` and ``embedding_rank`` terms. Refused for models whose
            output embedding is tied to it (a factored table cannot be shared with a decoder).
        rank: fix the number of Kronecker terms (default: searched, up to ``max_rank``).
        max_rank: highest rank the search may pick.
        min_speedup: the search keeps only factorisations whose FLOPs per token are at least
            this many times fewer than the dense layer's (``FactorCandidate.flops_ratio``), so
            that the compressed model is faster as well as smaller. The default,
            ``DEFAULT_MIN_SPEEDUP``, is the floor at which MiniLM's searched layers measured
            faster than dense on CPU; None searches for the least error at ``cf`` whatever the
            cost (rank 7-8 sums, often slower than the dense model). A layer with no
            factorisation that meets both ``cf`` and ``min_speedup`` raises ``ValueError``.
            Not used with ``preset``.
        preset: ``"kroneckerbert"`` uses the paper's fixed shapes (``kroneckerbert_shapes``) at
            ``rank`` (default 1) instead of a search; give either ``cf`` or ``preset``.
    Returns:
        ``model`` itself, with ``model.kron_report`` set to ``compression_report(model)``.
    """
    if (cf is None) == (preset is None):
        raise ValueError("compress: give exactly one of cf (shape search) or preset")
    if preset is not None and preset != "kroneckerbert":
        raise ValueError(f"compress: unknown preset {preset!r} (known: 'kroneckerbert')")
    if compress_embeddings and hasattr(model, "get_output_embeddings") \
            and model.get_output_embeddings() is not None:
        raise ValueError("compress: the model ties its output embedding to the word embedding; "
                         "a factored table cannot be shared, so compress_embeddings is refused")
    chosen = [(name, mod) for name, mod in model.named_modules()
              if isinstance(mod, nn.Linear) and _matches(name, targets)]
    if not chosen:
        raise ValueError(f"compress: no nn.Linear inside encoder layers matches {tuple(targets)}")
    for name, linear in chosen:
        if preset is not None:
            shapes = kroneckerbert_shapes(linear.out_features, linear.in_features)
            new = KronLinear.from_linear(linear, shapes=shapes, rank=rank or 1)
        else:
            try:
                new = KronLinear.from_linear(linear, cf=cf, rank=rank, max_rank=max_rank,
                                             min_speedup=min_speedup)
            except ValueError as err:
                raise ValueError(f"compress: layer {name}: {err}") from err
        _set_module(model, name, new)
    if compress_embeddings:
        emb = model.get_input_embeddings()
        if not isinstance(emb, nn.Embedding):
            raise ValueError(f"compress: input embedding is {type(emb).__name__}, "
                             f"not nn.Embedding")
        model.set_input_embeddings(KronEmbedding.from_embedding(emb, n=embedding_n,
                                                                rank=embedding_rank))
    model.kron_report = compression_report(model)
    return model


def _layer_meta(module: nn.Module) -> dict | None:
    """The constructor arguments that rebuild a factored layer (None for other modules)."""
    if isinstance(module, KronLinear):
        return {"type": "KronLinear", "in_features": module.in_features,
                "out_features": module.out_features, "shapes": list(module.shapes),
                "rank": module.rank, "bias": module.bias is not None}
    if isinstance(module, KronEmbedding):
        return {"type": "KronEmbedding", "num_embeddings": module.num_embeddings,
                "embedding_dim": module.embedding_dim, "n": module.n, "rank": module.rank,
                "padding_idx": module.padding_idx}
    return None


def compression_report(model: nn.Module) -> dict:
    """Parameter counts and per-layer factorisation of a (possibly) compressed model.

    The dense counts are derived from each factored layer's sizes, so this works on a model
    loaded by ``load_compressed`` too. Keys: ``params_total`` (now) and
    ``params_total_dense`` (with every factored layer dense again), ``params_layers`` /
    ``params_layers_dense`` (factored layers' weights, biases excluded), ``cf_layers`` and
    ``cf_model`` (the two ratios), ``flops_layers`` / ``flops_layers_dense`` (FLOPs per token
    of the factored linears and of the same linears dense; ``kron_flops``) and their ratio
    ``flops_ratio_layers``, and ``layers``: one dict per factored layer with its meta,
    ``params``, ``dense_params``, ``cf``, ``rel_error``, for linears ``flops``, ``dense_flops``
    and ``flops_ratio``, and, when a shape search ran, ``chosen`` and ``candidates`` (see
    ``FactorCandidate``). Embeddings are lookups and count no FLOPs.
    """
    layers, kron, dense, flops, flops_dense = [], 0, 0, 0, 0
    for name, module in model.named_modules():
        meta = _layer_meta(module)
        if meta is None:
            continue
        n_kron = module.A.numel() + module.B.numel()
        if isinstance(module, KronLinear):
            n_dense = module.in_features * module.out_features
        else:
            n_dense = module.num_embeddings * module.embedding_dim
        entry = {"name": name, **meta, "params": n_kron, "dense_params": n_dense,
                 "cf": n_dense / n_kron, "rel_error": module.rel_error}
        if isinstance(module, KronLinear):
            f_kron = kron_flops(module.shapes, module.rank)
            f_dense = 2 * n_dense
            entry.update(flops=f_kron, dense_flops=f_dense, flops_ratio=f_dense / f_kron)
            flops, flops_dense = flops + f_kron, flops_dense + f_dense
        if getattr(module, "candidates", None):
            entry["chosen"] = module.choice.as_dict()
            entry["candidates"] = [c.as_dict() for c in module.candidates]
        layers.append(entry)
        kron, dense = kron + n_kron, dense + n_dense
    total = sum(p.numel() for p in model.parameters())
    total_dense = total - kron + dense
    return {"params_total": total, "params_total_dense": total_dense,
            "params_layers": kron, "params_layers_dense": dense,
            "cf_layers": dense / kron if kron else 1.0,
            "cf_model": total_dense / total, "flops_layers": flops,
            "flops_layers_dense": flops_dense,
            "flops_ratio_layers": flops_dense / flops if flops else 1.0, "layers": layers}


def save_compressed(model: nn.Module, path: str | Path) -> None:
    """``model.save_pretrained(path)`` plus ``kronecker.json`` describing the factored layers."""
    path = Path(path)
    model.save_pretrained(path)
    layers = {name: meta for name, mod in model.named_modules()
              if (meta := _layer_meta(mod)) is not None}
    report = getattr(model, "kron_report", None) or compression_report(model)
    meta = {"format": 1, "model_class": type(model).__name__,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "layers": layers, "report": report}
    (path / _META_FILE).write_text(json.dumps(meta, indent=1))


def load_compressed(path: str | Path) -> nn.Module:
    """Rebuild a model written by ``save_compressed`` (architecture from its config, factored
    layers from ``kronecker.json``, weights from the checkpoint), in eval mode."""
    import transformers

    path = Path(path)
    meta_file = path / _META_FILE
    if not meta_file.exists():
        raise FileNotFoundError(f"load_compressed: {meta_file} not found; was {path} written "
                                f"by save_compressed?")
    meta = json.loads(meta_file.read_text())
    config = transformers.AutoConfig.from_pretrained(path)
    model = getattr(transformers, meta["model_class"])(config)
    dtype = getattr(torch, meta["dtype"])
    for name, spec in meta["layers"].items():
        spec = dict(spec)
        kind = spec.pop("type")
        if kind == "KronLinear":
            module = KronLinear(spec["in_features"], spec["out_features"], tuple(spec["shapes"]),
                                spec["rank"], bias=spec["bias"])
        else:
            module = KronEmbedding(**spec)
        _set_module(model, name, module)
    model.to(dtype)
    load_saved_weights(model, path, "load_compressed")
    for entry in meta["report"]["layers"]:
        model.get_submodule(entry["name"]).rel_error = entry["rel_error"]
    model.kron_report = meta["report"]
    return model.eval()
