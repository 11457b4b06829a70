"""Sparse distillation end to end: teacher logits -> DAN distillation -> gold fine-tuning.

1. The cached fine-tuned MiniLM teacher (training/teacher.py) scores the training corpus (plus
   any unlabeled text given); its logits are cached beside the teacher, keyed by split and
   max length, so ablations reuse them.
2. The DAN student regresses the teacher's logits (MSE, or KL at a temperature) with the shared
   Trainer: SparseAdam on the n-gram table, AdamW on the MLP.
3. It is fine-tuned on the gold labels (cross-entropy), keeping the best dev checkpoint.
``distill_dan`` returns dev metrics of teacher and student, parameters, and end-to-end CPU
throughput at batch 32 (raw text in, logits out: tokenisation included) measured side by side.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..data import DynamicPaddingCollator, compute_metrics, get_task, load_task, seeded_subset
from ..training import TrainConfig, Trainer
from ..training.teacher import TeacherConfig, load_teacher, teacher_dir
from .compare import throughput
from .modules import DAN, DANConfig, collate_docs, split_docs
from .vocab import NgramVocab, count_ngrams


@dataclass
class SparseDistillConfig:
    task: str = "sst2"
    teacher_train_size: int | None = None   # which cached teacher (None: the full-data one)
    teacher_settings: dict = field(default_factory=dict)  # other TeacherConfig fields
    teacher_max_length: int = 128
    train_size: int | None = None           # seeded subset of the train split; None: all
    vocab: str = "hash"                     # "hash" (buckets) or "exact" (top-K n-grams)
    num_rows: int = 1 << 20                 # buckets, or the vocabulary's K
    min_count: int = 1                      # exact vocabulary: drop rarer n-grams
    dim: int = 256
    hidden: int = 256
    orders: tuple[int, ...] = (1, 2, 3)
    dropout: float = 0.1
    kd_epochs: float = 4.0
    ft_epochs: float = 1.0
    kd_loss: str = "mse"                    # "mse" on logits, or "kl" at kd_temperature
    kd_temperature: float = 1.0
    lr: float = 1e-3                        # AdamW, the MLP
    sparse_lr: float = 1e-2                 # SparseAdam, the table
    ft_lr_scale: float = 0.3                # fine-tuning runs at this fraction of both rates
    batch_size: int = 32
    seed: int = 42
    extra: dict = field(default_factory=dict)

    def teacher_config(self) -> TeacherConfig:
        """The cached teacher this student distils from."""
        return TeacherConfig(task=get_task(self.task).name, train_size=self.teacher_train_size,
                             **self.teacher_settings)


@torch.no_grad()
@torch.no_grad()
def teacher_logits(teacher, tokenizer, texts, max_length: int, batch_size: int = 64):
    """Logits of ``teacher`` on ``texts``, in batches of similar length (no wasted padding)."""
    teacher.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), teacher.config.num_labels)
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        enc = tokenizer([texts[j] for j in idx], truncation=True, max_length=max_length,
                        padding=True, return_tensors="pt")
        out[idx] = teacher(**enc).logits.float()
    return out


def cached_teacher_logits(tconfig: TeacherConfig, teacher, tokenizer, split: str, texts,
                          max_length: int) -> torch.Tensor:
    digest = hashlib.sha1("\n".join(texts).encode()).hexdigest()[:10]
    path = teacher_dir(tconfig) / f"logits-{split}-{len(texts)}-{digest}-L{max_length}.pt"
    if path.exists():
        return torch.load(path)
    logits = teacher_logits(teacher, tokenizer, texts, max_length)
    torch.save(logits, path)
    return logits


def teacher_predictor(teacher, tokenizer, max_length: int):
    teacher.eval()

    @torch.no_grad()
    def predict(texts):
        enc = tokenizer(texts, truncation=True, max_length=max_length, padding=True,
                        return_tensors="pt")
        return teacher(**enc).logits
    return predict


def dan_predictor(model: DAN):
    model.eval()

    @torch.no_grad()
    def predict(texts):
        return model(*DAN.encode(texts)).logits
    return predict


def _kd_step(kind: str, temperature: float):
    def step(model, batch):
        out = model(batch["ids"], batch["offsets"])
        target = batch["teacher_logits"]
        if kind == "mse":
            loss = torch.nn.functional.mse_loss(out.logits, target)
        else:
            t = temperature
            loss = torch.nn.functional.kl_div(
                torch.log_softmax(out.logits / t, -1), torch.log_softmax(target / t, -1),
                log_target=True, reduction="batchmean") * t * t
        return loss
    return step


def _gold_step(model, batch):
    return model(batch["ids"], batch["offsets"], batch["labels"]).loss


def build_student(config: SparseDistillConfig, train_docs, num_labels: int):
    vocab = None
    if config.vocab == "exact":
        counts = count_ngrams(train_docs, config.orders)
        vocab = NgramVocab.from_counts(counts, top_k=config.num_rows, min_count=config.min_count)
    elif config.vocab != "hash":
        raise ValueError(f"vocab must be 'hash' or 'exact', got {config.vocab!r}")
    torch.manual_seed(config.seed)
    return DAN(DANConfig(num_labels=num_labels, num_rows=config.num_rows, dim=config.dim,
                         hidden=config.hidden, orders=tuple(config.orders),
                         dropout=config.dropout), vocab)


def distill_dan(config: SparseDistillConfig, data_dir: str | Path, out: str | Path,
                eval_split: str = "dev", measure_teacher: bool = True) -> dict:
    """Runs (or resumes) both stages in ``out`` and returns the side-by-side measurements."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    task = get_task(config.task)
    tconfig = config.teacher_config()
    teacher, tokenizer, record = load_teacher(tconfig, data_dir)
    full_train = load_task(task.name, "train", data_dir)
    if full_train and full_train[0].text_b is not None:
        raise ValueError(f"distill_dan: the DAN student takes single texts; {task.name} has pairs")
    train = seeded_subset(full_train, config.train_size, config.seed)
    dev = load_task(task.name, eval_split, data_dir)
    train_texts = [e.text_a for e in train]
    dev_texts = [e.text_a for e in dev]
    t0 = time.time()
    logits = cached_teacher_logits(tconfig, teacher, tokenizer, "train", train_texts,
                                   config.teacher_max_length)
    score_seconds = time.time() - t0

    train_ids = split_docs(*DAN.encode(train_texts))
    dev_ids = split_docs(*DAN.encode(dev_texts))
    train_items = [{"ids": d, "labels": e.label, "teacher_logits": lg}
                   for d, e, lg in zip(train_ids, train, logits)]
    dev_items = [{"ids": d, "labels": e.label} for d, e in zip(dev_ids, dev)]
    dev_loader = DataLoader(dev_items, batch_size=256, collate_fn=collate_docs)

    def eval_fn(model):
        model.eval()
        lg, lb = [], []
        with torch.no_grad():
            for batch in dev_loader:
                lg.append(model(batch["ids"], batch["offsets"]).logits)
                lb.append(batch["labels"])
        return compute_metrics(task.name, torch.cat(lg), torch.cat(lb))

    student = build_student(config, (torch.cat(train_ids) if train_ids else
                                     torch.empty(0, dtype=torch.int64),
                                     collate_docs([{"ids": d} for d in train_ids])["offsets"]),
                            task.num_labels)
    best_metric = task.metrics[0]

    def stage(name, step_fn, epochs, lr, sparse_lr):
        if epochs <= 0:
            return {}, 0.0
        cfg = TrainConfig(lr=lr, sparse_lr=sparse_lr, epochs=epochs, batch_size=config.batch_size,
                          warmup_ratio=0.02, seed=config.seed, output_dir=str(out / name),
                          eval_every=max(1, len(train_items) // config.batch_size // 2),
                          metric_for_best=best_metric, progress=False, log_every=200)
        t = time.time()
        with Trainer(student, cfg, train_dataset=train_items, collate_fn=collate_docs,
                     step_fn=step_fn, eval_fn=eval_fn) as trainer:
            trainer.train(resume=(out / name / "checkpoint.pt").exists())
            trainer.load_best()
        return eval_fn(student), time.time() - t

    kd_metrics, kd_s = stage("kd", _kd_step(config.kd_loss, config.kd_temperature),
                             config.kd_epochs, config.lr, config.sparse_lr)
    ft_metrics, ft_s = stage("finetune", _gold_step, config.ft_epochs,
                             config.lr * config.ft_lr_scale, config.sparse_lr * config.ft_lr_scale)
    final = eval_fn(student)
    student.save(out / "model")

    res = {"config": asdict(config), "teacher": record["config"], "task": task.name,
           "eval_split": eval_split, "train_size": len(train), "eval_size": len(dev),
           "student_after_kd": kd_metrics, "student_after_finetune": ft_metrics,
           "student": final, "student_params": student.num_parameters(),
           "vocab_size": len(student.vocab) if student.vocab is not None else None,
           "teacher_score_seconds": round(score_seconds, 1), "kd_seconds": round(kd_s, 1),
           "finetune_seconds": round(ft_s, 1), "threads": torch.get_num_threads()}
    if measure_teacher:
        enc_loader = DataLoader(
            [dict(tokenizer(t, truncation=True, max_length=config.teacher_max_length),
                  labels=e.label) for t, e in zip(dev_texts, dev)],
            batch_size=64, collate_fn=DynamicPaddingCollator.from_tokenizer(tokenizer))
        from ..training.evaluate import evaluate

        res["teacher_metrics"] = evaluate(teacher, enc_loader, task.name)
        res["teacher_params"] = sum(p.numel() for p in teacher.parameters())
        sample = dev_texts[:512]
        res["teacher_texts_per_s_b32"] = throughput(
            teacher_predictor(teacher, tokenizer, config.teacher_max_length), sample)
        res["student_texts_per_s_b32"] = throughput(dan_predictor(student), sample)
        res["throughput_ratio"] = res["student_texts_per_s_b32"] / res["teacher_texts_per_s_b32"]
    (out / "results.json").write_text(json.dumps(res, indent=2))
    return res
