"""ELUE/GLUE task readers: one `TaskSpec` per task, strict parsing of the local data files.

The benchmark data (``../shared/data`` or a user's ``--data-dir``) comes in several formats:
GLUE-style TSV with or without a header, a UTF-8 BOM (MRPC), CRLF line ends (SST-2 test),
gzip CSV (IMDb), quoted CSV without header (AG News) and JSON lines (SNLI, SciTail). Each split
of each task is described by a `FileSpec`, and one reader handles them all so that every task
gets the same guarantees: a malformed row raises ``ValueError`` naming the file and line, a
missing file raises ``FileNotFoundError`` naming the task, and no row is ever dropped silently.
The one documented exception is SNLI's gold label ``-`` (no annotator majority), which is
skipped and counted in `SplitData.skipped`.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence, Union

logger = logging.getLogger(__name__)

Column = Union[str, int]


@dataclass(frozen=True)
class Example:
    """One labelled input: a sentence (``text_b`` is None) or a sentence pair."""

    text_a: str
    text_b: str | None
    label: int | float


@dataclass(frozen=True)
class FileSpec:
    """How to read one split file.

    ``fmt`` is ``"tsv"``, ``"csv"`` or ``"jsonl"``; a ``.gz`` suffix on ``path`` means gzip.
    Columns are header names (or JSON keys) when ``header`` is true or the format is JSON
    lines, and 0-based positions otherwise. ``labels`` overrides the task's raw-label mapping
    for files that spell labels differently (e.g. SciTail's tokenized copy uses 0/1).
    ``skip_labels`` lists raw labels whose rows are dropped and counted, not rejected.
    ``sample``: keep a seeded subset of this many rows (``seeded_subset``, seed 0), for a split
    that stands in for one the data folder lacks; ``note`` says so, and is logged as a warning
    whenever the split is read.
    """

    path: str
    fmt: str
    text_a: Column
    label: Column
    text_b: Column | None = None
    header: bool = False
    labels: Mapping[str, int] | None = None
    skip_labels: tuple[str, ...] = ()
    sample: int | None = None
    note: str = ""


@dataclass(frozen=True)
class TaskSpec:
    """A task: its split files, label names (empty for regression) and metric names.

    ``raw_labels`` maps label strings as written in the files to class ids; it defaults to
    both the label names and their decimal ids (``"entailment"`` and ``"0"`` both map to 0).
    """

    name: str
    splits: Mapping[str, FileSpec]
    label_names: tuple[str, ...]
    metrics: tuple[str, ...]
    raw_labels: Mapping[str, int] = field(default_factory=dict)

    @property
    def is_regression(self) -> bool:
        return not self.label_names

    @property
    def num_labels(self) -> int:
        """Number of classes, or 1 for a regression task (one output score)."""
        return len(self.label_names) or 1

    @property
    def is_pair(self) -> bool:
        return any(f.text_b is not None for f in self.splits.values())

    def label_map(self, file: FileSpec) -> Mapping[str, int]:
        if file.labels is not None:
            return file.labels
        if self.raw_labels:
            return self.raw_labels
        return {**{n: i for i, n in enumerate(self.label_names)},
                **{str(i): i for i in range(len(self.label_names))}}


@dataclass(frozen=True)
class SplitData:
    """The examples of one split and the number of rows skipped by a documented rule."""

    examples: list[Example]
    skipped: int


_NLI3 = ("entailment", "neutral", "contradiction")
_NLI2 = ("entailment", "not_entailment")

TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    TaskSpec("sst2", {
        "train": FileSpec("SST-2/train.tsv", "tsv", "sentence", "label", header=True),
        "dev": FileSpec("SST-2/dev.tsv", "tsv", "sentence", "label", header=True),
        "test": FileSpec("SST-2/stsa.binary.test.tsv", "tsv", "sentence", "label", header=True),
    }, ("negative", "positive"), ("accuracy",)),
    TaskSpec("imdb", {
        "train": FileSpec("IMDb/train.csv.gz", "csv", "text", "label", header=True),
        # IMDb has no dev split: a seeded 2,000 of the 25,000 test reviews (disjoint from train)
        "dev": FileSpec("IMDb/test.csv.gz", "csv", "text", "label", header=True, sample=2000,
                        note="imdb dev: a seeded 2,000 of the test reviews (IMDb ships no dev)"),
        "test": FileSpec("IMDb/test.csv.gz", "csv", "text", "label", header=True),
    }, ("negative", "positive"), ("accuracy",)),
    TaskSpec("snli", {
        "train": FileSpec("SNLI/train_subset.jsonl.gz", "jsonl", "sentence1", "gold_label",
                          "sentence2", skip_labels=("-",)),
        "dev": FileSpec("SNLI/dev.jsonl", "jsonl", "premise", "label", "hypothesis"),
        "test": FileSpec("SNLI/test.jsonl.gz", "jsonl", "sentence1", "gold_label", "sentence2",
                         skip_labels=("-",)),
    }, _NLI3, ("accuracy",)),
    TaskSpec("scitail", {
        # the data folder lacks SciTail's train split (23,596 pairs): its labeled test set
        # stands in for training, and models are compared on dev only
        "train": FileSpec("SciTail/test.jsonl", "jsonl", "premise", "label", "hypothesis",
                          note="scitail train: the labeled test set (2,126 pairs) stands in "
                               "for the missing train split; evaluate on dev only"),
        "dev": FileSpec("SciTail/re2_tokenized/dev.txt", "tsv", 0, 2, 1,
                        labels={"0": 0, "1": 1}),
        "test": FileSpec("SciTail/test.jsonl", "jsonl", "premise", "label", "hypothesis"),
    }, _NLI2, ("accuracy",), raw_labels={"entailment": 0, "not_entailment": 1}),
    TaskSpec("mrpc", {
        split: FileSpec(f"MRPC/{fname}", "tsv", "#1 String", "Quality", "#2 String", header=True)
        for split, fname in [("train", "train.tsv"), ("dev", "dev.tsv"),
                             ("test", "msr_paraphrase_test.txt")]
    }, ("not_paraphrase", "paraphrase"), ("accuracy", "f1")),
    TaskSpec("stsb", {
        "train": FileSpec("STS-B/train.tsv", "tsv", "sentence1", "score", "sentence2",
                          header=True),
        "dev": FileSpec("STS-B/dev.tsv", "tsv", "sentence1", "score", "sentence2", header=True),
        "test": FileSpec("STS-B/sts-test.tsv", "tsv", 5, 4, 6),
    }, (), ("pearson", "spearman")),
    TaskSpec("cola", {
        "train": FileSpec("CoLA/train.tsv", "tsv", 3, 1),
        "dev": FileSpec("CoLA/dev.tsv", "tsv", 3, 1),
    }, ("unacceptable", "acceptable"), ("mcc",)),
    TaskSpec("rte", {
        "train": FileSpec("RTE/train.tsv", "tsv", "sentence1", "label", "sentence2", header=True),
        "dev": FileSpec("RTE/dev.tsv", "tsv", "sentence1", "label", "sentence2", header=True),
    }, _NLI2, ("accuracy",), raw_labels={"entailment": 0, "not_entailment": 1}),
    TaskSpec("qnli", {
        "dev": FileSpec("QNLI/dev.tsv", "tsv", "question", "label", "sentence", header=True),
    }, _NLI2, ("accuracy",), raw_labels={"entailment": 0, "not_entailment": 1}),
    TaskSpec("ag_news", {
        "test": FileSpec("AG_News/test.csv", "csv", 1, 0, 2),
    }, ("world", "sports", "business", "sci_tech"), ("accuracy",),
        raw_labels={"1": 0, "2": 1, "3": 2, "4": 3}),
    # the demo's embedded default (data/embedded.py writes these files from a registry wheel)
    TaskSpec("rotten_tomatoes", {
        "train": FileSpec("RottenTomatoes/train.tsv", "tsv", "sentence", "label", header=True),
        "dev": FileSpec("RottenTomatoes/dev.tsv", "tsv", "sentence", "label", header=True),
    }, ("rotten", "fresh"), ("accuracy",)),
]}

_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "agnews": "ag_news", "ag-news": "ag_news",
            "ag news": "ag_news", "rt": "rotten_tomatoes"}


def get_task(name: str) -> TaskSpec:
    """Look a task up by name, case-insensitively (``SST-2``, ``sst2`` and ``Sst-2`` all work)."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in TASKS:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[key]


def available_splits(name: str, data_dir: str | Path) -> list[str]:
    """The splits of a task whose file exists under ``data_dir``, in train/dev/test order."""
    task = get_task(name)
    return [s for s, f in task.splits.items() if (Path(data_dir) / f.path).is_file()]


def _open_text(path: Path) -> io.TextIOBase:
    # utf-8-sig drops a leading BOM (MRPC) and is a no-op elsewhere; newline="" keeps CR so
    # that the readers below see CRLF explicitly instead of having it rewritten.
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _rows(path: Path, file: FileSpec) -> Iterator[tuple[int, Mapping | Sequence]]:
    """Yield (line number, row) with the header consumed; rows are lists or JSON dicts."""
    with _open_text(path) as fh:
        if file.fmt == "jsonl":
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}: line {lineno}: invalid JSON ({exc.msg})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}: line {lineno}: expected a JSON object")
                yield lineno, row
            return
        if file.fmt == "tsv":
            lines = ((n, line.rstrip("\n").removesuffix("\r").split("\t"))
                     for n, line in enumerate(fh, 1) if line.strip("\r\n"))
        elif file.fmt == "csv":
            csv.field_size_limit(1 << 24)
            reader = csv.reader(fh)
            lines = ((reader.line_num, r) for r in reader if r)
        else:
            raise ValueError(f"{path}: unknown format {file.fmt!r}")
        if file.header:
            first = next(lines, None)
            if first is None:
                return
            names = {n.strip(): i for i, n in enumerate(first[1])}
            cols = [c for c in (file.text_a, file.text_b, file.label) if c is not None]
            missing = [c for c in cols if c not in names]
            if missing:
                raise ValueError(f"{path}: line {first[0]}: header lacks column(s) {missing}; "
                                 f"found {list(names)}")
            for lineno, cells in lines:
                if len(cells) < len(names):
                    raise ValueError(f"{path}: line {lineno}: expected {len(names)} columns, "
                                     f"found {len(cells)}")
                yield lineno, {n: cells[i] for n, i in names.items()}
        else:
            yield from lines


