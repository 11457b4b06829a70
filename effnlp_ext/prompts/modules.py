"""Soft prompts for frozen HF encoders (prompt tuning).

``SoftPrompt`` holds n learnable virtual-token embeddings. ``PromptedClassifier`` wraps an HF
``*ForSequenceClassification`` model, freezes the whole pretrained model except its
classification head (an encoder has no verbaliser to reuse, so the head is trained with the
prompt), and inserts the prompt right after ``[CLS]``: ``[CLS] p_1 .. p_n x_1 .. [SEP]``. The
``[CLS]`` state the pooler reads stays at position 0; the attention mask and token types are
extended to cover the prompt (mask 1, type 0).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn


class SoftPrompt(nn.Module):
    """``n_tokens`` virtual tokens of size ``hidden``.

    Initialisations: ``random`` (normal, std 0.02 like BERT's embeddings), ``vocab`` (rows of
    an embedding table sampled without replacement, special tokens excluded), or ``from_prompt``
    (a copy of another prompt)."""

    def __init__(self, n_tokens: int, hidden: int, weight: torch.Tensor | None = None):
        super().__init__()
        if n_tokens < 1 or hidden < 1:
            raise ValueError(f"SoftPrompt: n_tokens and hidden must be positive, got "
                             f"{n_tokens}, {hidden}")
        if weight is None:
            weight = torch.randn(n_tokens, hidden) * 0.02
        if tuple(weight.shape) != (n_tokens, hidden):
            raise ValueError(f"SoftPrompt: weight must be [{n_tokens}, {hidden}], got "
                             f"{tuple(weight.shape)}")
        self.weight = nn.Parameter(weight.detach().clone().float())

    @property
    def n_tokens(self) -> int:
        return self.weight.shape[0]

    @property
    def hidden(self) -> int:
        return self.weight.shape[1]

    @classmethod
    def random(cls, n_tokens: int, hidden: int, seed: int = 0) -> "SoftPrompt":
        g = torch.Generator().manual_seed(seed)
        return cls(n_tokens, hidden, torch.randn(n_tokens, hidden, generator=g) * 0.02)

    @classmethod
    def from_vocab(cls, embeddings: nn.Embedding, n_tokens: int, seed: int = 0,
                   exclude: tuple[int, ...] = ()) -> "SoftPrompt":
        g = torch.Generator().manual_seed(seed)
        pool = torch.tensor([i for i in range(embeddings.num_embeddings) if i not in set(exclude)])
        if pool.numel() < n_tokens:
            raise ValueError("SoftPrompt.from_vocab: fewer usable tokens than n_tokens")
        rows = pool[torch.randperm(pool.numel(), generator=g)[:n_tokens]]
        return cls(n_tokens, embeddings.embedding_dim, embeddings.weight.detach()[rows])

    @classmethod
    def from_prompt(cls, other: "SoftPrompt") -> "SoftPrompt":
        return cls(other.n_tokens, other.hidden, other.weight.detach())

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.weight.unsqueeze(0).expand(batch_size, -1, -1)

    def save(self, path: str | Path, **meta) -> None:
        """Saves the prompt with its metadata (model, task, length, anything given)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        torch.save(self.weight.detach().cpu(), path / "prompt.pt")
        meta = {"n_tokens": self.n_tokens, "hidden": self.hidden, **meta}
        (path / "prompt.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> tuple["SoftPrompt", dict]:
        path = Path(path)
        meta = json.loads((path / "prompt.json").read_text())
        weight = torch.load(path / "prompt.pt", map_location="cpu")
        return cls(meta["n_tokens"], meta["hidden"], weight), meta


def classifier_head(model: nn.Module) -> nn.Module:
    head = getattr(model, "classifier", None)
    if head is None:
        raise ValueError("PromptedClassifier: the model has no `classifier` head (give an HF "
                         "*ForSequenceClassification model)")
    return head


def insert_prompt(prompt: torch.Tensor, inputs_embeds: torch.Tensor, attention_mask=None,
                  token_type_ids=None):
    """``[CLS] prompt rest``: embeddings, mask and token types with the prompt after position 0."""
    B, n = inputs_embeds.shape[0], prompt.shape[1]
    embeds = torch.cat([inputs_embeds[:, :1], prompt.to(inputs_embeds.dtype), inputs_embeds[:, 1:]], 1)
    ones = torch.ones(B, n, dtype=torch.long, device=inputs_embeds.device)
    if attention_mask is None:
        attention_mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long,
                                    device=inputs_embeds.device)
    mask = torch.cat([attention_mask[:, :1], ones.to(attention_mask.dtype), attention_mask[:, 1:]], 1)
    types = None
    if token_type_ids is not None:
        types = torch.cat([token_type_ids[:, :1], torch.zeros_like(ones), token_type_ids[:, 1:]], 1)
    return embeds, mask, types


class PromptedClassifier(nn.Module):
    """A frozen HF sequence classifier driven by a soft prompt (plus its trainable head)."""

    def __init__(self, model: nn.Module, prompt: SoftPrompt, train_head: bool = True):
        super().__init__()
        emb = model.get_input_embeddings()
        if emb.embedding_dim != prompt.hidden:
            raise ValueError(f"PromptedClassifier: prompt hidden size {prompt.hidden} != the "
                             f"model's embedding size {emb.embedding_dim}")
        self.model, self.prompt = model, prompt
        for p in model.parameters():
            p.requires_grad_(False)
        if train_head:
            for p in classifier_head(model).parameters():
                p.requires_grad_(True)

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.eval()        # the frozen PLM keeps its dropout off
        return self

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, **kw):
        embeds = self.model.get_input_embeddings()(input_ids)
        embeds, mask, types = insert_prompt(self.prompt(input_ids.shape[0]), embeds,
                                            attention_mask, token_type_ids)
        return self.model(inputs_embeds=embeds, attention_mask=mask, token_type_ids=types,
                          labels=labels, **kw)

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
