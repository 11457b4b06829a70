"""TAMT end to end: find a subnetwork of the pretrained encoder, then fine-tune it on a task.

1. ``find_mask``: apply masks to the pretrained BertModel (weights frozen), initialise the
   scores (OMP or random) at the target sparsity, then (``objective``) train the scores on
   unlabeled sentences of the task's train split (labels dropped) with
   * ``kd``: hidden-state and pre-softmax attention MSE against the dense pretrained model
     (``training.distill.IntermediateKD``), or
   * ``mlm``: masked-language modelling. MiniLM ships no MLM head, so one is initialised:
     HF's ``BertForMaskedLM`` builds a fresh transform (dense + LayerNorm, random init) and ties
     the decoder to the word embeddings;
   * ``none``: the initial mask as is (OMP = one-shot magnitude pruning).
   The threshold is reset to the k-th score every ``reset_every`` steps, so the sparsity stays
   exact while the scores move.
2. ``finetune``: a sequence classifier from the same pretrained weights with the mask fixed
   (scores frozen, weights trainable) or dense (``masks=None``), the same subset, epochs and
   learning rate for every contender; dev accuracy at the end; then ``export`` and the
   exported model's accuracy and CPU latency.
Everything runs with the shared ``Trainer`` and resumes after a kill.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..data import (DynamicPaddingCollator, LengthBucketBatchSampler, encode,
                    get_task, load_task, seeded_subset)
from ..training import TrainConfig, Trainer
from ..training.distill import IntermediateKD
from ..training.evaluate import latency_ms, main_metric
from ..training.heads import start_at_label_mean
from ..training.teacher import OFFLINE_BASE, base_model_path
from .export import export
from .modules import DEFAULT_TARGETS, apply_masks, masked_modules
from .pruning import get_masks, init_scores, reset_thresholds, set_masks, sparsity_report


@dataclass
class TamtConfig:
    sparsity: float = 0.7
    init: str = "omp"                 # "omp" or "random"
    objective: str = "kd"             # "kd", "mlm" or "none"
    scope: str = "layer"              # top-k per matrix, or "global" (see README: pooler collapse)
    targets: tuple = DEFAULT_TARGETS
    task: str = "sst2"
    base: str = OFFLINE_BASE
    mask_train_size: int = 8000       # unlabeled sentences for mask training (seeded subset)
    mask_epochs: float = 1.0
    mask_lr: float = 2e-4
    reset_every: int = 10
    mlm_probability: float = 0.15
    finetune_size: int = 8000         # labeled sentences for fine-tuning (seeded subset)
    finetune_epochs: float = 2.0
    finetune_lr: float = 1e-4
    batch_size: int = 32
    max_length: int = 64
    seed: int = 42
    progress: bool = False
    extra: dict = field(default_factory=dict)


def _tokenizer(base: str):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(base_model_path(base))


def mlm_inputs(batch, tokenizer, probability: float, generator: torch.Generator):
    """BERT's masking: of ``probability`` of the real tokens, 80% [MASK], 10% random, 10% kept."""
    ids = batch["input_ids"].clone()
    labels = ids.clone()
    special = torch.zeros_like(ids, dtype=torch.bool)
    for t in tokenizer.all_special_ids:
        special |= ids == t
    pick = (torch.rand(ids.shape, generator=generator) < probability) & ~special
    labels[~pick] = -100
    u = torch.rand(ids.shape, generator=generator)
    ids[pick & (u < 0.8)] = tokenizer.mask_token_id
    rnd = pick & (u >= 0.8) & (u < 0.9)
    ids[rnd] = torch.randint(len(tokenizer), ids.shape, generator=generator)[rnd]
    out = {k: v for k, v in batch.items() if k != "labels"}
    out.update(input_ids=ids, labels=labels)
    return out