def _cell(row: Mapping | Sequence, col: Column, path: Path, lineno: int) -> str:
    try:
        value = row[col]
    except (KeyError, IndexError):
        raise ValueError(f"{path}: line {lineno}: missing column {col!r}") from None
    if not isinstance(value, str):
        raise ValueError(f"{path}: line {lineno}: column {col!r} is {type(value).__name__}, "
                         "expected a string")
    return value


def _label(task: TaskSpec, labels: Mapping[str, int], raw: str, path: Path,
           lineno: int) -> int | float:
    if task.is_regression:
        try:
            score = float(raw)
        except ValueError:
            score = math.nan
        if not math.isfinite(score):
            raise ValueError(f"{path}: line {lineno}: score {raw!r} is not a finite number")
        return score
    key = raw.strip()
    if key not in labels:
        raise ValueError(f"{path}: line {lineno}: unknown label {raw!r} for task {task.name} "
                         f"(expected one of {sorted(labels)})")
    return labels[key]


def read_split(name: str, split: str, data_dir: str | Path) -> SplitData:
    """Read one split of a task strictly; see the module docstring for the error contract."""
    task = get_task(name)
    if split not in task.splits:
        raise KeyError(f"task {task.name} has no split {split!r}; "
                       f"it has {', '.join(task.splits)}")
    file = task.splits[split]
    path = Path(data_dir) / file.path
    if not path.is_file():
        raise FileNotFoundError(f"task {task.name} split {split}: data file {path} not found")
    labels = task.label_map(file)
    examples: list[Example] = []
    skipped = 0
    for lineno, row in _rows(path, file):
        raw = _cell(row, file.label, path, lineno)
        if raw in file.skip_labels:
            skipped += 1
            continue
        text_a = _cell(row, file.text_a, path, lineno)
        text_b = None if file.text_b is None else _cell(row, file.text_b, path, lineno)
        examples.append(Example(text_a, text_b, _label(task, labels, raw, path, lineno)))
    if not examples:
        raise ValueError(f"{path}: line 1: no examples (empty file or header only)")
    if skipped:
        logger.info("%s %s: skipped %d rows with gold label in %s",
                    task.name, split, skipped, file.skip_labels)
    if file.note:
        logger.warning("%s", file.note)
    if file.sample:
        examples = seeded_subset(examples, file.sample, 0)
    return SplitData(examples, skipped)


