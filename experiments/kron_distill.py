"""KroneckerBERT end to end: compress the fine-tuned MiniLM teacher, then two-stage distillation.

    python experiments/kron_distill.py --setting kroneckerbert [--train-size 20000]

Stage 1 (intermediate KD): embedding outputs, pre-softmax attention scores and FFN outputs of
every layer against the teacher's; stage 2 (prediction KD): the teacher's logits (plus, with
--label-weight, the gold labels). Both run with the shared Trainer and resume after a kill (the
runs live in --out). Prints and writes (results.json) SST-2 dev accuracy, parameters, linear
FLOPs per token and CPU latency at batch 1 and 32 of the teacher and the student, measured side
by side in this process.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import random
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from effnlp_ext.benchmarking import median_time  # noqa: E402
from effnlp_ext.data import (DynamicPaddingCollator, LengthBucketBatchSampler,  # noqa: E402
                             compute_metrics, encode, load_task)
from effnlp_ext.kronecker import compress, compression_report  # noqa: E402
from effnlp_ext.training import TrainConfig, Trainer  # noqa: E402
from effnlp_ext.training.distill import IntermediateKD, PredictionKD  # noqa: E402
from effnlp_ext.training.teacher import TeacherConfig, load_teacher  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def accuracy(model, loader) -> float:
    model.eval()
    logits, labels = [], []
    with torch.no_grad():
        for batch in loader:
            labels.append(batch.pop("labels"))
            logits.append(model(**batch).logits)
    return compute_metrics("sst2", torch.cat(logits), torch.cat(labels))["accuracy"]


def latency_ms(model, features, collator, batch_size: int) -> float:
    model.eval()
    batch = collator(features[:batch_size])
    batch.pop("labels")
    with torch.no_grad():
        return median_time(lambda: model(**batch), min_rounds=5, min_time=1.0) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", default="kroneckerbert", help="'kroneckerbert' or a CF such as 4")
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--teacher-train-size", type=int, default=0, help="0: the full-train teacher")
    p.add_argument("--train-size", type=int, default=20000, help="SST-2 train sentences for KD")
    p.add_argument("--stage1-epochs", type=float, default=1.0)
    p.add_argument("--stage2-epochs", type=float, default=1.0)
    p.add_argument("--lr1", type=float, default=5e-4)
    p.add_argument("--lr2", type=float, default=1e-4)
    p.add_argument("--label-weight", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    out = Path(args.out or REPO / "experiments" / "runs" / f"kron-{args.setting}")
    out.mkdir(parents=True, exist_ok=True)

    teacher, tokenizer, record = load_teacher(
        TeacherConfig(task="sst2", train_size=args.teacher_train_size or None), args.data_dir)
    train = load_task("sst2", "train", args.data_dir)
    order = list(range(len(train)))
    random.Random(args.seed).shuffle(order)
    train = [train[i] for i in sorted(order[:args.train_size])]
    dev = load_task("sst2", "dev", args.data_dir)
    train_f, dev_f = encode(train, tokenizer, 128), encode(dev, tokenizer, 128)
    collator = DynamicPaddingCollator.from_tokenizer(tokenizer)
    dev_loader = DataLoader(dev_f, batch_size=64, collate_fn=collator)

    student = copy.deepcopy(teacher)
    if args.setting == "kroneckerbert":
        compress(student, preset="kroneckerbert")
    else:
        compress(student, cf=float(args.setting))
    student.train()
    init_acc = accuracy(student, dev_loader)
    student.train()

    def run_stage(name, stage, lr, epochs, metric):
        sampler = LengthBucketBatchSampler([len(f["input_ids"]) for f in train_f], args.batch_size,
                                           seed=args.seed)
        cfg = TrainConfig(lr=lr, epochs=epochs, batch_size=args.batch_size, warmup_ratio=0.06,
                          seed=args.seed, output_dir=str(out / name), save_every=100,
                          eval_every=(len(sampler) // 2 if metric else 0),
                          metric_for_best="accuracy" if metric else None)
        extra = dict(eval_loader=dev_loader,
                     metric_fn=lambda lg, lb: compute_metrics("sst2", lg, lb)) if metric else {}
        t0 = time.time()
        with Trainer(student, cfg, train_dataset=train_f, collate_fn=collator,
                     batch_sampler=sampler, step_fn=stage.bind(teacher), **extra) as trainer:
            trainer.train(resume=(out / name / "checkpoint.pt").exists())
            if metric:
                student.load_state_dict(torch.load(out / name / "best" / "model.pt"))
        return time.time() - t0

    t1 = run_stage("stage1", IntermediateKD(), args.lr1, args.stage1_epochs, metric=False)
    t2 = run_stage("stage2", PredictionKD(label_weight=args.label_weight), args.lr2,
                   args.stage2_epochs, metric=True)

    report = compression_report(student)  # FLOPs per token of the encoder linears, and params
    t_flops, s_flops = report["flops_layers_dense"], report["flops_layers"]
    t_params, s_params = report["params_total_dense"], report["params_total"]
    res = {
        "setting": args.setting, "teacher": record["config"], "train_size": len(train),
        "teacher_acc": accuracy(teacher, dev_loader), "student_init_acc": init_acc,
        "student_acc": accuracy(student, dev_loader),
        "teacher_params": t_params, "student_params": s_params,
        "teacher_linear_flops_per_token": t_flops, "student_linear_flops_per_token": s_flops,
        "teacher_ms_b1": latency_ms(teacher, dev_f, collator, 1),
        "student_ms_b1": latency_ms(student, dev_f, collator, 1),
        "teacher_ms_b32": latency_ms(teacher, dev_f, collator, 32),
        "student_ms_b32": latency_ms(student, dev_f, collator, 32),
        "stage1_seconds": round(t1, 1), "stage2_seconds": round(t2, 1),
        "threads": torch.get_num_threads(),
    }
    (out / "results.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
