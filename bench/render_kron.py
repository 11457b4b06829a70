"""Prints bench/results/kron.json (or the file given) as the README's markdown table."""
import json
import sys
from pathlib import Path

from effnlp_ext.kronecker.benchmark import render_table

path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results" / "kron.json"
data = json.loads(path.read_text())
print(render_table(data["meta"], data["rows"]))
