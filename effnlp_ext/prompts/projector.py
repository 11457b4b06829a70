"""Cross-model prompt transfer through a learned projector (Su et al., 2022).

A 2-layer MLP maps each virtual token of a source model's prompt into the target model's
input-embedding space: ``Linear(H_s, hidden) -> tanh -> Linear(hidden, H_t)``. It is trained on
one task by task tuning: the source prompt is fixed, the projected prompt drives the frozen
target model, and only the projector (and the target's task head) learn. Once trained, it maps
other tasks' source prompts to the target model with no further training (zero-shot).
"""
from __future__ import annotations

import torch
from torch import nn

from .modules import SoftPrompt


class PromptProjector(nn.Module):
    def __init__(self, source_hidden: int, target_hidden: int, hidden: int = 768):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(source_hidden, hidden), nn.Tanh(),
                                 nn.Linear(hidden, target_hidden))

    def forward(self, prompt: torch.Tensor) -> torch.Tensor:
        return self.net(prompt)

    @torch.no_grad()
    def project(self, prompt: SoftPrompt) -> SoftPrompt:
        """A target-model prompt from a source prompt (no gradient)."""
        w = self(prompt.weight.detach())
        return SoftPrompt(prompt.n_tokens, w.shape[-1], w)


class ProjectedPrompt(nn.Module):
    """A fixed source prompt seen through a trainable projector: a drop-in for ``SoftPrompt``
    in ``PromptedClassifier`` while the projector trains."""

    def __init__(self, source: SoftPrompt, projector: PromptProjector):
        super().__init__()
        self.register_buffer("source", source.weight.detach().clone())
        self.projector = projector

    @property
    def n_tokens(self) -> int:
        return self.source.shape[0]

    @property
    def hidden(self) -> int:
        return self.projector.net[-1].out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.projector(self.source)

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.weight.unsqueeze(0).expand(batch_size, -1, -1)
