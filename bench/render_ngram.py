"""Prints the README table of bench/results/ngram.json (or the file given)."""
import json
import sys
from pathlib import Path

from effnlp_ext.dan.benchmark import render

path = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results" / "ngram.json")
data = json.loads(path.read_text())
print(render(data["meta"], data["rows"]))
