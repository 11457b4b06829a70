"""Prints the README tables of bench/results/rational.json (or the file given)."""
import json
import sys
from pathlib import Path

from effnlp_ext.adapters.benchmark import render

path = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results" / "rational.json")
data = json.loads(path.read_text())
print(render(data["meta"], data["rows"]))
