"""GLUE and SQuAD tasks: where their data lives and how it reads into one schema.

Every GLUE split loads as a ``datasets.Dataset`` with ``text_a``, ``text_b`` (pair
tasks only) and ``label`` (a ``ClassLabel`` id, or a float32 score for STS-B),
whether it comes from the hub or from the original GLUE TSV files, so fine-tuning
and evaluation code never branch on the source. Label ids follow the hub's
``nyu-mll/glue`` (e.g. MNLI entailment=0, neutral=1, contradiction=2; transformers'
old ``glue_processors`` ordered MNLI differently), so a model trained on one source
scores correctly on the other. SQuAD loads with the hub's ``squad`` columns.

With ``data_dir`` nothing touches the network. ``datasets`` is imported only when a
split is built, so the registry (and the metrics that use it) import cheaply.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from raynas.errors import ConfigError

if TYPE_CHECKING:
    import datasets


@dataclass(frozen=True)
class TsvLayout:
    """Where a GLUE TSV keeps its fields: header names, or positions in a headerless file."""

    columns: tuple[str, ...]  # the header (or, without one, the names of the positions)
    text_a: str
    text_b: str | None
    label: str
    labels: Mapping[str, int] | None  # label text -> id; None: a float score
    has_header: bool = True
    from_end: frozenset[str] = frozenset()  # the label is the last field (as the reference readers take it)
    skip_short_rows: bool = False  # QQP's reference reader skips its few truncated lines

    @property
    def used(self) -> tuple[str, ...]:
        return tuple(c for c in (self.text_a, self.text_b, self.label) if c is not None)


@dataclass(frozen=True)
class Task:
    """One task: hub location and columns, labels, local file layout, splits."""

    name: str
    kind: str  # "classification" | "regression" | "extractive_qa"
    hub_path: str
    hub_config: str | None
    text_columns: tuple[str, ...]  # hub columns that become text_a (, text_b)
    label_column: str | None
    num_labels: int | None  # 1 = regression (STS-B); None for extractive QA
    label_names: tuple[str, ...]
    local_dir: str  # GLUE folder under data_dir ("SST-2"); "" for SQuAD (files directly in data_dir)
    splits: Mapping[str, tuple[str, str]] = field(default_factory=dict)  # split -> (local file, hub split)
    tsv: TsvLayout | None = None


_BINARY = {"0": 0, "1": 1}
_ENTAILMENT = {"entailment": 0, "not_entailment": 1}
_NLI3 = {"entailment": 0, "neutral": 1, "contradiction": 2}
_DEV = {"train": ("train.tsv", "train"), "validation": ("dev.tsv", "validation")}
_MNLI_TRAIN = ("train.tsv", "train")
_MNLI_M = ("dev_matched.tsv", "validation_matched")
_MNLI_MM = ("dev_mismatched.tsv", "validation_mismatched")
_MNLI_TSV = TsvLayout(
    ("index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse", "sentence1_parse",
     "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"),
    "sentence1", "sentence2", "gold_label", _NLI3, from_end=frozenset({"gold_label"}),
)
_GLUE = "nyu-mll/glue"  # the canonical id of what older code loads as "glue"


def _glue(name: str, text: tuple[str, ...], labels: tuple[str, ...], local_dir: str, tsv: TsvLayout,
          splits: Mapping[str, tuple[str, str]] = _DEV, config: str | None = None) -> Task:
    regression = tsv.labels is None
    return Task(name, "regression" if regression else "classification", _GLUE, config or name, text, "label",
                1 if regression else len(labels), labels, local_dir, splits, tsv)


def _squad(name: str, version: str) -> Task:
    splits = {"train": (f"train-v{version}.json", "train"), "validation": (f"dev-v{version}.json", "validation")}
    return Task(name, "extractive_qa", f"rajpurkar/{name}", None, ("question", "context"), None, None, (), "", splits)


TASKS: dict[str, Task] = {t.name: t for t in (
    _glue("cola", ("sentence",), ("unacceptable", "acceptable"), "CoLA",
          TsvLayout(("source", "label", "original_label", "sentence"), "sentence", None, "label", _BINARY,
                    has_header=False)),
    _glue("sst2", ("sentence",), ("negative", "positive"), "SST-2",
          TsvLayout(("sentence", "label"), "sentence", None, "label", _BINARY)),
    _glue("mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), "MRPC",
          TsvLayout(("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"), "#1 String", "#2 String", "Quality",
                    _BINARY)),
    _glue("stsb", ("sentence1", "sentence2"), (), "STS-B",
          TsvLayout(("index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1",
                     "sentence2", "score"), "sentence1", "sentence2", "score", None, from_end=frozenset({"score"}))),
    _glue("qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), "QQP",
          TsvLayout(("id", "qid1", "qid2", "question1", "question2", "is_duplicate"), "question1", "question2",
                    "is_duplicate", _BINARY, skip_short_rows=True)),
    _glue("mnli", ("premise", "hypothesis"), tuple(_NLI3), "MNLI", _MNLI_TSV,
          {"train": _MNLI_TRAIN, "validation_matched": _MNLI_M, "validation_mismatched": _MNLI_MM}),
    _glue("mnli_m", ("premise", "hypothesis"), tuple(_NLI3), "MNLI", _MNLI_TSV,
          {"train": _MNLI_TRAIN, "validation": _MNLI_M}, config="mnli"),
    _glue("mnli_mm", ("premise", "hypothesis"), tuple(_NLI3), "MNLI", _MNLI_TSV,
          {"train": _MNLI_TRAIN, "validation": _MNLI_MM}, config="mnli"),
    _glue("qnli", ("question", "sentence"), tuple(_ENTAILMENT), "QNLI",
          TsvLayout(("index", "question", "sentence", "label"), "question", "sentence", "label", _ENTAILMENT)),
    _glue("rte", ("sentence1", "sentence2"), tuple(_ENTAILMENT), "RTE",
          TsvLayout(("index", "sentence1", "sentence2", "label"), "sentence1", "sentence2", "label", _ENTAILMENT)),
    _glue("wnli", ("sentence1", "sentence2"), ("not_entailment", "entailment"), "WNLI",
          TsvLayout(("index", "sentence1", "sentence2", "label"), "sentence1", "sentence2", "label", _BINARY)),
    _squad("squad", "1.1"),
    _squad("squad_v2", "2.0"),
)}
GLUE_TASKS = tuple(name for name, task in TASKS.items() if task.kind != "extractive_qa")

_TASK_ALIASES = {"sst_2": "sst2", "sts_b": "stsb", "mnli_matched": "mnli_m", "mnli_mismatched": "mnli_mm",
                 "squad_v1": "squad", "squad_v1.1": "squad", "squad_v2.0": "squad_v2", "squad2": "squad_v2"}
_SPLIT_ALIASES = {"dev": "validation", "dev_matched": "validation_matched", "dev_mismatched": "validation_mismatched"}


def canonical_task(name: str) -> str:
    """The registry key for a task name as papers and tools spell it (``SST-2``, ``MNLI-mm``, ``STS-B``)."""
    key = str(name).strip().lower().replace("-", "_")
    key = _TASK_ALIASES.get(key, key)
    if key not in TASKS:
        raise ConfigError(f"unknown task {name!r} (known: {', '.join(TASKS)})")
    return key


def get_task(name: str) -> Task:
    return TASKS[canonical_task(name)]


def _split(task: Task, split: str) -> str:
    key = _SPLIT_ALIASES.get(split, split)
    if key not in task.splits:
        raise ConfigError(f"task {task.name}: unknown split {split!r} (known: {', '.join(task.splits)})")
    return key


def task_file(task: str, split: str, data_dir: str | os.PathLike) -> Path:
    """The local file a split reads: ``data_dir/<GLUE dir>/<file>``, or ``data_dir/<file>`` for SQuAD."""
    spec = get_task(task)
    return Path(data_dir) / spec.local_dir / spec.splits[_split(spec, split)][0]


def load_task_split(task: str, split: str, data_dir: str | os.PathLike | None = None) -> datasets.Dataset:
    """One split as a Dataset: GLUE -> ``text_a``, [``text_b``], ``label``; SQuAD -> id, title,
    context, question, answers. Splits: ``train``, ``validation`` (alias ``dev``); MNLI has
    ``validation_matched`` / ``validation_mismatched`` (or use tasks ``mnli_m`` / ``mnli_mm``).

    From ``data_dir`` (see :func:`task_file`) when given, else from the hub.
    """
    spec = get_task(task)
    key = _split(spec, split)
    if data_dir is None:
        return _from_hub(spec, key)
    path = task_file(spec.name, key, data_dir)
    if not path.is_file():
        raise ConfigError(f"task {spec.name} split {key}: no such file {path.absolute()}")
    if spec.kind == "extractive_qa":
        return squad_dataset(load_squad_articles(path))
    return _dataset(spec, read_glue_tsv(path, spec))


def _features(spec: Task) -> datasets.Features:
    from datasets import ClassLabel, Features, Sequence, Value

    if spec.kind == "extractive_qa":
        text = Value("string")
        return Features({"id": text, "title": text, "context": text, "question": text,
                         "answers": {"text": Sequence(text), "answer_start": Sequence(Value("int32"))}})
    columns = {"text_a": Value("string")}
    if len(spec.text_columns) == 2:
        columns["text_b"] = Value("string")
    columns["label"] = Value("float32") if spec.kind == "regression" else ClassLabel(names=list(spec.label_names))
    return Features(columns)


def _dataset(spec: Task, columns: Mapping[str, list[Any]]) -> datasets.Dataset:
    from datasets import Dataset

    return Dataset.from_dict(dict(columns), features=_features(spec))


def _from_hub(spec: Task, split: str) -> datasets.Dataset:
    import datasets

    hub_split = spec.splits[split][1]
    try:
        ds = datasets.load_dataset(spec.hub_path, spec.hub_config, split=hub_split)
    except OSError as exc:  # offline, unreachable, or not on the hub (DatasetNotFoundError is one)
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"task {spec.name}: cannot load {spec.hub_path} ({spec.hub_config or 'default'}) split "
                          f"{hub_split} from the hub ({first_line}); without network, pass a data_dir") from None
    features = _features(spec)
    if spec.kind == "extractive_qa":
        return ds.select_columns(list(features)).cast(features)
    names = dict(zip(spec.text_columns, ("text_a", "text_b")))
    names[spec.label_column] = "label"
    ds = ds.select_columns(list(names)).rename_columns({k: v for k, v in names.items() if k != v})
    return ds.cast(features)


def read_glue_tsv(path: str | os.PathLike, spec: Task) -> dict[str, list[Any]]:
    """Columns ``text_a`` [, ``text_b``], ``label`` of an original GLUE TSV file.

    Read with ``csv.QUOTE_NONE``: GLUE text holds unbalanced quotes that a quoting
    reader would merge across lines. A BOM (MRPC copies often have one) is dropped.
    """
    path = Path(path)
    layout = spec.tsv
    if layout is None:
        raise ConfigError(f"task {spec.name} has no TSV layout")
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        first = next(reader, None)
        if first is None:
            raise ConfigError(f"{path}: empty file (expected GLUE {spec.local_dir} columns {', '.join(layout.columns)})")
        index = _column_index(path, spec, layout, first)
        need = max(i + 1 if i >= 0 else -i for i in index.values())
        rows = reader if layout.has_header else itertools.chain([first], reader)
        out: dict[str, list[Any]] = {"text_a": [], "text_b": [], "label": []}
        if layout.text_b is None:
            del out["text_b"]
        for row in rows:
            if not row:
                continue  # a blank line, e.g. at the end
            if len(row) < need:
                if layout.skip_short_rows:
                    continue
                raise ConfigError(f"{path}:{reader.line_num}: expected at least {need} tab-separated columns, "
                                  f"got {len(row)}")
            out["text_a"].append(row[index[layout.text_a]])
            if layout.text_b is not None:
                out["text_b"].append(row[index[layout.text_b]])
            out["label"].append(_label(path, reader.line_num, layout, row[index[layout.label]]))
    return out


def _column_index(path: Path, spec: Task, layout: TsvLayout, first: list[str]) -> dict[str, int]:
    """Position of each used column; a header (or first line) that does not fit is a layout error."""
    if layout.has_header:
        header = [name.strip() for name in first]
        if any(c not in header for c in layout.used):
            raise ConfigError(f"{path}: not the GLUE {spec.local_dir} layout: expected a header with columns "
                              f"{', '.join(layout.used)}; the header has: {', '.join(header) or '(nothing)'}")
        return {c: header.index(c) - (len(header) if c in layout.from_end else 0) for c in layout.used}
    index = {c: layout.columns.index(c) for c in layout.used}
    label_ok = len(first) >= len(layout.columns) and first[index[layout.label]].strip() in (layout.labels or {})
    if not label_ok:
        raise ConfigError(f"{path}: not the GLUE {spec.local_dir} layout: expected no header and "
                          f"{len(layout.columns)} tab-separated columns ({', '.join(layout.columns)}); "
                          f"line 1 has: {', '.join(first)[:200]}")
    return index


def _label(path: Path, line: int, layout: TsvLayout, text: str) -> int | float:
    value = text.strip()
    if layout.labels is None:
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{path}:{line}: {layout.label} {value!r} is not a number") from None
    if value not in layout.labels:
        raise ConfigError(f"{path}:{line}: unknown label {value!r} (expected one of: {', '.join(layout.labels)})")
    return layout.labels[value]


def load_squad_articles(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The ``data`` list of an official SQuAD JSON file, checked for the fields scoring needs."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path.absolute()}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: malformed JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    articles = doc.get("data") if isinstance(doc, dict) else None
    _expect(path, isinstance(articles, list), "top level", "an object with a 'data' list")
    for i, article in enumerate(articles):
        where = f"data[{i}]"
        _expect(path, isinstance(article, dict) and isinstance(article.get("paragraphs"), list), where,
                "an article with a 'paragraphs' list")
        for j, paragraph in enumerate(article["paragraphs"]):
            where = f"data[{i}].paragraphs[{j}]"
            _expect(path, isinstance(paragraph, dict) and isinstance(paragraph.get("context"), str)
                    and isinstance(paragraph.get("qas"), list), where, "a paragraph with 'context' and a 'qas' list")
            for k, qa in enumerate(paragraph["qas"]):
                _expect(path, isinstance(qa, dict) and isinstance(qa.get("id"), str)
                        and isinstance(qa.get("question"), str) and isinstance(qa.get("answers"), list)
                        and all(isinstance(a, dict) and isinstance(a.get("text"), str)
                                and isinstance(a.get("answer_start"), int) for a in qa["answers"]),
                        f"{where}.qas[{k}]", "a question with 'id', 'question' and 'answers' [{text, answer_start}]")
    return articles


def _expect(path: Path, condition: bool, where: str, what: str) -> None:
    if not condition:
        raise ConfigError(f"{path}: not the SQuAD layout: {where} should be {what}")


def squad_dataset(articles: list[Mapping[str, Any]]) -> datasets.Dataset:
    """One row per question, with the hub ``squad`` columns (no-answer questions have empty answers)."""
    rows: dict[str, list[Any]] = {"id": [], "title": [], "context": [], "question": [], "answers": []}
    for article in articles:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                rows["id"].append(qa["id"])
                rows["title"].append(article.get("title", ""))
                rows["context"].append(paragraph["context"])
                rows["question"].append(qa["question"])
                rows["answers"].append({"text": [a["text"] for a in qa["answers"]],
                                        "answer_start": [a["answer_start"] for a in qa["answers"]]})
    return _dataset(TASKS["squad"], rows)


def split_squad_by_article(source: str | os.PathLike, out_dir: str | os.PathLike, version: str = "1.1",
                           eval_every: int = 2) -> tuple[Path, Path]:
    """Split one SQuAD file into disjoint ``train-v{version}.json`` and ``dev-v{version}.json`` by article.

    Why: the official train file is not always at hand (not on this project's CI
    machines); a proxy task needs training and evaluation questions that share no
    paragraph, which splitting by article guarantees. Every ``eval_every``-th article
    (1st, 3rd, ... for 2) goes to ``dev``, the rest to ``train``, so both halves span
    the file's topics. The two files are written atomically into ``out_dir``.
    """
    from raynas.atomic_io import atomic_file

    articles_in = load_squad_articles(source)
    if eval_every < 2:
        raise ConfigError(f"eval_every: expected at least 2, got {eval_every!r}")
    if len(articles_in) < 2:
        raise ConfigError(f"{source}: {len(articles_in)} article(s); a split by article needs at least 2")
    dev = [a for i, a in enumerate(articles_in) if i % eval_every == 0]
    train = [a for i, a in enumerate(articles_in) if i % eval_every != 0]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, articles in ((f"train-v{version}.json", train), (f"dev-v{version}.json", dev)):
        with atomic_file(out / name) as tmp:
            tmp.write_text(json.dumps({"version": version, "data": articles}), encoding="utf-8")
        paths.append(out / name)
    return paths[0], paths[1]
