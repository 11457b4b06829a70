"""Adapters in HF BERT-family models: insertion (Pfeiffer placement), freezing, pruning of
layers whose switch chose identity, and saving/loading.

Pfeiffer placement: one adapter per layer, after the FFN output. Each layer's ``*Output``
block (``dense``, ``dropout``, ``LayerNorm``: ``LayerNorm(dropout(dense(h)) + residual)``) is
replaced by ``AdaptedOutput``, which applies the adapter to the FFN output before the residual
sum and LayerNorm. The block keeps the original submodules under their original names, so the
pre-trained weights keep their state-dict keys and ``save_pretrained`` / ``from_pretrained``
of the base model still fit; the adapter's weights are added under ``...output.adapter.*``
(and ``...output.switch.*``).
"""
from __future__ import annotations

import copy
import re
from pathlib import Path

import torch
from torch import nn

from .modules import Adapter, LayerSwitch

CONFIG_KEY = "effnlp_adapters"
_LAYER_OUTPUT = re.compile(r"(^|\.)layer\.(\d+)\.output$")


class AdaptedOutput(nn.Module):
    """A layer's FFN output block with an adapter (and optionally a switch) before the
    residual + LayerNorm. ``adapter`` None: the original block (a pruned layer)."""

    def __init__(self, output: nn.Module, adapter: Adapter | None, switch: LayerSwitch | None = None):
        super().__init__()
        self.dense, self.dropout, self.LayerNorm = output.dense, output.dropout, output.LayerNorm
        self.adapter = adapter
        self.switch = switch

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        h = self.dropout(self.dense(hidden_states))
        if self.adapter is not None:
            h = self.switch(h, self.adapter) if self.switch is not None else self.adapter(h)
        return self.LayerNorm(h + input_tensor)


def _is_output_block(module: nn.Module) -> bool:
    return all(hasattr(module, n) for n in ("dense", "dropout", "LayerNorm"))


def adapted_outputs(model: nn.Module) -> dict[int, AdaptedOutput]:
    """Layer index -> its ``AdaptedOutput``, in layer order."""
    found = {}
    for name, m in model.named_modules():
        match = _LAYER_OUTPUT.search(name)
        if match and isinstance(m, AdaptedOutput):
            found[int(match.group(2))] = m
    return dict(sorted(found.items()))


def _base(model: nn.Module) -> nn.Module:
    return getattr(model, "base_model", model)


def head_parameter_names(model: nn.Module) -> list[str]:
    """Parameters outside the base model (the task head: e.g. ``classifier.*``)."""
    base = _base(model)
    if base is model:
        return []
    prefix = getattr(model, "base_model_prefix", "") + "."
    return [n for n, _ in model.named_parameters() if not n.startswith(prefix)]


def add_adapters(model: nn.Module, reduction_factor: int = 16, activation: str | nn.Module = "relu",
                 switch: bool = False, temperature: float = 1.0) -> nn.Module:
    """Adds a Pfeiffer adapter (with a ``LayerSwitch`` when ``switch``) to every layer of an HF
    BERT-family model, in place, and freezes the pre-trained model: only the adapters, the
    switches and the task head (parameters outside ``model.base_model``) stay trainable.

    ``activation``: ``"relu"``, ``"rational"`` (rational, ReLU start), ``"rational:<approx>"``,
    or a module (each adapter gets a deep copy). Returns ``model``.
    """
    targets = [(name, m) for name, m in model.named_modules()
               if _LAYER_OUTPUT.search(name) and _is_output_block(m) and not isinstance(m, AdaptedOutput)]
    if not targets:
        raise ValueError("add_adapters: no '<...>.layer.<i>.output' blocks with dense/dropout/LayerNorm "
                         "found; is this an HF BERT-family model?")
    model.requires_grad_(False)
    for name, block in targets:
        hidden = block.dense.out_features
        act = activation if isinstance(activation, str) else copy.deepcopy(activation)
        adapter = Adapter(hidden, reduction_factor, act).to(block.dense.weight.device)
        sw = LayerSwitch(temperature).to(block.dense.weight.device) if switch else None
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, AdaptedOutput(block, adapter, sw))
    for n, p in model.named_parameters():
        if ".adapter." in n or ".switch." in n or n in set(head_parameter_names(model)):
            p.requires_grad_(True)
    config = getattr(model, "config", None)
    if config is not None:
        setattr(config, CONFIG_KEY, {
            "reduction_factor": int(reduction_factor),
            "activation": activation if isinstance(activation, str) else type(activation).__name__,
            "switch": bool(switch), "pruned_layers": []})
    return model


def adapter_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for o in adapted_outputs(model).values() if o.adapter is not None
               for p in o.adapter.parameters())


def trainable_parameter_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def switch_choices(model: nn.Module) -> dict[int, str]:
    """Layer index -> "adapter" / "identity" (the argmax of each switch; "adapter" for layers
    without a switch, "pruned" for removed ones)."""
    out = {}
    for i, o in adapted_outputs(model).items():
        out[i] = "pruned" if o.adapter is None else (o.switch.choice() if o.switch is not None else "adapter")
    return out