def find_mask(config: TamtConfig, data_dir, out) -> dict:
    """Mask of the pretrained encoder at ``config.sparsity``; saved to ``out/masks.pt``."""
    from transformers import AutoModel, BertForMaskedLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "masks.pt").exists():
        return torch.load(out / "masks.pt")
    path = base_model_path(config.base)
    tokenizer = _tokenizer(config.base)
    if config.objective == "mlm":
        full = BertForMaskedLM.from_pretrained(path)  # fresh MLM transform, decoder tied
        encoder = full.bert
    else:
        full = encoder = AutoModel.from_pretrained(path)
    for p in full.parameters():
        p.requires_grad_(False)
    apply_masks(encoder, config.targets, train_weight=False)
    init_scores(encoder, config.init, config.sparsity, config.scope, seed=config.seed)
    t0 = time.time()
    if config.objective != "none":
        train = seeded_subset(load_task(config.task, "train", data_dir), config.mask_train_size,
                       config.seed + 1)
        feats = encode(train, tokenizer, config.max_length)
        for f in feats:
            f.pop("labels")  # task-agnostic: the text only
        collator = DynamicPaddingCollator.from_tokenizer(tokenizer)
        sampler = LengthBucketBatchSampler([len(f["input_ids"]) for f in feats], config.batch_size,
                                           seed=config.seed)
        for m in masked_modules(encoder).values():
            m.train_scores(True)
        calls = {"n": 0}

        def keep_sparsity():
            if calls["n"] % config.reset_every == 0:
                reset_thresholds(encoder, config.sparsity, config.scope)
            calls["n"] += 1

        if config.objective == "kd":
            teacher = AutoModel.from_pretrained(path).eval()
            kd = IntermediateKD(embedding_weight=0.0 if "word_embeddings" not in config.targets else 1.0)

            def step(model, batch):
                keep_sparsity()
                return kd(model, teacher, batch)
        elif config.objective == "mlm":
            gen = torch.Generator().manual_seed(config.seed)

            def step(model, batch):
                keep_sparsity()
                return model(**mlm_inputs(batch, tokenizer, config.mlm_probability, gen)).loss
        else:
            raise ValueError(f"objective must be 'kd', 'mlm' or 'none', got {config.objective!r}")
        cfg = TrainConfig(lr=config.mask_lr, epochs=config.mask_epochs, batch_size=config.batch_size,
                          warmup_ratio=0.06, seed=config.seed, output_dir=str(out / "run"),
                          save_every=50, progress=config.progress, max_grad_norm=None)
        with Trainer(full, cfg, train_dataset=feats, collate_fn=lambda b: collator(
                [{**f, "labels": 0} for f in b]), batch_sampler=sampler, step_fn=step) as trainer:
            trainer.train(resume=(out / "run" / "checkpoint.pt").exists())
        reset_thresholds(encoder, config.sparsity, config.scope)
    masks = get_masks(encoder)
    torch.save(masks, out / "masks.pt")
    rep = sparsity_report(masks)
    (out / "mask.json").write_text(json.dumps({"config": asdict(config), "sparsity": rep,
                                               "seconds": round(time.time() - t0, 1)}, indent=1))
    return masks


def load_ticket(path, targets=DEFAULT_TARGETS):
    """The fine-tuned ticket saved by `finetune` in ``<out>/model``, exported for inference
    (``SparseLinear`` where the density allows it, see `export`)."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path)
    apply_masks(model.bert, targets, train_weight=False)
    set_masks(model.bert, torch.load(Path(path) / "masks.pt"))
    export(model.bert)
    return model.eval()


def finetune(config: TamtConfig, masks: dict | None, data_dir, out) -> dict:
    """Fine-tune the pretrained model with ``masks`` fixed (dense when None); dev accuracy."""
    from transformers import AutoModelForSequenceClassification

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "results.json").exists():
        return json.loads((out / "results.json").read_text())
    path = base_model_path(config.base)
    tokenizer = _tokenizer(config.base)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=get_task(config.task).num_labels)
    if masks is not None:
        apply_masks(model.bert, config.targets, train_weight=True)
        set_masks(model.bert, masks)
        for m in masked_modules(model.bert).values():
            m.train_scores(False)
    train = seeded_subset(load_task(config.task, "train", data_dir), config.finetune_size, config.seed)
    start_at_label_mean(model, [e.label for e in train])   # regression heads only
    dev = load_task(config.task, "dev", data_dir)
    train_f = encode(train, tokenizer, config.max_length)
    dev_f = encode(dev, tokenizer, config.max_length)
    collator = DynamicPaddingCollator.from_tokenizer(tokenizer)
    sampler = LengthBucketBatchSampler([len(f["input_ids"]) for f in train_f], config.batch_size,
                                       seed=config.seed)
    dev_loader = DataLoader(dev_f, batch_size=64, collate_fn=collator)
    cfg = TrainConfig(lr=config.finetune_lr, epochs=config.finetune_epochs,
                      batch_size=config.batch_size, warmup_ratio=0.06, weight_decay=0.01,
                      seed=config.seed, output_dir=str(out / "run"), save_every=100,
                      progress=config.progress)
    t0 = time.time()
    with Trainer(model, cfg, train_dataset=train_f, collate_fn=collator, batch_sampler=sampler) as tr:
        tr.train(resume=(out / "run" / "checkpoint.pt").exists())
    seconds = time.time() - t0
    res = {"config": asdict(config), "masked": masks is not None, "train_size": len(train),
           "dev_size": len(dev), "dev_accuracy": main_metric(model, dev_loader, config.task),
           "finetune_seconds": round(seconds, 1)}
    if masks is not None:
        res["sparsity"] = sparsity_report(get_masks(model.bert))["overall"]
        exported = copy.deepcopy(model)
        res["export_kinds"] = export(exported.bert)
        dense = copy.deepcopy(model)
        export(dense.bert, sparse=False)
        dense.save_pretrained(out / "model")    # the ticket, masks baked in: load_ticket()
        torch.save(get_masks(model.bert), out / "model" / "masks.pt")
        res["exported_dev_accuracy"] = main_metric(exported, dev_loader, config.task)
        res["ms_b32_exported"] = latency_ms(exported, dev_f, collator, 32)
        res["ms_b32_dense_baked"] = latency_ms(dense, dev_f, collator, 32)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    return res
