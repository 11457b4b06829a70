"""TAMT on SST-2 with the offline MiniLM-L6: dense vs OMP vs TAMT (KD mask training) subnetworks
at 50/70/90% sparsity, all fine-tuned the same way; writes <out>/summary.json and prints the
table. Every stage resumes (or is skipped when done), so re-running the command continues.

    OMP_NUM_THREADS=1 python experiments/tamt_sst2.py --sparsities 0.7 0.5 0.9

(effnlp tamt sweep runs the same thing.) With --combine, the summaries of runs that differ only
in --seed are merged into mean ± std and paired gaps:

    python experiments/tamt_sst2.py --combine experiments/results/tamt_sst2_ft3.json \
        experiments/results/tamt_sst2_ft3_seed43.json experiments/results/tamt_sst2_ft3_seed44.json \
        --combined-json experiments/results/tamt_sst2_ft3_seeds.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from effnlp_ext.cli import _default_data_dir  # noqa: E402
from effnlp_ext.tamt.sweep import combine_seeds, format_seeds, format_sweep, run_sweep  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=Path("experiments/runs/tamt-sst2-layer"))
    p.add_argument("--data-dir", type=Path, default=_default_data_dir())
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    p.add_argument("--mask-train-size", type=int, default=6000)
    p.add_argument("--mask-epochs", type=float, default=1.0)
    p.add_argument("--mask-lr", type=float, default=2e-4, help="learning rate of the scores")
    p.add_argument("--finetune-size", type=int, default=8000)
    p.add_argument("--finetune-epochs", type=float, default=1.0)
    p.add_argument("--scope", choices=["layer", "global"], default="layer",
                   help="top-k per matrix (every matrix at the target sparsity) or over all")
    p.add_argument("--seed", type=int, default=42,
                   help="seeds the data subsets, score init and training order of every model")
    p.add_argument("--combine", type=Path, nargs="+", metavar="SUMMARY",
                   help="merge these summary.json files (one per seed) instead of running")
    p.add_argument("--combined-json", type=Path, help="with --combine: also write the merge here")
    args = p.parse_args()
    if args.combine:
        combined = combine_seeds([json.loads(f.read_text()) for f in args.combine])
        if args.combined_json:
            args.combined_json.write_text(json.dumps(combined, indent=1))
        print(format_seeds(combined))
        return 0
    summary = run_sweep(args.out, args.data_dir, args.sparsities, mask_train_size=args.mask_train_size,
                        mask_epochs=args.mask_epochs, mask_lr=args.mask_lr,
                        finetune_size=args.finetune_size, finetune_epochs=args.finetune_epochs,
                        scope=args.scope, seed=args.seed)
    print(format_sweep(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
