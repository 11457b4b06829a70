"""Prints bench/results/fnet*.json (or the _quick files with --quick) as the README tables."""
import json
import sys
from pathlib import Path

from effnlp_ext.fnet.benchmark import render_tables

suffix = "_quick" if "--quick" in sys.argv else ""
res = Path(__file__).resolve().parent / "results"


def rows(name):
    p = res / f"{name}{suffix}.json"
    return json.loads(p.read_text()) if p.exists() else {"meta": None, "rows": []}


main = rows("fnet")
print(render_tables(main["meta"], main["rows"], rows("fnet_crossover")["rows"],
                    rows("fnet_models")["rows"]))
