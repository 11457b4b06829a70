"""``effnlp elue run``: every method's model on one task, side by side, ELUE-style.

Candidates are found in a runs folder (what the recipes write) and the teacher cache:
  teacher       the cached fine-tuned MiniLM (training/teacher.py)
  kron-*        KroneckerBERT students (``<run>/model``, kronecker/recipe.py)
  fnet-*        FNet students (``<run>/model``, fnet/recipe.py)
  dan-*         DAN students (``<run>/main/model`` or ``<run>/model``, dan/recipe.py)
  multi-exit    the ElasticBERT-style baseline (``<run>/multi_exit.pt``): its static exits are
                the baseline curve of the ELUE score, its entropy exits are plotted too.
For each: dev accuracy, per-sample FLOPs/MACs (every dev sample at its own length; a
transformer's are counted once per distinct length), parameters, CPU latency at batch 1 and 32 (tokenisation excluded for the
transformers, included for the DAN, which takes raw text), and the ELUE score against the
baseline. Writes results.json, table.md and pareto.png in ``out``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader

from ..data import DynamicPaddingCollator, encode, get_task, load_task
from ..training.evaluate import latency_ms, main_metric
from .flops import count_flops, count_parameters, encoded_flops_per_sample
from .score import Point, baseline_curve, pareto_frontier, plot


@dataclass
class Candidate:
    name: str
    group: str
    kind: str                          # "hf", "dan" or "multi_exit"
    load: Callable[[], torch.nn.Module]


def discover(task: str, runs_dir: Path, teacher_train_size: int | None = None) -> list[Candidate]:
    from ..training.teacher import TeacherConfig, teacher_dir

    found: list[Candidate] = []
    tdir = teacher_dir(TeacherConfig(task=task, train_size=teacher_train_size))
    if (tdir / "teacher.json").exists():
        def load_teacher_model():
            from transformers import AutoModelForSequenceClassification
            return AutoModelForSequenceClassification.from_pretrained(tdir / "model").eval()
        found.append(Candidate("teacher (MiniLM-L6)", "teacher", "hf", load_teacher_model))
    runs_dir = Path(runs_dir)
    for run in sorted(runs_dir.glob(f"kron-{task}-*")):
        if (run / "model" / "kronecker.json").exists():
            from ..kronecker import load_compressed
            name = f"KroneckerBERT ({run.name})"
            if (run / "results.json").exists():
                res = json.loads((run / "results.json").read_text())
                name = f"KroneckerBERT CF {res['cf_linears']:.1f} ({run.name})"
            found.append(Candidate(name, "KroneckerBERT", "hf",
                                   lambda p=run / "model": load_compressed(p)))
    for run in sorted(runs_dir.glob("fnet-*")):
        res = run / "results.json"
        if (run / "model" / "config.json").exists() and res.exists() and \
                json.loads(res.read_text())["config"]["task"] == task:
            from ..fnet import load_fnet
            found.append(Candidate(f"FNet ({run.name})", "FNet", "hf",
                                   lambda p=run / "model": load_fnet(p)))
    for run in sorted(runs_dir.glob(f"dan-{task}*")):
        for model_dir in (run / "main" / "model", run / "model"):
            if (model_dir / "dan.json").exists():
                from ..dan import DAN
                found.append(Candidate(f"DAN ({run.name})", "DAN", "dan",
                                       lambda p=model_dir: DAN.load(p)))
                break
    me = runs_dir / f"multi-exit-{task}"
    if (me / "multi_exit.pt").exists():
        from .multi_exit import load_multi_exit
        found.append(Candidate("multi-exit MiniLM (ElasticBERT-style)", "multi-exit",
                               "multi_exit", lambda p=me: load_multi_exit(p, task)))
    return found


def _texts(examples):
    return [e.text_a if e.text_b is None else (e.text_a, e.text_b) for e in examples]


def measure(c: Candidate, task: str, dev, tokenizer, latency: bool = True) -> dict | list[dict]:
    model = c.load().eval()
    for p in model.parameters():      # measurement only: no autograd state on any output
        p.requires_grad_(False)
    spec = get_task(task)
    if c.kind == "dan":
        from ..dan import DAN
        texts = [e.text_a for e in dev]
        logits = model.predict_logits(texts, batch_size=256)
        labels = torch.tensor([e.label for e in dev])
        acc = float((logits.argmax(-1) == labels).float().mean())
        flops = sum(count_flops(lambda t=t: model(*DAN.encode([t])))[0]
                    for t in texts) / max(1, len(texts))
        row = {"name": c.name, "group": c.group, "accuracy": acc, "flops": flops,
               "params": model.num_parameters()["total"]}
        if latency:
            from ..benchmarking import median_time
            row["ms_b1"] = median_time(lambda: model(*DAN.encode(texts[:1])), min_time=0.5) * 1e3
            row["ms_b32"] = median_time(lambda: model(*DAN.encode(texts[:32])), min_time=0.5) * 1e3
        return row
    feats = encode(dev, tokenizer, 128)
    collator = DynamicPaddingCollator.from_tokenizer(tokenizer)
    if c.kind == "multi_exit":
        from .multi_exit import (collect_exits, default_thresholds, dynamic_curve, static_curve,
                                 task_metric)
        loader = DataLoader(feats, batch_size=64, collate_fn=collator)
        logits, labels, lengths = collect_exits(model, loader)
        metric = task_metric(spec.name)
        # classification exits by entropy; a regression head (STS-B) has none: by patience
        policy, values = (("patience", [1, 2, 3, 4]) if spec.is_regression else
                          ("entropy", default_thresholds(spec.num_labels)))
        rows = static_curve(model, logits, labels, lengths, metric) + dynamic_curve(
            model, logits, labels, lengths, policy=policy, values=values, metric=metric)
        params = count_parameters(model)

        def name(r):
            if r["policy"] == "static":
                return f"exit {r['exit']}"
            return (f"entropy<{r['value']:.3f}" if r["policy"] == "entropy"
                    else f"patience {r['value']}")
        return [{"name": name(r),
                 "group": f"multi-exit ({r['policy']})", "accuracy": r["accuracy"],
                 "flops": r["flops"],
                 "params": params, "baseline": r["policy"] == "static"} for r in rows]
    loader = DataLoader(feats, batch_size=64, collate_fn=collator)
    acc = main_metric(model, loader, spec.name)
    flops = encoded_flops_per_sample(model, feats)
    row = {"name": c.name, "group": c.group, "accuracy": acc, "flops": flops,
           "params": count_parameters(model)}
    if latency:
        row["ms_b1"] = latency_ms(model, feats, collator, 1)
        row["ms_b32"] = latency_ms(model, feats, collator, 32)
    return row


def run_elue(task: str, data_dir, out, runs_dir, *,
             candidates: list[Candidate] | None = None, latency: bool = True) -> dict:
    from transformers import AutoTokenizer

    from ..training.teacher import OFFLINE_BASE, base_model_path

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = load_task(task, "dev", data_dir)
    tokenizer = AutoTokenizer.from_pretrained(base_model_path(OFFLINE_BASE))
    candidates = candidates if candidates is not None else discover(task, runs_dir)
    rows: list[dict] = []
    for c in candidates:
        r = measure(c, task, dev, tokenizer, latency=latency)
        rows.extend(r if isinstance(r, list) else [r])
    base = [(r["flops"], 100 * r["accuracy"]) for r in rows if r.get("baseline")]
    curve = baseline_curve(base) if base else None
    for r in rows:
        r["macs"] = r["flops"] / 2
        r["elue_score"] = (100 * r["accuracy"] - curve(r["flops"])) if curve else None
    points = [Point(r["name"], r["flops"], 100 * r["accuracy"], r.get("params"), r["group"])
              for r in rows]
    front = {p.name for p in pareto_frontier(points)}
    for r in rows:
        r["pareto"] = r["name"] in front
    metric = get_task(task).metrics[0]
    png = plot(points, out / "pareto.png", baseline=base or None,
               title=f"{task}: {metric} vs FLOPs per sample",
               ylabel="accuracy (%)" if metric == "accuracy" else f"{metric} x 100")
    res = {"task": task, "metric": metric, "dev_size": len(dev), "rows": rows,
           "plot": png, "baseline": "multi-exit static exits, log-FLOPs interpolation"}
    (out / "results.json").write_text(json.dumps(res, indent=2))
    (out / "table.md").write_text(render_table(res))
    return res


def render_table(res: dict) -> str:
    lines = [f"ELUE-style table, {res['task']} dev ({res['dev_size']} samples); FLOPs per sample "
             "(multiply and add apart; MACs = FLOPs/2), averaged over every dev sample at its own "
             "length; ELUE score vs the multi-exit static curve (log-FLOPs interpolation, held at "
             "its ends); * Pareto.", "",
             f"| model | {res.get('metric', 'accuracy')} | MFLOPs/sample | params (M) | ms batch 1 | ms batch 32 | ELUE score |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(res["rows"], key=lambda r: -r["flops"]):
        score = "" if r["elue_score"] is None else f"{r['elue_score']:+.2f}"
        lat = lambda k: f"{r[k]:.2f}" if k in r else ""  # noqa: E731
        lines.append(f"| {r['name']}{' *' if r['pareto'] else ''} | {100 * r['accuracy']:.2f} | "
                     f"{r['flops'] / 1e6:.4g} | {(r['params'] or 0) / 1e6:.2f} | {lat('ms_b1')} | "
                     f"{lat('ms_b32')} | {score} |")
    return "\n".join(lines) + "\n"
