"""Loading a ``save_pretrained`` folder into a model rebuilt by one of the method slices."""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn


def saved_state_dict(path: str | Path) -> dict:
    """The state dict of a ``save_pretrained`` directory (single or sharded safetensors)."""
    from safetensors.torch import load_file

    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state = {}
    for f in files:
        state.update(load_file(str(path / f)))
    return state


def load_saved_weights(model: nn.Module, path: str | Path, caller: str) -> nn.Module:
    """Loads the checkpoint in ``path`` into ``model``; every key must fit (tied weights aside)."""
    missing, unexpected = model.load_state_dict(saved_state_dict(path), strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"{caller}: checkpoint does not fit the rebuilt model; missing "
                           f"{missing[:5]}, unexpected {unexpected[:5]}")
    return model
