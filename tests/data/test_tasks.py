"""Task readers against the real benchmark data and against small broken files."""
from __future__ import annotations

import gzip
import json
import logging
from collections import Counter

import pytest

from effnlp_ext.data import (TASKS, Example, available_splits, get_task, load_task, read_split,
                             split_examples)

# (task, split, rows) from the data README's summary table.
ROW_COUNTS = [
    ("sst2", "dev", 872), ("sst2", "test", 1821), ("imdb", "test", 25000),
    ("snli", "dev", 9842), ("snli", "test", 9824), ("scitail", "dev", 1304),
    ("scitail", "test", 2126), ("mrpc", "dev", 408), ("mrpc", "test", 1725),
    ("stsb", "dev", 1500), ("stsb", "test", 1379), ("cola", "dev", 1043), ("rte", "dev", 277),
    ("qnli", "dev", 5463), ("ag_news", "test", 7600),
]


@pytest.mark.parametrize("task,split,rows", ROW_COUNTS)
def test_split_row_counts(data_dir, task, split, rows):
    examples = load_task(task, split, data_dir)
    assert len(examples) == rows
    spec = get_task(task)
    assert all(isinstance(e.text_a, str) and e.text_a for e in examples)
    assert all((e.text_b is not None) == spec.is_pair for e in examples)
    if spec.is_regression:
        assert all(isinstance(e.label, float) and 0.0 <= e.label <= 5.0 for e in examples)
    else:
        assert {e.label for e in examples} == set(range(spec.num_labels))


@pytest.mark.parametrize("task,split,counts", [
    ("sst2", "dev", {"negative": 428, "positive": 444}),
    ("sst2", "test", {"negative": 912, "positive": 909}),
    ("mrpc", "dev", {"paraphrase": 279, "not_paraphrase": 129}),
    ("rte", "dev", {"entailment": 146, "not_entailment": 131}),
    ("snli", "dev", {"entailment": 3329, "neutral": 3235, "contradiction": 3278}),
    ("scitail", "dev", {"entailment": 657, "not_entailment": 647}),
    ("scitail", "test", {"entailment": 842, "not_entailment": 1284}),
    ("cola", "dev", {"acceptable": 721, "unacceptable": 322}),
])
def test_label_distributions(data_dir, task, split, counts):
    names = get_task(task).label_names
    got = Counter(names[e.label] for e in load_task(task, split, data_dir))
    assert got == counts


def test_snli_test_skips_no_gold_rows_and_counts_them(data_dir, caplog):
    with caplog.at_level(logging.INFO, logger="effnlp_ext.data.tasks"):
        data = read_split("snli", "test", data_dir)
    assert data.skipped == 176
    names = get_task("snli").label_names
    assert Counter(names[e.label] for e in data.examples) == {
        "entailment": 3368, "contradiction": 3237, "neutral": 3219}
    assert "skipped 176" in caplog.text


def test_format_quirks(data_dir):
    mrpc = load_task("mrpc", "dev", data_dir)
    assert not mrpc[0].text_a.startswith("\ufeff")
    sst_test = load_task("sst2", "test", data_dir)
    assert not any("\r" in e.text_a for e in sst_test)
    assert load_task("ag_news", "test", data_dir)[0] == Example(
        "Fears for T N pension after talks",
        "Unions representing workers at Turner   Newall say they are 'disappointed' after "
        "talks with stricken parent firm Federal Mogul.", 2)


def test_available_splits(data_dir, tmp_path):
    assert available_splits("SST-2", data_dir) == ["train", "dev", "test"]
    assert available_splits("ag_news", data_dir) == ["test"]
    assert available_splits("qnli", tmp_path) == []


def test_every_task_has_consistent_spec():
    assert len(TASKS) == 11            # the ten benchmark tasks and the embedded demo corpus
    for spec in TASKS.values():
        assert spec.metrics and spec.splits
        assert spec.num_labels == (len(spec.label_names) or 1)


def test_stand_in_splits_are_sampled_disjoint_and_announced(data_dir, caplog):
    import logging

    with caplog.at_level(logging.WARNING):
        dev = load_task("imdb", "dev", data_dir)
    assert len(dev) == 2000 and "IMDb ships no dev" in caplog.text
    assert dev == load_task("imdb", "dev", data_dir)                # the same seeded draw
    test_texts = {e.text_a for e in load_task("imdb", "test", data_dir)}
    assert all(e.text_a in test_texts for e in dev)
    assert sorted({e.label for e in dev}) == [0, 1]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        train = load_task("scitail", "train", data_dir)
    assert train == load_task("scitail", "test", data_dir) and "stands in" in caplog.text


def test_unknown_task_and_split():
    with pytest.raises(KeyError, match="unknown task"):
        get_task("mnli")
    with pytest.raises(KeyError, match="no split 'train'"):
        load_task("qnli", "train", ".")


