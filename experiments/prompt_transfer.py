"""Prompt tuning transfer on the offline MiniLM: library, similarities, zero-shot transfer,
transfer by initialisation, and a cross-model projector.

    python experiments/prompt_transfer.py [--steps 300] [--max-length 128] [--quick]
                                          [--out experiments/runs/prompts]

1. library: one prompt (20 tokens, vocab init, a different vocabulary sample per task, or one
   sample for every task and the probes with --library-init common) + head per task, on the
   frozen MiniLM-L6;
2. similarity matrix across the library (cosine, per-token cosine, ON at the prompt positions,
   ON at [CLS]);
3. zero-shot transfer: task A's prompt with task B's head on B's dev sample (tasks with the
   same number of labels), and its Spearman correlation with each similarity;
4. transfer by initialisation: for each target, probe (a short random-init run), pick the
   library prompt most similar by ON (target excluded), train from it (with its head when the
   label counts match); steps, probe included, to reach the final accuracy of a random-init
   prompt tuned for the full budget, and a PNG of the learning curves;
5. cross-model: source = MiniLM truncated to 3 layers, target = MiniLM-L6. Both share the
   input-embedding table (the only pretrained encoders available offline), so reusing a
   prompt as it is ("identity") is the baseline the projector must beat: the 3-layer model's
   prompts have to act through 3 more layers. The projector is trained on SST-2 and applied
   zero-shot to the other tasks' 3-layer prompts, against a random prompt and the prompts
   trained on the target.
Every run resumes from its folder; results in experiments/results/prompt_transfer.json.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from effnlp_ext.data import get_task, spearman  # noqa: E402
from effnlp_ext.prompts import (PromptConfig, PromptedClassifier, PromptProjector,  # noqa: E402
                                ProjectedPrompt, SoftPrompt, evaluate_prompt, load_frozen,
                                similarity_matrix, steps_to_reach, train_prompt,
                                transfer_init)
from effnlp_ext.prompts.modules import classifier_head  # noqa: E402
from effnlp_ext.prompts.similarity import POSITIONS  # noqa: E402
from effnlp_ext.prompts.transfer import _loaders  # noqa: E402
from effnlp_ext.training import TrainConfig, Trainer  # noqa: E402

TASKS = ["sst2", "imdb", "mrpc", "snli", "cola", "rte", "ag_news"]


def _load(path: Path):
    prompt, meta = SoftPrompt.load(path)
    return prompt, torch.load(path / "head.pt")


def zero_shot(cfg: PromptConfig, prompt: SoftPrompt, head_state, data_dir) -> float:
    model, tok = load_frozen(cfg)
    classifier_head(model).load_state_dict(head_state)
    _, dev_f, coll = _loaders(cfg, tok, data_dir)
    metric = get_task(cfg.task).metrics[0]          # accuracy; CoLA: Matthews correlation
    return evaluate_prompt(PromptedClassifier(model, prompt), dev_f, coll, cfg.task)[metric]


def render(res: dict) -> str:
    """The README tables from a results JSON (``--render``)."""
    tasks = res["tasks"]
    lines = ["| task | metric | step 0 | best | final |", "|---|---|---:|---:|---:|"]
    for t in tasks:
        lib = res["library"][t]
        metric = "MCC" if get_task(t).metrics[0] != "accuracy" else "acc"
        lines.append(f"| {t} | {metric} | {100 * lib['curve'][0]['accuracy']:.1f} | "
                     f"{100 * lib['best']:.1f} | {100 * lib['final']:.1f} |")
    for metric, title in (("on", "at the prompt positions"), ("on_cls", "at [CLS]")):
        if metric not in res["similarity"]:
            continue
        on = res["similarity"][metric]
        lines += ["", f"ON similarity (activated-neuron overlap) {title}:", "",
                  "| | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
        lines += [f"| {a} | " + " | ".join(f"{on[a][b]:.3f}" for b in tasks) + " |" for a in tasks]
    zs = res.get("zero_shot", {})
    cols = sorted({b for row in zs.values() for b in row})
    lines += ["", "Zero-shot transfer (row prompt with the column task's own head; column's metric):", "",
              "| prompt \\ task | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for a in tasks:
        if a in zs:
            lines.append(f"| {a} | " + " | ".join(f"{100 * zs[a][b]:.1f}" if b in zs[a] else "–"
                                                   for b in cols) + " |")
    if "zero_shot_correlation" in res:
        lines += ["", "Spearman correlation with relative zero-shot performance: " +
                  ", ".join(f"{m} {v:+.2f}" for m, v in res["zero_shot_correlation"].items())]
    steps = res["steps"]
    lines += ["", "| target | source | head transferred | random-init final | transfer step 0 | "
              "transfer final | steps to random's final | incl. probe, fraction of " + str(steps) + " |",
              "|---|---|---|---:|---:|---:|---:|---:|"]
    for t, r in res.get("transfer_init", {}).items():
        reach = "never" if r["steps_to_random_final"] is None else r["steps_to_random_final"]
        frac = "–" if r["fraction_of_steps"] is None else f"{r['fraction_of_steps']:.2f}"
        lines.append(f"| {t} | {r['source']} | {'yes' if r.get('head_transferred') else 'no'} | "
                     f"{100 * r['random_final']:.1f} | {100 * r['curves']['transfer'][0]['accuracy']:.1f} | "
                     f"{100 * r['transfer_final']:.1f} | {reach} | {frac} |")
    if "cross_model" in res:
        cm = res["cross_model"]
        lines += ["", f"Cross-model ({cm['source']} → {cm['target']}, projector trained on "
                      f"{cm['projector_trained_on']}):", "",
                  "| task | projected | identity | random | trained on target |", "|---|---:|---:|---:|---:|"]
        for t, r in cm["tasks"].items():
            lines.append(f"| {t} | " + " | ".join(f"{100 * r[k]:.1f}" for k in
                                                 ("projected", "identity", "random", "trained_on_target")) + " |")
    return "\n".join(lines)


def transfer_curves(speed: dict) -> dict:
    """``{target: {label: curve}}`` of every transfer row so far, whatever its run's options.
    Rows of one run share its random-init baseline; a baseline from an earlier run (other
    numerics) is drawn too, labelled as such, so each transfer curve has its own reference."""
    curves: dict = {}
    latest = {key.split(" ")[0]: r["curves"]["random"] for key, r in speed.items()}
    for t, rnd in latest.items():
        curves[t] = {"random init": rnd}
    for key, r in speed.items():
        t = key.split(" ")[0]
        if r["curves"]["random"] != latest[t]:
            curves[t]["random init, earlier run (first rows)"] = r["curves"]["random"]
        probe = "" if r.get("probe_init", "random") == "random" else ", vocab probe"
        at = " at [CLS]" if r.get("on_positions", "prompt") == "cls" else ""
        how = "by hand" if r.get("chosen_by_hand") else f"ON{at}{probe}"
        head = ", with its head" if r["head_transferred"] else ""
        curves[t][f"from {r['source']} ({how}{head})"] = r["curves"]["transfer"]
    return curves


def plot_curves(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = list(curves)
    fig, axes = plt.subplots(1, len(targets), figsize=(5 * len(targets), 4), squeeze=False)
    for ax, t in zip(axes[0], targets):
        for label, curve in curves[t].items():
            style = {}
            if label.startswith("random init"):   # the baselines: black, an earlier run's dashed
                style = dict(color="black", linestyle="--" if "earlier" in label else "-")
            ax.plot([c["step"] for c in curve], [100 * c["accuracy"] for c in curve], marker="o",
                    label=label, **style)
        ax.set_title(t)
        ax.set_xlabel("steps")
        ax.set_ylabel("dev accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--out", type=Path, default=ROOT / "experiments" / "runs" / "prompts")
    p.add_argument("--results", type=Path,
                   default=ROOT / "experiments" / "results" / "prompt_transfer.json")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--probe-steps", type=int, default=30)
    p.add_argument("--targets", nargs="+", default=["imdb", "sst2", "rte"])
    p.add_argument("--tasks", nargs="+", default=TASKS)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--train-size", type=int, default=4000)
    p.add_argument("--eval-size", type=int, default=400)
    p.add_argument("--evals", type=int, default=10, help="evaluations per run (learning curve)")
    p.add_argument("--quick", action="store_true", help="2 tasks, few steps: a smoke run")
    p.add_argument("--probe-init", choices=["random", "vocab"], default="random",
                   help="initialisation of the target's probe prompt (transfer by initialisation)")
    p.add_argument("--library-init", choices=["per-task", "common"], default="per-task",
                   help="per-task: each library prompt from its own vocabulary sample; common: "
                        "every library prompt and the probe from one sample, so that their "
                        "differences are what the tasks taught them (the probe is then a vocab "
                        "probe from that sample)")
    p.add_argument("--on-positions", choices=POSITIONS, default="prompt",
                   help="activations ON compares to pick the source (see prompts.similarity)")
    p.add_argument("--sources", nargs="+", default=[], metavar="TARGET=SOURCE",
                   help="start these targets from a source chosen by hand (no probe, no ON): "
                        "what ON's choice is compared with")
    p.add_argument("--skip-cross-model", action="store_true")
    p.add_argument("--render", action="store_true",
                   help="print the tables of --results, redraw its PNG and exit")
    args = p.parse_args()
    if any("=" not in x for x in args.sources):
        p.error(f"--sources takes TARGET=SOURCE pairs, got {args.sources}")
    by_hand = dict(x.split("=", 1) for x in args.sources)
    if args.render:
        res = json.loads(args.results.read_text())
        print(render(res))
        if res.get("transfer_init"):
            plot_curves(transfer_curves(res["transfer_init"]), args.results.with_suffix(".png"))
        return 0
    if args.quick:
        args.tasks, args.targets, args.steps, args.probe_steps = ["sst2", "imdb"], ["imdb"], 10, 5
    base = PromptConfig(steps=args.steps, eval_every=max(5, args.steps // args.evals),
                        train_size=args.train_size, eval_size=args.eval_size,
                        max_length=args.max_length)
    # a later run with other transfer options adds its rows to the same results file
    res: dict = json.loads(args.results.read_text()) if args.results.exists() else {}
    if res.get("steps") not in (None, args.steps) or res.get("tasks") not in (None, args.tasks):
        res = {}
    res.update(steps=args.steps, tasks=args.tasks)
    save = lambda: (args.results.parent.mkdir(parents=True, exist_ok=True),  # noqa: E731
                    args.results.write_text(json.dumps(res, indent=2)))

    # 1. library: vocab-initialised prompts, each task from its own vocabulary sample or all
    # from one (--library-init common)
    common = args.library_init == "common"
    common_seed = base.seed + 1   # the one vocabulary sample of a common-init library and probes
    lib, heads, finals = {}, {}, {}
    for i, t in enumerate(args.tasks):
        r = train_prompt(replace(base, task=t, init_seed=common_seed if common else base.seed + 1 + i),
                         args.data_dir, args.out / "lib" / t)
        lib[t], heads[t] = _load(Path(r["prompt"]))
        finals[t] = r["curve"][-1]["accuracy"]
        res.setdefault("library", {})[t] = {"best": r["best"], "final": finals[t],
                                            "curve": r["curve"]}
        save()
    frozen, _ = load_frozen(base)

    # 2. similarities
    sims = similarity_matrix(lib, frozen)
    res["similarity"] = sims
    save()

    # 3. zero-shot transfer between tasks with the same label count
    pairs, zs = [], {}
    for a in args.tasks:
        for b in args.tasks:
            if a == b or get_task(a).num_labels != get_task(b).num_labels:
                continue
            acc = zero_shot(replace(base, task=b), lib[a], heads[b], args.data_dir)
            zs.setdefault(a, {})[b] = acc
            if finals[b] > 0:     # relative transfer is undefined at a zero score (CoLA MCC)
                pairs.append((a, b, acc / finals[b]))
    res["zero_shot"] = zs
    if len(pairs) >= 3:
        rel = [r for _, _, r in pairs]
        res["zero_shot_correlation"] = {m: spearman([sims[m][a][b] for a, b, _ in pairs], rel)
                                        for m in sims}
    save()

    # 4. transfer by initialisation, against a random-init prompt tuned for as many steps
    speed = res.get("transfer_init", {})
    for t in args.targets:
        cfg = replace(base, task=t)
        rnd = train_prompt(replace(cfg, init="random"), args.data_dir,
                           args.out / "init" / f"{t}-random")
        forced = by_hand.get(t)
        tags = ([f"from {forced}, by hand"] if forced else
                (["common init"] if common else
                 [] if args.probe_init == "random" else ["vocab probe"]) +
                ([] if args.on_positions == "prompt" else ["ON at [CLS]"]))
        key = t + (f" ({', '.join(tags)})" if tags else "")
        # "imdb (ON at [CLS])" -> imdb-on-at-cls
        folder = re.sub(r"[^a-z0-9]+", "-", key.lower()).strip("-")
        tr = transfer_init(cfg, {k: (lib[k], heads[k]) for k in lib}, args.data_dir,
                           args.out / "init" / folder, probe_steps=args.probe_steps,
                           probe_init="vocab" if common else args.probe_init,
                           probe_init_seed=common_seed if common else None,
                           on_positions=args.on_positions, source=forced, frozen=frozen)
        target = rnd["curve"][-1]["accuracy"]
        reach = steps_to_reach(tr["curve"], target)
        speed[key] = {"source": tr["source"], "probe_init": tr["probe_init"],
                      "on_positions": tr["on_positions"], "on_scores": tr["on_scores"],
                    "head_transferred": tr["head_transferred"], "random_final": target,
                    "random_best": rnd["best"], "transfer_final": tr["curve"][-1]["accuracy"],
                    "transfer_best": tr["best"], "steps_to_random_final": reach,
                    "probe_steps": tr["probe_steps"], "chosen_by_hand": forced is not None,
                    "library_init": args.library_init,
                    "fraction_of_steps": (None if reach is None else
                                          (reach + tr["probe_steps"]) / args.steps),
                    "curves": {"random": rnd["curve"], "transfer": tr["curve"]}}
        res["transfer_init"] = speed
        save()
    curves = transfer_curves(speed)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    png = args.results.with_suffix(".png")
    plot_curves(curves, png)
    res["curves_png"] = str(png.relative_to(ROOT) if png.is_relative_to(ROOT) else png)

    if args.skip_cross_model:
        save()
        return 0
    # 5. cross-model projector: 3-layer MiniLM -> MiniLM-L6
    small = replace(base, num_layers=3)
    src = {}
    for t in args.tasks:
        r = train_prompt(replace(small, task=t), args.data_dir, args.out / "small" / t)
        src[t] = _load(Path(r["prompt"]))[0]
    train_task = args.tasks[0]
    model, tok = load_frozen(replace(base, task=train_task))
    # the target's own head for the task stays fixed, so the projector learns to produce
    # prompts that work with the heads trained on the target model (used zero-shot below)
    classifier_head(model).load_state_dict(heads[train_task])
    projector = PromptProjector(src[train_task].hidden, model.config.hidden_size)
    wrapped = PromptedClassifier(model, ProjectedPrompt(src[train_task], projector),
                                 train_head=False)
    train_f, dev_f, coll = _loaders(replace(base, task=train_task), tok, args.data_dir)
    out = args.out / "projector"
    tcfg = TrainConfig(lr=1e-3, max_steps=args.steps, batch_size=32, output_dir=str(out),
                       progress=False, save_every=max(10, args.steps // 5))
    with Trainer(wrapped, tcfg, train_dataset=train_f, collate_fn=coll) as trainer:
        trainer.train(resume=(out / "checkpoint.pt").exists())
    projector.eval()
    cross = {}
    for t in args.tasks:
        cfg = replace(base, task=t)
        row = {"projected": zero_shot(cfg, projector.project(src[t]), heads[t], args.data_dir),
               "identity": zero_shot(cfg, src[t], heads[t], args.data_dir),
               "random": zero_shot(cfg, SoftPrompt.random(base.n_tokens, src[t].hidden),
                                   heads[t], args.data_dir),
               "trained_on_target": finals[t]}
        cross[t] = row
        res["cross_model"] = {"source": "MiniLM-L6 truncated to 3 layers", "target": "MiniLM-L6",
                              "projector_trained_on": train_task, "tasks": cross}
        save()
    print(json.dumps({k: res[k] for k in ("zero_shot_correlation", "transfer_init", "cross_model")
                      if k in res}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
