"""KroneckerBERT end to end (the measured run of the README): same as `effnlp kron distill`.

    python experiments/kron_distill.py --setting kroneckerbert [--train-size 20000]

The recipe lives in effnlp_ext/kronecker/recipe.py; this script only forwards its arguments.
"""
import sys

from effnlp_ext.cli import main

if __name__ == "__main__":
    sys.exit(main(["kron", "distill", *sys.argv[1:]]))