def load_task(name: str, split: str, data_dir: str | Path) -> list[Example]:
    """The examples of one split of a task read from ``data_dir`` (see `read_split`)."""
    return read_split(name, split, data_dir).examples


def seeded_subset(examples: Sequence, size: int | None, seed: int) -> list:
    """``size`` examples drawn without replacement by ``random.Random(seed)``, kept in their
    original order; all of them when ``size`` is None/0 or not smaller than the split."""
    if not size or size >= len(examples):
        return list(examples)
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return [examples[i] for i in sorted(order[:size])]


def split_examples(examples: Sequence[Example], dev_fraction: float,
                   seed: int) -> tuple[list[Example], list[Example]]:
    """Deterministic seeded (train, dev) partition, for tasks that ship fewer splits (AG News).

    The same ``seed`` always gives the same partition, independent of global RNG state.
    """
    if not 0.0 < dev_fraction < 1.0:
        raise ValueError(f"dev_fraction must be in (0, 1), got {dev_fraction}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_dev = max(1, round(len(examples) * dev_fraction))
    dev_idx = set(order[:n_dev])
    train = [e for i, e in enumerate(examples) if i not in dev_idx]
    dev = [e for i, e in enumerate(examples) if i in dev_idx]
    return train, dev


_HUB = {"sst2": ("glue", "sst2", "sentence", None, "label"),
        "mrpc": ("glue", "mrpc", "sentence1", "sentence2", "label"),
        "stsb": ("glue", "stsb", "sentence1", "sentence2", "label"),
        "cola": ("glue", "cola", "sentence", None, "label"),
        "rte": ("glue", "rte", "sentence1", "sentence2", "label"),
        "qnli": ("glue", "qnli", "question", "sentence", "label"),
        "snli": ("snli", None, "premise", "hypothesis", "label"),
        "scitail": ("scitail", "tsv_format", "premise", "hypothesis", "label"),
        "imdb": ("imdb", None, "text", None, "label"),
        "ag_news": ("ag_news", None, "text", None, "label")}


def load_hub_task(name: str, split: str) -> list[Example]:
    """Load a task from the Hugging Face hub with `datasets`, for users who are online.

    Split names follow the hub (``train``, ``validation``, ``test``); ``dev`` is accepted for
    ``validation``. SNLI rows with label -1 (no gold label) are dropped as in the local reader.
    """
    try:
        import datasets
    except ImportError as exc:
        raise ImportError("load_hub_task needs the `datasets` package (pip install datasets); "
                          "offline, use load_task with a local data dir") from exc
    task = get_task(name)
    path, config, col_a, col_b, col_label = _HUB[task.name]
    ds = datasets.load_dataset(path, config, split="validation" if split == "dev" else split)
    out = []
    for row in ds:
        label = row[col_label]
        if task.name == "scitail":
            label = task.raw_labels["entailment" if label == "entails" else "not_entailment"]
        if not task.is_regression and label < 0:
            continue
        out.append(Example(row[col_a], row[col_b] if col_b else None, label))
    return out
