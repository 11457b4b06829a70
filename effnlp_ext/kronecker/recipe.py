"""KroneckerBERT's recipe end to end: compress a fine-tuned teacher, then distil in two stages.

Stage 1 (intermediate KD) matches the student's embedding outputs, pre-softmax attention scores
and FFN outputs to the teacher's, layer by layer; stage 2 (prediction KD) matches the logits
(optionally with the gold labels too). Both stages run with the shared ``Trainer`` and resume
after a kill. ``distill_kronecker`` returns the accuracies, parameters, FLOPs and CPU latency
of teacher and student measured side by side (FLOPs: per token of the encoder linears, and
per dev sample of the whole forward). Used by ``effnlp kron distill`` and
experiments/kron_distill.py.
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
from ..elue.flops import encoded_flops_per_sample
from ..training import TrainConfig, Trainer
from ..training.distill import IntermediateKD, PredictionKD
from ..training.evaluate import latency_ms, main_metric
from ..training.teacher import TeacherConfig, load_teacher
from .convert import compress, compression_report, save_compressed


@dataclass
class DistillConfig:
    """One KroneckerBERT run: the compression setting and both KD stages."""

    setting: str = "kroneckerbert"     # the paper's preset, or a compression factor such as "4"
    task: str = "sst2"
    teacher_train_size: int | None = None
    teacher_settings: dict = field(default_factory=dict)   # other TeacherConfig fields
    train_size: int | None = 20000     # seeded subset of the train split used for KD
    stage1_epochs: float = 1.0
    stage2_epochs: float = 1.0
    lr1: float = 5e-4
    lr2: float = 1e-4
    label_weight: float = 0.0
    temperature: float = 1.0
    batch_size: int = 32
    max_length: int = 128
    seed: int = 42


def compress_student(teacher, setting: str):
    """A compressed copy of ``teacher``: the KroneckerBERT preset (``"kroneckerbert"``, one
    Kronecker product per layer, CF 8; ``"kroneckerbert:R"``, the same shapes as a sum of R
    products, CF 8/R) or a searched CF (``"4"``)."""
    student = copy.deepcopy(teacher)
    name, _, rank = setting.partition(":")
    if name == "kroneckerbert":
        if rank and not (rank.isdigit() and int(rank) >= 1):
            raise ValueError(f"compress_student: bad rank in {setting!r} (kroneckerbert:R, R >= 1)")
        return compress(student, preset="kroneckerbert", rank=int(rank) if rank else None)
    try:
        cf = float(setting)
    except ValueError:
        raise ValueError(f"compress_student: setting must be 'kroneckerbert', 'kroneckerbert:R' "
                         f"or a compression factor, got {setting!r}") from None
    return compress(student, cf=cf)


def distill_kronecker(config: DistillConfig, data_dir: str | Path, out: str | Path) -> dict:
    """Runs (or resumes) both stages in ``out`` and returns the side-by-side measurements."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    task = config.task
    teacher, tokenizer, record = load_teacher(
        TeacherConfig(task=task, train_size=config.teacher_train_size,
                      **config.teacher_settings), data_dir)
    train = seeded_subset(load_task(task, "train", data_dir), config.train_size, config.seed)
    dev = load_task(task, "dev", data_dir)
    train_f = encode(train, tokenizer, config.max_length)
    dev_f = encode(dev, tokenizer, config.max_length)
    collator = DynamicPaddingCollator.from_tokenizer(tokenizer)
    dev_loader = DataLoader(dev_f, batch_size=64, collate_fn=collator)

    student = compress_student(teacher, config.setting)
    init_acc = main_metric(student, dev_loader, task)
    student.train()

    def run_stage(name, stage, lr, epochs, select_best):
        sampler = LengthBucketBatchSampler([len(f["input_ids"]) for f in train_f],
                                           config.batch_size, seed=config.seed)
        best = get_task(task).metrics[0]
        cfg = TrainConfig(lr=lr, epochs=epochs, batch_size=config.batch_size, warmup_ratio=0.06,
                          seed=config.seed, output_dir=str(out / name), save_every=100,
                          eval_every=(len(sampler) // 2 if select_best else 0),
                          metric_for_best=best if select_best else None)
        extra = dict(eval_loader=dev_loader,
                     metric_fn=lambda lg, lb: compute_metrics(task, lg, lb)) if select_best else {}
        t0 = time.time()
        with Trainer(student, cfg, train_dataset=train_f, collate_fn=collator,
                     batch_sampler=sampler, step_fn=stage.bind(teacher), **extra) as trainer:
            trainer.train(resume=(out / name / "checkpoint.pt").exists())
            if select_best:
                trainer.load_best()
        return time.time() - t0

    t1 = run_stage("stage1", IntermediateKD(), config.lr1, config.stage1_epochs, False)
    t2 = run_stage("stage2", PredictionKD(temperature=config.temperature,
                                          label_weight=config.label_weight),
                   config.lr2, config.stage2_epochs, True)
    save_compressed(student, out / "model")   # load_compressed(out / "model") rebuilds it
    report = compression_report(student)  # FLOPs per token of the encoder linears, and params
    res = {
        "config": asdict(config), "teacher": record["config"], "train_size": len(train),
        "teacher_acc": main_metric(teacher, dev_loader, task), "student_init_acc": init_acc,
        "student_acc": main_metric(student, dev_loader, task),
        "teacher_params": report["params_total_dense"], "student_params": report["params_total"],
        "cf_linears": report["cf_layers"],
        "teacher_linear_flops_per_token": report["flops_layers_dense"],
        "student_linear_flops_per_token": report["flops_layers"],
        # whole-model forward FLOPs per dev sample, each at its own length (ELUE's count)
        "teacher_flops_per_sample": encoded_flops_per_sample(teacher, dev_f),
        "student_flops_per_sample": encoded_flops_per_sample(student, dev_f),
        "teacher_ms_b1": latency_ms(teacher, dev_f, collator, 1),
        "student_ms_b1": latency_ms(student, dev_f, collator, 1),
        "teacher_ms_b32": latency_ms(teacher, dev_f, collator, 32),
        "student_ms_b32": latency_ms(student, dev_f, collator, 32),
        "stage1_seconds": round(t1, 1), "stage2_seconds": round(t2, 1),
        "threads": torch.get_num_threads(),
    }
    (out / "results.json").write_text(json.dumps(res, indent=2))
    return res
