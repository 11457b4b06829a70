"""The SST-2 comparison behind the README table: dense vs OMP vs TAMT at several sparsities,
every model fine-tuned on the same subset with the same schedule; plus the mask analysis
(per-layer sparsity, OMP-vs-TAMT Jaccard). Used by experiments/tamt_sst2.py and `effnlp tamt sweep`.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from .pruning import mask_overlap, sparsity_report
from .recipe import TamtConfig, finetune, find_mask


def _short(name: str) -> str:
    return (name.replace("encoder.layer.", "L").replace(".attention.self.", ".")
            .replace(".attention.output.dense", ".attn_out").replace(".intermediate.dense", ".ffn_in")
            .replace(".output.dense", ".ffn_out").replace("pooler.dense", "pooler"))


def run_sweep(out, data_dir, sparsities=(0.5, 0.7, 0.9), **overrides) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = TamtConfig(**overrides)
    summary = {"config": {k: v for k, v in vars(base).items() if k != "extra"}, "rows": []}
    summary["config"]["threads"] = torch.get_num_threads()

    def save():
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))

    dense = finetune(base, None, data_dir, out / "dense")
    summary["dense"] = dense["dev_accuracy"]
    save()
    for s in sparsities:
        tag = f"s{int(round(s * 100))}"
        row = {"sparsity": s}
        omp_cfg = replace(base, sparsity=s, objective="none")
        omp_masks = find_mask(omp_cfg, data_dir, out / f"{tag}-omp-mask")
        omp = finetune(omp_cfg, omp_masks, data_dir, out / f"{tag}-omp-ft")
        row["omp"] = omp["dev_accuracy"]
        row["omp_exported"] = omp.get("exported_dev_accuracy")
        summary["rows"].append(row)
        save()
        tamt_cfg = replace(base, sparsity=s, objective="kd")
        tamt_masks = find_mask(tamt_cfg, data_dir, out / f"{tag}-tamt-mask")
        tamt = finetune(tamt_cfg, tamt_masks, data_dir, out / f"{tag}-tamt-ft")
        row["tamt"] = tamt["dev_accuracy"]
        row["tamt_exported"] = tamt.get("exported_dev_accuracy")
        row["ms_b32_exported"] = tamt.get("ms_b32_exported")
        row["ms_b32_dense_baked"] = tamt.get("ms_b32_dense_baked")
        ov = mask_overlap(omp_masks, tamt_masks)
        row["jaccard_omp_tamt"] = ov["overall"]
        row["jaccard_per_layer"] = {_short(k): round(v, 3) for k, v in ov["per_layer"].items()}
        row["sparsity_per_layer_omp"] = {_short(k): round(v, 3) for k, v in
                                         sparsity_report(omp_masks)["per_layer"].items()}
        row["sparsity_per_layer_tamt"] = {_short(k): round(v, 3) for k, v in
                                          sparsity_report(tamt_masks)["per_layer"].items()}
        save()
    return summary


def format_sweep(summary: dict) -> str:
    c = summary["config"]
    lines = [f"SST-2 dev accuracy (872 sentences); fine-tuned on {c['finetune_size']} train sentences "
             f"x {c['finetune_epochs']} epoch(s), lr {c['finetune_lr']}, max_length {c['max_length']}; "
             f"TAMT masks trained with KD on {c['mask_train_size']} unlabeled train sentences "
             f"x {c['mask_epochs']} epoch(s), scores' lr {c['mask_lr']}",
             "", f"dense fine-tuned (same recipe): {100 * summary['dense']:.2f}", "",
             "| sparsity | OMP | TAMT (KD) | Jaccard OMP-TAMT | exported = masked |",
             "|---|---|---|---|---|"]
    for r in summary["rows"]:
        tamt = f"{100 * r['tamt']:.2f}" if "tamt" in r else "-"
        jac = f"{r['jaccard_omp_tamt']:.3f}" if "jaccard_omp_tamt" in r else "-"
        same = all(r.get(k) == r.get(k + "_exported") for k in ("omp", "tamt") if k in r)
        lines.append(f"| {int(r['sparsity'] * 100)}% | {100 * r['omp']:.2f} | {tamt} | {jac} | {same} |")
    return "\n".join(lines)


def combine_seeds(summaries: list[dict]) -> dict:
    """Per sparsity, the dense / OMP / TAMT accuracies of several sweeps (one per seed) with
    their means and sample standard deviations, and the paired gaps TAMT − dense and TAMT − OMP
    (each seed's models share its data subsets, so the gaps are compared within a seed).
    Sweeps must share the recipe: everything in the config but the seed, the thread count and the
    base ``sparsity``/``objective`` (each row sets its own)."""
    if not summaries:
        raise ValueError("combine_seeds: no sweeps given")

    def recipe(s):
        return {k: v for k, v in s["config"].items() if k not in ("seed", "threads", "sparsity",
                                                                   "objective")}

    first = recipe(summaries[0])
    for s in summaries[1:]:
        other = recipe(s)
        if other != first:
            diff = sorted(k for k in other.keys() | first.keys() if other.get(k) != first.get(k))
            raise ValueError(f"combine_seeds: the sweeps differ in {diff}, not only in the seed")
    seeds = [s["config"]["seed"] for s in summaries]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"combine_seeds: repeated seeds {seeds}")

    def stats(xs):
        t = torch.tensor(xs, dtype=torch.float64)
        return {"values": xs, "mean": float(t.mean()),
                "std": float(t.std()) if len(xs) > 1 else 0.0}

    dense = {s["config"]["seed"]: s["dense"] for s in summaries}
    shared = sorted(set.intersection(*({r["sparsity"] for r in s["rows"] if "tamt" in r}
                                       for s in summaries)))
    rows = []
    for sp in shared:
        by_seed = {s["config"]["seed"]: next(r for r in s["rows"] if r["sparsity"] == sp)
                   for s in summaries}
        omp = [by_seed[k]["omp"] for k in seeds]
        tamt = [by_seed[k]["tamt"] for k in seeds]
        rows.append({"sparsity": sp, "omp": stats(omp), "tamt": stats(tamt),
                     "tamt_minus_dense": stats([t - dense[k] for t, k in zip(tamt, seeds)]),
                     "tamt_minus_omp": stats([t - o for t, o in zip(tamt, omp)]),
                     "tamt_ge_omp_seeds": sum(t >= o for t, o in zip(tamt, omp))})
    return {"seeds": seeds, "config": first,
            "dense": stats([dense[k] for k in seeds]), "rows": rows}


def format_seeds(combined: dict) -> str:
    """The README table of combine_seeds: mean ± std over seeds, in points."""
    def pm(st, sign=""):   # sign="+": a signed gap
        return f"{100 * st['mean']:{sign}.2f} ± {100 * st['std']:.2f}"

    n = len(combined["seeds"])
    lines = [f"SST-2 dev accuracy over {n} seeds {combined['seeds']} (mean ± sample std, points); "
             f"dense fine-tuned: {pm(combined['dense'])}", "",
             "| sparsity | OMP | TAMT (KD) | TAMT − dense | TAMT − OMP | seeds with TAMT ≥ OMP |",
             "|---|---|---|---|---|---|"]
    for r in combined["rows"]:
        lines.append(f"| {int(round(r['sparsity'] * 100))}% | {pm(r['omp'])} | {pm(r['tamt'])} | "
                     f"{pm(r['tamt_minus_dense'], '+')} | {pm(r['tamt_minus_omp'], '+')} | "
                     f"{r['tamt_ge_omp_seeds']}/{n} |")
    return "\n".join(lines)
