"""Sparse distillation on SST-2: the main DAN student, the paper's two ablations, and fastText.

    python experiments/dan_sst2.py [--out experiments/runs/dan-sst2] [--quick]

1. main: hashed n-grams (orders 1-3, 2^20 buckets x dim 128), distilled from the cached
   MiniLM teacher's logits over SST-2 train, then fine-tuned on the gold labels; teacher and
   student dev accuracy and end-to-end batch-32 throughput (raw text in) side by side;
2. vocabulary size x embedding dim at a fixed table budget (exact top-K n-gram vocabularies);
3. frequency pruning: accuracy vs table size for min_count 1, 2, 3, 5, 10;
4. fastText trained on the same sentences with the main student's dim/buckets/order: accuracy
   and predict throughput in the same process.
Each run resumes from its folder; results go to experiments/results/dan_sst2.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from effnlp_ext.dan import DAN  # noqa: E402
from effnlp_ext.dan.compare import dan_vs_fasttext  # noqa: E402
from effnlp_ext.dan.recipe import SparseDistillConfig, distill_dan  # noqa: E402
from effnlp_ext.data import load_task  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--out", type=Path, default=ROOT / "experiments" / "runs" / "dan-sst2")
    p.add_argument("--results", type=Path, default=ROOT / "experiments" / "results" / "dan_sst2.json")
    p.add_argument("--budget", type=int, default=1 << 23, help="table parameters of ablation 2")
    p.add_argument("--quick", action="store_true", help="1 KD epoch, fewer ablation points")
    args = p.parse_args()

    base = SparseDistillConfig(task="sst2", num_rows=1 << 20, dim=128, hidden=128,
                               kd_epochs=1.0 if args.quick else 3.0, ft_epochs=1.0)
    results = json.loads(args.results.read_text()) if args.results.exists() else {}

    def save():
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(results, indent=2))

    main_res = distill_dan(base, args.data_dir, args.out / "main")
    results["main"] = main_res
    save()
    print(json.dumps({k: main_res[k] for k in ("student", "teacher_metrics", "throughput_ratio")}))

    # 2. vocabulary size x dim at a fixed budget of table parameters
    dims = [256, 128, 64, 32] if not args.quick else [128, 32]
    results["budget"] = []
    for dim in dims:
        cfg = replace(base, vocab="exact", num_rows=args.budget // dim, dim=dim, hidden=128)
        r = distill_dan(cfg, args.data_dir, args.out / f"budget-{dim}", measure_teacher=False)
        results["budget"].append({"dim": dim, "vocab_rows": r["vocab_size"],
                                  "table_params": r["student_params"]["table"],
                                  "accuracy": r["student"]["accuracy"]})
        save()

    # 3. frequency pruning of an exact vocabulary: accuracy vs table size
    results["pruning"] = []
    for m in ([1, 2, 3, 5, 10] if not args.quick else [1, 5]):
        cfg = replace(base, vocab="exact", num_rows=1 << 24, min_count=m, dim=64, hidden=128)
        r = distill_dan(cfg, args.data_dir, args.out / f"prune-{m}", measure_teacher=False)
        results["pruning"].append({"min_count": m, "vocab_rows": r["vocab_size"],
                                   "table_params": r["student_params"]["table"],
                                   "accuracy": r["student"]["accuracy"]})
        save()

    # 4. fastText with the main student's dim, buckets and n-gram order
    train = load_task("sst2", "train", args.data_dir)
    dev = load_task("sst2", "dev", args.data_dir)
    student = DAN.load(args.out / "main" / "model")
    results["fasttext"] = dan_vs_fasttext(student, [e.text_a for e in train],
                                          [e.label for e in train], [e.text_a for e in dev],
                                          [e.label for e in dev])
    save()
    print(json.dumps(results["fasttext"], indent=2))
    return 0


if __name__ == "__main__":
    torch.manual_seed(0)
    sys.exit(main())
