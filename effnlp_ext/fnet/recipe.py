"""BERT -> FNet end to end: convert, fine-tune with the shared Trainer, measure against the teacher.

Two starting points:
  ``init="base"``     the pretrained encoder (the offline MiniLM) converted to FNet, then
                      fine-tuned on the task's gold labels: the issue's plain recipe;
  ``init="teacher"``  the fine-tuned teacher converted to FNet (its task-tuned FFNs and head are
                      kept), then fine-tuned on gold labels plus the teacher's logits
                      (``PredictionKD``, ``kd_weight`` / ``label_weight``); with
                      ``hidden_kd_weight > 0`` the FNet's block outputs are also pulled toward
                      the teacher's (``IntermediateKD`` hidden-state MSE, same forward passes).
``finetune_fnet`` returns teacher and FNet dev accuracy, the ratio, parameters and CPU latency at
batch 1 and 32 measured side by side. Used by ``effnlp fnet finetune`` and experiments/.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..data import (DynamicPaddingCollator, LengthBucketBatchSampler, compute_metrics, encode,
                    get_task, load_task, seeded_subset)
from ..training import TrainConfig, Trainer
from ..training.distill import IntermediateKD, PredictionKD
from ..training.evaluate import latency_ms, main_metric
from ..training.heads import start_at_label_mean
from ..training.teacher import TeacherConfig, base_model_path, load_teacher
from .convert import bert_to_fnet


@dataclass
class FNetConfig:
    task: str = "sst2"
    init: str = "base"                 # "base" (pretrained MiniLM) or "teacher"
    teacher_train_size: int | None = None
    teacher_settings: dict = field(default_factory=dict)   # other TeacherConfig fields
    train_size: int | None = None      # seeded subset of the train split; None: all of it
    epochs: float = 1.0
    lr: float = 1e-4
    kd_weight: float = 1.0             # init="teacher" only
    label_weight: float = 1.0          # init="teacher" only
    hidden_kd_weight: float = 0.0      # init="teacher" only: per-layer hidden-state MSE weight
    temperature: float = 2.0
    batch_size: int = 32
    max_length: int = 128
    use_lengths: bool = True
    layers: tuple | None = None        # attention blocks to replace (None: all; FNet-Hybrid: not the top 2)
    seed: int = 42


def finetune_fnet(config: FNetConfig, data_dir: str | Path, out: str | Path) -> dict:
    """Runs (or resumes) the fine-tuning in ``out`` and returns the side-by-side measurements."""
    from transformers import AutoModelForSequenceClassification

    if config.init not in ("base", "teacher"):
        raise ValueError(f"finetune_fnet: init must be 'base' or 'teacher', got {config.init!r}")
    if config.hidden_kd_weight and config.init != "teacher":
        raise ValueError("finetune_fnet: hidden_kd_weight needs init='teacher'")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    task = get_task(config.task)
    teacher, tokenizer, record = load_teacher(
        TeacherConfig(task=task.name, train_size=config.teacher_train_size,
                      **config.teacher_settings), data_dir)
    if config.init == "teacher":
        student = copy.deepcopy(teacher)
    else:
        student = AutoModelForSequenceClassification.from_pretrained(
            base_model_path(record["config"]["base"]), num_labels=task.num_labels)
    bert_to_fnet(student, use_lengths=config.use_lengths, layers=config.layers)
    train = seeded_subset(load_task(task.name, "train", data_dir), config.train_size, config.seed)
    if config.init == "base":   # a fresh head: regression heads start at the label mean
        start_at_label_mean(student, [e.label for e in train])
    dev = load_task(task.name, "dev", data_dir)
    train_f = encode(train, tokenizer, config.max_length)
    dev_f = encode(dev, tokenizer, config.max_length)
    collator = DynamicPaddingCollator.from_tokenizer(tokenizer)
    dev_loader = DataLoader(dev_f, batch_size=64, collate_fn=collator)
    sampler = LengthBucketBatchSampler([len(f["input_ids"]) for f in train_f], config.batch_size,
                                       seed=config.seed)
    init_acc = main_metric(student, dev_loader, task.name)
    student.train()
    step_fn = None
    if config.init == "teacher":
        kd = PredictionKD(temperature=config.temperature, kd_weight=config.kd_weight,
                          label_weight=config.label_weight)
        if config.hidden_kd_weight:
            kd = IntermediateKD(embedding_weight=0.0, attention_weight=0.0,
                                hidden_weight=config.hidden_kd_weight, prediction=kd)
        step_fn = kd.bind(teacher)
    cfg = TrainConfig(lr=config.lr, epochs=config.epochs, batch_size=config.batch_size,
                      warmup_ratio=0.06, seed=config.seed, output_dir=str(out / "run"),
                      save_every=100, eval_every=max(1, len(sampler) // 4),
                      metric_for_best=task.metrics[0])
    t0 = time.time()
    with Trainer(student, cfg, train_dataset=train_f, collate_fn=collator, batch_sampler=sampler,
                 eval_loader=dev_loader, step_fn=step_fn,
                 metric_fn=lambda lg, lb: compute_metrics(task.name, lg, lb)) as trainer:
        trainer.train(resume=(out / "run" / "checkpoint.pt").exists())
        trainer.load_best()
    seconds = time.time() - t0
    student.save_pretrained(out / "model")
    teacher_acc = main_metric(teacher, dev_loader, task.name)
    student_acc = main_metric(student, dev_loader, task.name)
    res = {
        "config": asdict(config), "teacher": record["config"], "train_size": len(train),
        "teacher_acc": teacher_acc, "fnet_init_acc": init_acc, "fnet_acc": student_acc,
        "fraction_of_teacher": student_acc / teacher_acc,
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "fnet_params": sum(p.numel() for p in student.parameters()),
        "teacher_ms_b1": latency_ms(teacher, dev_f, collator, 1),
        "fnet_ms_b1": latency_ms(student, dev_f, collator, 1),
        "teacher_ms_b32": latency_ms(teacher, dev_f, collator, 32),
        "fnet_ms_b32": latency_ms(student, dev_f, collator, 32),
        "train_seconds": round(seconds, 1), "threads": torch.get_num_threads(),
    }
    (out / "results.json").write_text(json.dumps(res, indent=2))
    return res
