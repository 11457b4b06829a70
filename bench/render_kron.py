"""Renders bench/results/kron.json as the markdown table of the README."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def render(path: Path) -> str:
    data = json.loads(path.read_text())
    meta, rows = data["meta"], data["rows"]
    out = [f"CPU fp32, torch {meta['torch']}, {meta['threads']} threads, ISA {meta['isa']}; "
           f"machine ceiling (2048³ torch.mm, same run): {meta['mm2048_gflops']:.0f} GFLOP/s; "
           f"{meta['date']}.", "",
           "| layer (CF) | tokens | mode | dense ms | composition eager / compiled ms | LoKr ms "
           "| **ours ms** | vs dense | vs best composition | ours GFLOP/s (% of mm) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    keys = []
    for r in rows:
        k = (r["case"], r["tokens"], r["mode"])
        if k not in keys:
            keys.append(k)
    for k in keys:
        by = {r["contender"]: r for r in rows if (r["case"], r["tokens"], r["mode"]) == k}
        ours = by["kron_linear (ours)"]
        cf = ours["dense_params"] / ours["params"]
        out.append(
            f"| {k[0]} ({cf:.1f}) | {k[1]} | {k[2]} | {by['dense nn.Linear']['ms']:.2f} | "
            f"{by['torch composition (eager)']['ms']:.2f} / {by['torch composition (compiled)']['ms']:.2f} | "
            f"{by['materialise W (LoKr)']['ms']:.2f} | **{ours['ms']:.2f}** | "
            f"{ours['speedup_vs_dense']:.2f}× | {ours['speedup_vs_best_composition']:.2f}× | "
            f"{ours['gflops']:.0f} ({ours['pct_of_mm']:.0f}%) |")
    return "\n".join(out)


if __name__ == "__main__":
    default = Path(__file__).resolve().parent / "results" / "kron.json"
    print(render(Path(sys.argv[1]) if len(sys.argv) > 1 else default))
