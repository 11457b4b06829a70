"""Adapter tuning end to end on a task: the three variants of adaptable adapters.

* ``relu``: a Pfeiffer adapter with ReLU in every layer;
* ``rational``: the same with a learnable rational activation (degrees 5/4, starting from a fit
  of ``rational_init``: ReLU by default);
* ``adaptable``: rational adapters plus a per-layer ``LayerSwitch`` (straight-through
  Gumbel-softmax, temperature annealed from ``tau_start`` to ``tau_end``, logits at
  ``switch_lr_mult`` times the learning rate); after training the layers whose switch chose
  identity are pruned (``prune_adapters``) and the pruned model is evaluated. With
  ``switch_cost`` > 0 each layer's P(adapter) is priced in the loss
  (``expected_adapter_fraction``), so a layer keeps its adapter only where it pays, and
  ``max_layers`` caps the layers kept (the highest P(adapter) first);
* ``retrained`` (``run_comparison`` with ``retrain=True``): the architecture an adaptable run
  found, trained again from a fresh start: rational adapters in the kept layers only
  (``AdapterConfig.layers``), the same schedule. The switch search shares its steps between
  choosing and fitting; the retrained model spends them all on fitting the chosen layers.

The pre-trained model (the offline MiniLM-L6 by default) is frozen: only adapters, switches and
the classification head train, with the shared ``Trainer`` (AdamW, warmup/decay, checkpoints
that survive a kill). Each run writes ``<out>/results.json``; a finished run is skipped.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..data import (DynamicPaddingCollator, LengthBucketBatchSampler, encode,
                    get_task, load_task, seeded_subset)
from ..training import TrainConfig, Trainer
from ..training.evaluate import evaluate
from ..training.heads import start_at_label_mean
from ..training.teacher import OFFLINE_BASE, base_model_path
from .convert import (add_adapters, adapted_outputs, adapter_parameter_count, keep_layers,
                      prune_adapters, trainable_parameter_names)
from .modules import expected_adapter_fraction, set_temperature, temperature_schedule

VARIANTS = {"relu": ("relu", False), "rational": ("rational", False), "adaptable": ("rational", True)}


@dataclass
class AdapterConfig:
    variant: str = "adaptable"        # "relu", "rational" or "adaptable"
    task: str = "sst2"
    base: str = OFFLINE_BASE
    train_size: int | None = 4000     # a seeded subset of the train split; None: all of it
    dev_size: int | None = None       # None: the whole dev split
    epochs: float = 1.0
    lr: float = 1e-3                  # adapters and head (the usual adapter-tuning rate)
    batch_size: int = 32
    max_length: int = 64
    reduction_factor: int = 16
    tau_start: float = 1.0
    tau_end: float = 0.1
    switch_lr_mult: float = 50.0      # the switch logits' learning rate is lr times this
    rational_lr_mult: float = 1.0     # the rational coefficients' learning rate is lr times this
    rational_init: str = "relu"       # the function the rational activations start from
                                      # (fits.APPROXIMATIONS; the paper's code starts from "one")
    switch_cost: float = 0.0          # loss += switch_cost * expected fraction of adapted layers
    switch_cost_start: float = 0.5    # ... from this fraction of the steps on (adapters start as
                                      # the identity: before they learn, the price alone acts)
    max_layers: int | None = None     # adaptable: keep at most this many layers when pruning
    layers: tuple | None = None       # adapters in these layers only (None: every layer)
    seed: int = 42
    progress: bool = False


def lr_multiples(switch_mult: float = 1.0, rational_mult: float = 1.0) -> dict[str, float]:
    """``TrainConfig.lr_mults`` for the switch logits and the rational coefficients: each kind
    with a multiple other than 1 trains in its own AdamW group at ``lr * mult``. Adam moves a
    parameter by about lr per step whatever its gradient: at the adapters' lr the logits would
    move ~0.1 over a short run and the choice would stay a coin flip; a rational's ten
    coefficients shape the activation of a whole layer, so the same step moves every unit's
    nonlinearity at once. Neither own group is weight-decayed (decay would pull the switch
    towards a coin flip and the activation towards zero); a kind left in the shared groups (its
    multiple 1) is decayed as the 2-D weights are (the coefficients are ``[G, m+1]``): at
    weight decay 0.01 and peak lr 3e-3 under the linear schedule that shrinks them by 0.8% over
    500 steps, 3% over 2,100."""
    return {".switch.logits": switch_mult, ".act.numerator": rational_mult,
            ".act.denominator": rational_mult}


def train_variant(config: AdapterConfig, data_dir, out) -> dict:
    """Adapter-tune ``config.variant`` on ``config.task``; dev metrics (and, for ``adaptable``,
    the pruned model's) in ``<out>/results.json``."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if config.variant not in VARIANTS:
        raise ValueError(f"unknown variant {config.variant!r}; choose one of {sorted(VARIANTS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "results.json").exists():
        return json.loads((out / "results.json").read_text())
    task = get_task(config.task)
    path = base_model_path(config.base)
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(config.seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=task.num_labels)
    activation, switch = VARIANTS[config.variant]
    if activation == "rational":
        activation = f"rational:{config.rational_init}"
    add_adapters(model, config.reduction_factor, activation, switch=switch, temperature=config.tau_start)
    if config.layers is not None:
        keep_layers(model, config.layers)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    train = seeded_subset(load_task(config.task, "train", data_dir), config.train_size, config.seed)
    start_at_label_mean(model, [e.label for e in train])   # regression heads only
    dev = seeded_subset(load_task(config.task, "dev", data_dir), config.dev_size, config.seed)
    train_f, dev_f = encode(train, tokenizer, config.max_length), encode(dev, tokenizer, config.max_length)
    collator = DynamicPaddingCollator.from_tokenizer(tokenizer)
    sampler = LengthBucketBatchSampler([len(f["input_ids"]) for f in train_f], config.batch_size,
                                       seed=config.seed)
    dev_loader = DataLoader(dev_f, batch_size=64, collate_fn=collator)
    cfg = TrainConfig(lr=config.lr, epochs=config.epochs, batch_size=config.batch_size,
                      warmup_ratio=0.06, weight_decay=0.01, seed=config.seed,
                      output_dir=str(out / "run"), save_every=50, progress=config.progress,
                      lr_mults=lr_multiples(config.switch_lr_mult, config.rational_lr_mult))
    t0 = time.time()
    with Trainer(model, cfg, train_dataset=train_f, collate_fn=collator, batch_sampler=sampler) as tr:
        total = tr.total_steps

        def step(m, batch):
            if switch:  # anneal from the optimizer step the trainer is at (exact after a resume)
                set_temperature(tr.model, temperature_schedule(tr.step, total, config.tau_start,
                                                               config.tau_end))
            loss = m(**batch).loss
            if switch and config.switch_cost and tr.step >= config.switch_cost_start * total:
                loss = loss + config.switch_cost * expected_adapter_fraction(m)
            return loss

        tr.step_fn = step
        tr.train(resume=(out / "run" / "checkpoint.pt").exists())
    seconds = time.time() - t0
    res = {"config": asdict(config), "train_size": len(train), "dev_size": len(dev),
           "trainable_params": trainable, "adapter_params": adapter_parameter_count(model),
           "trainable_names_sample": trainable_parameter_names(model)[:3],
           "dev": evaluate(model, dev_loader, config.task), "train_seconds": round(seconds, 1),
           "threads": torch.get_num_threads()}
    if switch:
        res["switch_p_adapter"] = {i: round(float(o.switch.probabilities()[0]), 3)
                                   for i, o in adapted_outputs(model).items()}
        res["prune"] = prune_adapters(model, config.max_layers)
        res["dev_pruned"] = evaluate(model, dev_loader, config.task)
    model.save_pretrained(out / "model")      # adapters/load_adapted(out / "model") rebuilds it
    rationals = {i: o.adapter.act.numerator.detach().flatten().tolist()
                 for i, o in adapted_outputs(model).items()
                 if o.adapter is not None and hasattr(o.adapter.act, "numerator")}
    if rationals:
        res["rational_numerators"] = {i: [round(v, 4) for v in a] for i, a in rationals.items()}
    text = json.dumps(res, indent=1)
    (out / "results.json").write_text(text)
    return json.loads(text)  # the same object a later call reads back (str keys)


def run_comparison(out, data_dir, tasks=("sst2", "mrpc"), variants=tuple(VARIANTS),
                   seeds=(42,), retrain: bool = False, **overrides) -> dict:
    """Every variant on every task and seed with the same recipe; ``<out>/summary.json``.
    ``retrain``: after each adaptable run, the ``retrained`` row (its kept layers, trained again
    from a fresh start with rational adapters)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = AdapterConfig(**overrides)
    summary = {"config": {k: v for k, v in asdict(base).items() if k not in ("variant", "task", "seed")},
               "seeds": list(seeds), "rows": []}

    def add_row(task, variant, seed, res):
        row = {"task": task, "variant": variant, "seed": seed,
               **{f"dev_{k}": v for k, v in res["dev"].items()},
               "trainable_params": res["trainable_params"], "adapter_params": res["adapter_params"],
               "train_seconds": res["train_seconds"]}
        if "prune" in res:
            row.update({f"pruned_dev_{k}": v for k, v in res["dev_pruned"].items()})
            row["layers_kept"] = res["prune"]["layers_kept"]
            row["adapter_params_after_prune"] = res["prune"]["adapter_params"]
        if res["config"].get("layers") is not None:
            row["layers_kept"] = list(res["config"]["layers"])
            row["adapter_params_after_prune"] = res["adapter_params"]
        summary["rows"].append(row)
        (out / "summary.json").write_text(json.dumps(summary, indent=1))

    for task in tasks:
        for seed in seeds:
            tag = "" if len(seeds) == 1 else f"-seed{seed}"
            for variant in variants:
                cfg = replace(base, task=task, variant=variant, seed=seed)
                res = train_variant(cfg, data_dir, out / f"{task}-{variant}{tag}")
                add_row(task, variant, seed, res)
                if retrain and variant == "adaptable":
                    kept = tuple(res["prune"]["layers_kept"])
                    again = train_variant(replace(cfg, variant="rational", layers=kept, max_layers=None),
                                          data_dir, out / f"{task}-retrained{tag}")
                    add_row(task, "retrained", seed, again)
    return summary


def format_comparison(summary: dict) -> str:
    c = summary["config"]
    lines = [f"{c['base']}, frozen; adapters (reduction {c['reduction_factor']}) + head trained on "
             f"{c['train_size']} train examples x {c['epochs']} epoch(s), lr {c['lr']}, "
             f"max_length {c['max_length']}; dev metrics",
             "", "| task | variant | seed | dev | trainable params | adapter params | layers kept | "
                 "dev after prune | train s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        dev = ", ".join(f"{k[4:]} {100 * v:.2f}" for k, v in r.items() if k.startswith("dev_"))
        pr = ", ".join(f"{k[11:]} {100 * v:.2f}" for k, v in r.items() if k.startswith("pruned_dev_"))
        kept = (f"{len(r['layers_kept'])} {r['layers_kept']} ({r['adapter_params_after_prune']})"
                if "layers_kept" in r else "all")
        lines.append(f"| {r['task']} | {r['variant']} | {r.get('seed', '')} | {dev} | {r['trainable_params']} | "
                     f"{r['adapter_params']} | {kept} | {pr or '-'} | {r['train_seconds']} |")
    seeds = sorted({r.get("seed") for r in summary["rows"]})
    if len(seeds) > 1:
        lines += ["", f"Mean ± std over seeds {seeds} (the first dev metric; adaptable: before and "
                      "after pruning; adapter params: after pruning):", "",
                  "| task | variant | dev | adapter params (share of ReLU's) |", "|---|---|---|---|"]
        groups: dict = {}
        for r in summary["rows"]:
            groups.setdefault((r["task"], r["variant"]), []).append(r)
        for (task, variant), rows in groups.items():
            key = next(k for k in rows[0] if k.startswith("dev_"))
            relu = groups.get((task, "relu"), rows)[0]["adapter_params"]

            def ms(vals):
                t = torch.tensor(vals, dtype=torch.float64) * 100
                return f"{t.mean():.2f} ± {t.std(unbiased=True) if len(vals) > 1 else 0:.2f}"
            params = [r.get("adapter_params_after_prune", r["adapter_params"]) for r in rows]
            dev = ms([r[key] for r in rows])
            if variant == "adaptable":
                dev = f"{ms([r[key] for r in rows])} (all layers) / {ms([r['pruned_' + key] for r in rows])} (pruned)"
            lines.append(f"| {task} | {variant} | {dev} | {sum(params) / len(params):.0f} "
                         f"({sum(params) / len(params) / relu:.0%}) |")
    return "\n".join(lines)
