"""The ELUE table across tasks: every method on SST-2, IMDb, SNLI, SciTail, MRPC and STS-B.

    python experiments/elue_tasks.py [--tasks sst2 mrpc ...] [--data-dir ../shared/data]
    python experiments/elue_tasks.py --render        # only rebuild the summary from saved runs

Each task runs the demo's pipeline (``effnlp demo --data-dir ... --task T``: the same brief
budgets, recipes and measurement; models cached under ``$EFFNLP_CACHE/demo``). Per task it
copies table.md, demo.json and pareto.png to ``experiments/results/elue-tasks/<task>/`` and
then writes ``summary.md`` / ``summary.json``: per method and task the dev metric (x100) and
MFLOPs per sample, and per method the mean ELUE score over the tasks it ran on.

SNLI's dev split (9,842 pairs) is scored several times by every recipe, which alone takes over
an hour here: by default (``--dev-sample snli=2000``) its task runs on a derived data folder in
``$EFFNLP_CACHE/data-dev-sample/`` whose dev file is a seeded sample of the real one's lines (the
other files are links to the originals; nothing is copied into the repository), with its own
cache (``<that folder>/cache``: every checkpoint there was picked on the sampled dev). The
summary names the sampled tasks.

Latency is off by default here (``--latency`` turns it on): the tasks may run two at a time,
one thread each, and contended timings would mislead; the demo and the SST-2 table measure it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "results" / "elue-tasks"
TASKS = ("sst2", "imdb", "snli", "scitail", "mrpc", "stsb")
# one row per method: (row label, the ELUE rows' group, the demo's method key)
GROUPS = [("teacher (MiniLM-L6)", "teacher", None),
          ("KroneckerBERT (KB preset)", "KroneckerBERT", "kron"),
          ("FNet-Hybrid (4 of 6 layers)", "FNet", "fnet"),
          ("DAN (sparse distillation)", "DAN", "dan"),
          ("TAMT ticket (50%)", "TAMT", "tamt"),
          ("adaptable adapters", "adapters", "adapters"),
          ("soft prompt (20 tokens)", "prompt tuning", "prompt"),
          ("multi-exit, last exit", "multi-exit (static)", "multi_exit"),
          ("multi-exit, best early exit (entropy; patience on STS-B)", "multi-exit (dynamic)",
           "multi_exit")]


def dev_sampled_dir(data_dir: str | Path, task: str, size: int, seed: int = 0) -> Path:
    """A ``data_dir``-style folder for ``task`` whose dev file keeps a seeded ``size`` lines.

    Line-based dev files only (JSON lines or TSV, not gzipped; CSV may quote newlines); a header
    line is kept. The other split files of the task are symbolic links to the originals.
    """
    from effnlp_ext.data import get_task, seeded_subset
    from effnlp_ext.training.teacher import cache_root

    spec = get_task(task)
    dev = spec.splits["dev"]
    if dev.path.endswith(".gz") or (dev.fmt == "csv"):
        raise ValueError(f"dev_sampled_dir: {dev.path} is not a plain line-per-example file")
    out = cache_root() / "data-dev-sample" / f"{spec.name}-dev{size}-seed{seed}"
    target = out / dev.path
    if not target.exists():
        for split in spec.splits.values():
            link = out / split.path
            link.parent.mkdir(parents=True, exist_ok=True)
            if split.path != dev.path and not link.exists():
                link.symlink_to((Path(data_dir) / split.path).resolve())
        lines = (Path(data_dir) / dev.path).read_text(encoding="utf-8").splitlines(keepends=True)
        head, body = (lines[:1], lines[1:]) if dev.header else ([], lines)
        body = [ln for ln in body if ln.strip()]
        tmp = target.with_suffix(".tmp")
        tmp.write_text("".join(head + seeded_subset(body, size, seed)), encoding="utf-8")
        tmp.replace(target)
    return out


def run_task(task: str, data_dir: str, latency: bool) -> None:
    from effnlp_ext.demo import DemoConfig, format_demo, run_demo

    res = run_demo(DemoConfig(task=task), data_dir=data_dir, latency=latency,
                   log=lambda m: print(f"[{task}] {m}", flush=True))
    print(format_demo(res), flush=True)
    dst = OUT / task
    dst.mkdir(parents=True, exist_ok=True)
    src = Path(res["out"])
    keep = {k: v for k, v in res.items() if k not in ("out", "data_dir", "plot")}
    (dst / "demo.json").write_text(json.dumps(keep, indent=2))
    shutil.copy(src / "elue" / "table.md", dst / "table.md")
    shutil.copy(src / "elue" / "pareto.png", dst / "pareto.png")


def _pick(rows: list[dict], group: str) -> dict | None:
    if group == "multi-exit (dynamic)":
        rows = [r for r in rows if r["group"].startswith("multi-exit (")
                and r["group"] != "multi-exit (static)"]
        return max(rows, key=lambda r: (r["elue_score"] or 0.0, -r["flops"])) if rows else None
    rows = [r for r in rows if r["group"] == group]
    if not rows:
        return None
    if group == "multi-exit (static)":
        return max(rows, key=lambda r: r["flops"])               # the last exit: full depth
    return rows[0]


def render() -> str:
    runs = {t: json.loads((OUT / t / "demo.json").read_text())
            for t in TASKS if (OUT / t / "demo.json").exists()}
    if not runs:
        raise SystemExit(f"no task results under {OUT}")
    tasks = list(runs)
    sampled = {t: json.loads((OUT / t / "dev_sample.json").read_text())["dev_examples"]
               for t in tasks if (OUT / t / "dev_sample.json").exists()}
    head = "| method | " + " | ".join(
        f"{t} ({runs[t].get('metric', 'accuracy')}"
        + (f"; dev sample of {sampled[t]:,}" if t in sampled else "") + ")"
        for t in tasks) + " | mean ELUE score |"
    lines = ["Per task: dev metric x100 / MFLOPs per sample (brief-budget demo pipeline; "
             "`experiments/elue_tasks.py`). ELUE score: points above the multi-exit static curve "
             "at the same FLOPs (log-FLOPs interpolation), averaged over the tasks run.", "",
             head, "|---|" + "---:|" * (len(tasks) + 1)]
    summary = {}
    for label, group, key in GROUPS:
        cells, scores = [], []
        for t in tasks:
            r = _pick(runs[t]["rows"], group)
            if r is None:
                cells.append("n/a (pairs)" if key in runs[t].get("skipped", {}) else
                             "failed" if key in runs[t].get("failed", {}) else "—")
                continue
            cells.append(f"{100 * r['accuracy']:.1f} / {r['flops'] / 1e6:.4g}")
            if r.get("elue_score") is not None:
                scores.append(r["elue_score"])
            summary.setdefault(label, {})[t] = {k: r.get(k) for k in
                                                ("accuracy", "flops", "params", "elue_score")}
        mean = f"{sum(scores) / len(scores):+.2f} ({len(scores)})" if scores else ""
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {mean} |")
    seconds = {t: runs[t]["total_seconds"] for t in tasks}
    lines += ["", "Wall seconds per task (threads): " + ", ".join(
        f"{t} {seconds[t]:.0f} ({runs[t]['threads']})" for t in tasks)]
    text = "\n".join(lines) + "\n"
    (OUT / "summary.md").write_text(text)
    (OUT / "summary.json").write_text(json.dumps({"tasks": tasks, "methods": summary,
                                                  "seconds": seconds}, indent=2))
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--latency", action="store_true")
    p.add_argument("--render", action="store_true", help="only rebuild summary.md")
    p.add_argument("--dev-sample", nargs="*", default=["snli=2000"], metavar="TASK=N",
                   help="score TASK on a seeded N-example sample of its dev split")
    args = p.parse_args(argv)
    samples = {t: int(n) for t, n in (kv.split("=") for kv in args.dev_sample)}
    if not args.render:
        for task in args.tasks:
            if task not in samples:
                run_task(task, args.data_dir, args.latency)
                continue
            # its own cache too: teachers and students select checkpoints on the sampled dev
            data_dir = dev_sampled_dir(args.data_dir, task, samples[task])
            with mock.patch.dict(os.environ, {"EFFNLP_CACHE": str(data_dir / "cache")}):
                run_task(task, str(data_dir), args.latency)
            (OUT / task / "dev_sample.json").write_text(
                json.dumps({"dev_examples": samples[task], "seed": 0}))
    print(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
