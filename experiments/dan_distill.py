"""Sparse distillation on one task: the main DAN student, the paper's two ablations, fastText.

    python experiments/dan_distill.py [--task sst2] [--out DIR] [--quick] [--no-ablations]
    python experiments/dan_distill.py --task imdb --teacher-train-size 6000 \
        --teacher-max-length 256 --teacher-lr 1e-4 --report-split test --report-size 5000

1. main: hashed n-grams (orders 1-3, 2^20 buckets x dim 128), distilled from the cached
   MiniLM teacher's logits over the task's train split, then fine-tuned on the gold labels;
   teacher and student dev metrics and end-to-end batch-32 throughput (raw text in) side by side;
2. fastText trained on the same texts with the main student's dim/buckets/order: accuracy and
   predict throughput in the same process;
3. vocabulary size x embedding dim at a fixed table budget (exact top-K n-gram vocabularies);
4. frequency pruning: accuracy vs table size for min_count 1, 2, 3, 5, 10.
``--report-split test [--report-size N]`` also scores teacher, DAN and fastText on that split
minus every example of the dev split, or on a seeded N of those (the DAN also on all of them):
IMDb's dev is a seeded 2,000 of its test reviews and picks the checkpoints, so those are left
out of the reported test figure.
Each run resumes from its folder; results go to experiments/results/dan_<task>.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from effnlp_ext.dan import DAN  # noqa: E402
from effnlp_ext.dan.compare import dan_vs_fasttext  # noqa: E402
from effnlp_ext.dan.recipe import (SparseDistillConfig, cached_teacher_logits,  # noqa: E402
                                   distill_dan)
from effnlp_ext.data import compute_metrics, load_task, seeded_subset  # noqa: E402
from effnlp_ext.training.teacher import load_teacher  # noqa: E402


def heldout_split(task: str, split: str, data_dir: Path) -> list:
    """``split`` without the examples of the dev split (which selected the checkpoints)."""
    dev = {(e.text_a, e.label) for e in load_task(task, "dev", data_dir)}
    return [e for e in load_task(task, split, data_dir) if (e.text_a, e.label) not in dev]


def teacher_metrics_on(config: SparseDistillConfig, examples, split: str, data_dir: Path) -> dict:
    """The teacher's metrics on ``examples`` (its logits cached beside it, like the train ones)."""
    tconfig = config.teacher_config()
    teacher, tokenizer, _ = load_teacher(tconfig, data_dir)
    t0 = time.time()
    logits = cached_teacher_logits(tconfig, teacher, tokenizer, split,
                                   [e.text_a for e in examples], config.teacher_max_length)
    res = compute_metrics(config.task, logits, torch.tensor([e.label for e in examples]))
    return {**res, "seconds": round(time.time() - t0, 1)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--task", default="sst2")
    p.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--out", type=Path, default=None, help="default: experiments/runs/dan-<task>")
    p.add_argument("--results", type=Path, default=None,
                   help="default: experiments/results/dan_<task>.json")
    p.add_argument("--teacher-train-size", type=int, default=0, help="0: the full-data teacher")
    p.add_argument("--teacher-max-length", type=int, default=128)
    p.add_argument("--teacher-lr", type=float, default=None, help="default: TeacherConfig's")
    p.add_argument("--report-split", default=None, help="also score on this split minus dev")
    p.add_argument("--report-size", type=int, default=0,
                   help="a seeded subset of the report split for the teacher (0: all of it)")
    p.add_argument("--budget", type=int, default=1 << 23, help="table parameters of ablation 2")
    p.add_argument("--quick", action="store_true", help="1 KD epoch, fewer ablation points")
    p.add_argument("--no-ablations", action="store_true", help="main student and fastText only")
    args = p.parse_args()
    out = args.out or ROOT / "experiments" / "runs" / f"dan-{args.task}"
    results_path = args.results or ROOT / "experiments" / "results" / f"dan_{args.task}.json"

    settings = {"max_length": args.teacher_max_length}
    if args.teacher_lr is not None:
        settings["lr"] = args.teacher_lr
    base = SparseDistillConfig(task=args.task, teacher_train_size=args.teacher_train_size or None,
                               teacher_settings=settings,
                               teacher_max_length=args.teacher_max_length,
                               num_rows=1 << 20, dim=128, hidden=128,
                               kd_epochs=1.0 if args.quick else 3.0, ft_epochs=1.0)
    results = json.loads(results_path.read_text()) if results_path.exists() else {}

    def save():
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=2))

    main_res = distill_dan(base, args.data_dir, out / "main")
    results["main"] = main_res
    save()
    print(json.dumps({k: main_res[k] for k in ("student", "teacher_metrics", "throughput_ratio")}))

    train = load_task(args.task, "train", args.data_dir)
    evals = load_task(args.task, "dev", args.data_dir)
    student = DAN.load(out / "main" / "model")
    if args.report_split:
        heldout = heldout_split(args.task, args.report_split, args.data_dir)
        evals = seeded_subset(heldout, args.report_size, base.seed)
        key = f"{args.report_split}_minus_dev"

        def dan_metrics(examples):
            return compute_metrics(args.task, student.predict_logits([e.text_a for e in examples]),
                                   torch.tensor([e.label for e in examples]))
        results[key] = {
            "size": len(evals), "heldout_size": len(heldout),
            "teacher": teacher_metrics_on(base, evals, key, args.data_dir),
            "student": dan_metrics(evals), "student_on_all_heldout": dan_metrics(heldout),
        }
        save()
        print(json.dumps(results[key], indent=2))

    # 2. fastText with the main student's dim, buckets and n-gram order, scored on `evals`
    results["fasttext"] = dan_vs_fasttext(student, [e.text_a for e in train],
                                          [e.label for e in train], [e.text_a for e in evals],
                                          [e.label for e in evals])
    save()
    print(json.dumps(results["fasttext"], indent=2))

    if not args.no_ablations:
        # 3. vocabulary size x dim at a fixed budget of table parameters
        results["budget"] = []
        for dim in ([256, 128, 64, 32] if not args.quick else [128, 32]):
            cfg = replace(base, vocab="exact", num_rows=args.budget // dim, dim=dim, hidden=128)
            r = distill_dan(cfg, args.data_dir, out / f"budget-{dim}", measure_teacher=False)
            results["budget"].append({"dim": dim, "vocab_rows": r["vocab_size"],
                                      "table_params": r["student_params"]["table"],
                                      "accuracy": r["student"]["accuracy"]})
            save()
        # 4. frequency pruning of an exact vocabulary: accuracy vs table size
        results["pruning"] = []
        for m in ([1, 2, 3, 5, 10] if not args.quick else [1, 5]):
            cfg = replace(base, vocab="exact", num_rows=1 << 24, min_count=m, dim=64, hidden=128)
            r = distill_dan(cfg, args.data_dir, out / f"prune-{m}", measure_teacher=False)
            results["pruning"].append({"min_count": m, "vocab_rows": r["vocab_size"],
                                       "table_params": r["student_params"]["table"],
                                       "accuracy": r["student"]["accuracy"]})
            save()
    return 0


if __name__ == "__main__":
    torch.manual_seed(0)
    sys.exit(main())