def prune_adapters(model: nn.Module, max_layers: int | None = None) -> dict:
    """Removes the adapters of layers whose switch chose identity and the switches of the
    others (their adapter is then always applied). ``max_layers``: a budget; when more layers
    chose "adapter", only the ``max_layers`` with the highest P(adapter) keep theirs. Returns a
    report: the layers kept and removed, and the adapter parameters left and removed."""
    kept, removed, removed_params = [], [], 0
    outputs = adapted_outputs(model)
    over_budget: set[int] = set()
    if max_layers is not None:
        if max_layers < 0:
            raise ValueError(f"prune_adapters: max_layers must be >= 0, got {max_layers}")
        if any(o.adapter is not None and o.switch is None for o in outputs.values()):
            raise ValueError("prune_adapters: max_layers needs a switch in every adapted layer")
        chosen = {i: float(o.switch.probabilities()[0]) for i, o in outputs.items()
                  if o.adapter is not None and o.switch.choice() == "adapter"}
        over_budget = set(sorted(chosen, key=lambda i: -chosen[i])[max_layers:])
    for i, o in outputs.items():
        if o.adapter is None:
            continue
        if o.switch is not None and (o.switch.choice() == "identity" or i in over_budget):
            removed_params += sum(p.numel() for p in o.adapter.parameters())
            o.adapter = None
            removed.append(i)
        else:
            kept.append(i)
        o.switch = None
    config = getattr(model, "config", None)
    if config is not None and isinstance(getattr(config, CONFIG_KEY, None), dict):
        info = dict(getattr(config, CONFIG_KEY))
        info["pruned_layers"] = sorted(set(info.get("pruned_layers", [])) | set(removed))
        info["switch"] = False
        setattr(config, CONFIG_KEY, info)
    return {"layers_kept": kept, "layers_removed": removed,
            "adapter_params": adapter_parameter_count(model), "adapter_params_removed": removed_params}


def keep_layers(model: nn.Module, layers) -> dict:
    """Removes the adapters (and switches) of every layer not in ``layers``, as
    ``prune_adapters`` does for layers whose switch chose identity; ``load_adapted`` rebuilds the
    result. Used to train adapters on a chosen set of layers only (e.g. those an adaptable
    adapter kept). Returns the same report as ``prune_adapters``."""
    outputs = adapted_outputs(model)
    layers = sorted({int(i) for i in layers})
    unknown = [i for i in layers if i not in outputs]
    if unknown:
        raise ValueError(f"keep_layers: no adapted layer {unknown}; the model has {sorted(outputs)}")
    removed, removed_params = [], 0
    for i, o in outputs.items():
        if i not in layers and o.adapter is not None:
            removed_params += sum(p.numel() for p in o.adapter.parameters())
            if o.switch is not None:
                removed_params += sum(p.numel() for p in o.switch.parameters())
            o.adapter, o.switch = None, None
            removed.append(i)
    config = getattr(model, "config", None)
    if config is not None and isinstance(getattr(config, CONFIG_KEY, None), dict):
        info = dict(getattr(config, CONFIG_KEY))
        info["pruned_layers"] = sorted(set(info.get("pruned_layers", [])) | set(removed))
        setattr(config, CONFIG_KEY, info)
    return {"layers_kept": [i for i in outputs if outputs[i].adapter is not None],
            "layers_removed": removed, "adapter_params": adapter_parameter_count(model),
            "adapter_params_removed": removed_params}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What adapter tuning changed: the adapters, switches and task head (a few % of the model)."""
    head = set(head_parameter_names(model))
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if ".adapter." in k or ".switch." in k or k in head}


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Loads ``adapter_state_dict`` output into a model prepared with the same ``add_adapters``
    (and ``prune_adapters``) calls; every adapter/switch/head key must match."""
    expected = set(adapter_state_dict(model))
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise RuntimeError(f"load_adapter_state: state does not fit the model; missing "
                           f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict(state, strict=False)
    return model


def load_adapted(path: str | Path, model_cls=None) -> nn.Module:
    """Rebuilds a model saved with ``save_pretrained`` after ``add_adapters`` (and possibly
    ``prune_adapters``): the base architecture from the config, the same adapters, then every
    saved weight."""
    import transformers

    from ..checkpoint import load_saved_weights

    config = transformers.AutoConfig.from_pretrained(str(path))
    info = getattr(config, CONFIG_KEY, None)
    if not isinstance(info, dict):
        raise ValueError(f"load_adapted: {path} has no '{CONFIG_KEY}' entry in its config")
    if model_cls is None:
        model_cls = getattr(transformers, config.architectures[0])
    model = model_cls(config)
    activation = info["activation"]
    if activation not in ("relu", "gelu", "tanh", "identity") and not activation.startswith("rational"):
        raise ValueError(f"load_adapted: custom activation module {activation!r} cannot be rebuilt")
    add_adapters(model, info["reduction_factor"], activation, switch=info["switch"])
    outputs = adapted_outputs(model)
    for i in info.get("pruned_layers", []):
        outputs[i].adapter = None
    setattr(model.config, CONFIG_KEY, info)
    return load_saved_weights(model, path, "load_adapted")
