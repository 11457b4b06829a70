"""Adaptable adapters on the frozen offline MiniLM-L6: ReLU adapters vs rational adapters vs
adaptable adapters (rational + per-layer Gumbel-softmax switches, then pruned), on SST-2 and
MRPC with the same recipe; writes <out>/summary.json and prints the table. Finished runs are
skipped and killed ones resume, so re-running the command continues.

    OMP_NUM_THREADS=1 python experiments/adapters_sst2.py --train-size 4000

(effnlp adapters compare runs the same thing.)
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from effnlp_ext.cli import main  # noqa: E402

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--out" not in args:
        args += ["--out", "experiments/runs/adapters"]
    sys.exit(main(["adapters", "compare", *args]))