def test_missing_file_names_path_and_task(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"task rte split dev.*RTE/dev\.tsv"):
        load_task("rte", "dev", tmp_path)


def _write(tmp_path, rel, text):
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("task,rel,text,pattern", [
    ("rte", "RTE/dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n"
     "1\ta\tb\tmaybe\n", r"RTE/dev\.tsv: line 3: unknown label 'maybe'"),
    ("rte", "RTE/dev.tsv", "index\tsentence1\tlabel\n0\ta\tentailment\n",
     r"RTE/dev\.tsv: line 1: header lacks column\(s\) \['sentence2'\]"),
    ("rte", "RTE/dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\n",
     r"RTE/dev\.tsv: line 2: expected 4 columns, found 3"),
    ("rte", "RTE/dev.tsv", "", r"RTE/dev\.tsv: line 1: no examples"),
    ("sst2", "SST-2/dev.tsv", "sentence\tlabel\n", r"SST-2/dev\.tsv: line 1: no examples"),
    ("cola", "CoLA/dev.tsv", "gj04\t1\t\tfine .\n\ngj04\t1\n", r"CoLA/dev\.tsv: line 3: missing"),
    ("stsb", "STS-B/sts-test.tsv", "g\tf\t2012\t1\tfive\ta\tb\n",
     r"sts-test\.tsv: line 1: score 'five' is not a finite number"),
    ("scitail", "SciTail/test.jsonl", '{"premise": "a", "hypothesis": "b", "label": '
     '"entailment"}\n{"premise": "a", "label": "entailment"}\n',
     r"SciTail/test\.jsonl: line 2: missing column 'hypothesis'"),
    ("scitail", "SciTail/test.jsonl", '{"premise": "a", "hypothesis": "b", "label": "entails"}\n',
     r"line 1: unknown label 'entails'"),
    ("snli", "SNLI/dev.jsonl", '{"premise": "a", "hypothesis": "b", "label": "neutral"}\n{oops\n',
     r"SNLI/dev\.jsonl: line 2: invalid JSON"),
    ("ag_news", "AG_News/test.csv", '"1","t","d"\n"5","t","d"\n',
     r"AG_News/test\.csv: line 2: unknown label '5'"),
])
def test_bad_data_names_file_and_line(tmp_path, task, rel, text, pattern):
    _write(tmp_path, rel, text)
    with pytest.raises(ValueError, match=pattern):
        load_task(task, "test" if "test" in rel else "dev", tmp_path)


def test_snli_dash_rows_skipped_only_in_official_files(tmp_path):
    path = tmp_path / "SNLI" / "test.jsonl.gz"
    path.parent.mkdir()
    rows = [{"sentence1": "a", "sentence2": "b", "gold_label": g}
            for g in ("neutral", "-", "contradiction")]
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in rows))
    data = read_split("snli", "test", tmp_path)
    assert data.skipped == 1
    assert [e.label for e in data.examples] == [1, 2]
    _write(tmp_path, "SNLI/dev.jsonl", '{"premise": "a", "hypothesis": "b", "label": "-"}\n')
    with pytest.raises(ValueError, match=r"dev\.jsonl: line 1: unknown label '-'"):
        load_task("snli", "dev", tmp_path)


def test_mrpc_bom_and_crlf(tmp_path):
    (tmp_path / "MRPC").mkdir()
    (tmp_path / "MRPC" / "dev.tsv").write_bytes(
        "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\r\n1\t1\t2\tA \"q\t B\r\n".encode())
    assert load_task("mrpc", "dev", tmp_path) == [Example('A "q', " B", 1)]


def test_split_examples_is_deterministic_partition():
    examples = [Example(str(i), None, i % 4) for i in range(101)]
    train, dev = split_examples(examples, 0.2, seed=7)
    assert len(dev) == 20 and len(train) == 81
    assert sorted(e.text_a for e in train + dev) == sorted(e.text_a for e in examples)
    assert split_examples(examples, 0.2, seed=7) == (train, dev)
    assert split_examples(examples, 0.2, seed=8)[1] != dev
    with pytest.raises(ValueError, match="dev_fraction"):
        split_examples(examples, 1.0, seed=0)


def test_seeded_subset_is_deterministic_ordered_and_bounded():
    from effnlp_ext.data import seeded_subset

    rows = list(range(100))
    a, b = seeded_subset(rows, 10, 3), seeded_subset(rows, 10, 3)
    assert a == b and a == sorted(a) and len(set(a)) == 10
    assert seeded_subset(rows, 10, 4) != a
    assert seeded_subset(rows, None, 3) == rows and seeded_subset(rows, 0, 3) == rows
    assert seeded_subset(rows, 500, 3) == rows
