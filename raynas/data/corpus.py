"""Pre-training corpora: documents -> fixed-length packed ``[CLS] ... [SEP]`` sequences.

Supernet training (AutoTinyBERT, NAS-BERT) is BERT pre-training, so the data is
BERT's: documents are tokenized, concatenated and cut into ``seq_len - 2`` token
chunks, each wrapped in ``[CLS]`` / ``[SEP]``. Every row has the same length, so
batches never pad and every token is trained on. Tokenizing and packing run as
``datasets`` batched maps, so the result is Arrow; with ``cache_dir`` it is saved
and reloaded from disk, and each (Ray Train) worker memory-maps its shard
(:func:`shard_for_worker`) instead of holding a copy.

Sources: ``builtin:python-docs`` (offline: CPython's own help texts and stdlib
docstrings), local ``.txt`` / ``.jsonl`` / ``.parquet`` files or globs, or a hub
dataset ``name[:config]`` (its ``train`` split) on machines with network.
"""

from __future__ import annotations

import glob
import hashlib
import importlib
import inspect
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from raynas.atomic_io import publish_dir
from raynas.errors import ConfigError, require

BUILTIN_PREFIX = "builtin:"
BUILTIN_SOURCES = ("python-docs",)
SUFFIXES = (".txt", ".jsonl", ".parquet")
TOKENIZE_BATCH = 1000  # documents per map batch; the packing remainder (< seq_len tokens) of each batch is dropped

# Stdlib modules whose docstrings extend the help topics: a fixed list, so the corpus is stable per Python version.
STDLIB_MODULES = (
    "abc", "argparse", "array", "asyncio", "base64", "bisect", "builtins", "calendar", "collections", "contextlib",
    "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "doctest", "email.message", "enum", "fractions",
    "functools", "gettext", "glob", "gzip", "hashlib", "heapq", "http.client", "inspect", "io", "ipaddress",
    "itertools", "json", "locale", "logging", "math", "mmap", "operator", "os", "pathlib", "pickle", "pprint",
    "queue", "random", "re", "sched", "shlex", "shutil", "socket", "statistics", "string", "struct", "subprocess",
    "tarfile", "tempfile", "textwrap", "threading", "time", "typing", "unittest", "urllib.parse", "uuid",
    "warnings", "weakref", "zipfile",
)


@dataclass
class CorpusConfig:
    """Where the text comes from and how it is cut; every field is part of the cache key."""

    source: str = "builtin:python-docs"
    files: list[str] = field(default_factory=list)  # when given, these local files (and builtin:NAME entries) are the corpus (source ignored)
    text_field: str = "text"  # .jsonl field / .parquet column / hub dataset column
    seq_len: int = 128
    validation_fraction: float = 0.05
    max_sequences: int | None = None  # cap on packed sequences (train + validation), taken after the seeded shuffle
    seed: int = 0

    def validate(self) -> None:
        """Raise :class:`ConfigError` for values that cannot make a corpus."""
        require(isinstance(self.seq_len, int) and self.seq_len >= 8, f"corpus seq_len: must be >= 8, got {self.seq_len}")
        require(0.0 <= self.validation_fraction <= 0.5,
                f"corpus validation_fraction: must be in [0, 0.5], got {self.validation_fraction}")
        require(self.max_sequences is None or self.max_sequences >= 1,
                f"corpus max_sequences: must be >= 1 or None, got {self.max_sequences}")
        require(bool(self.text_field), "corpus text_field: must not be empty")
        require(bool(self.files) or bool(self.source), "corpus: give a source or files")


# ---------------------------------------------------------------- documents


def builtin_documents(name: str = "python-docs") -> list[str]:
    """The offline corpus: every Python install carries these English texts, so tests and demos need no network."""
    require(name in BUILTIN_SOURCES, f"corpus source {BUILTIN_PREFIX}{name}: unknown (have: "
            + ", ".join(BUILTIN_PREFIX + s for s in BUILTIN_SOURCES) + ")")
    from pydoc_data.topics import topics

    docs = [topics[key] for key in sorted(topics)]
    for module_name in STDLIB_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # e.g. a build without some optional module
            continue
        docs.append(_module_text(module))
    return [d for d in docs if d.strip()]


def _module_text(module: Any) -> str:
    """A module's docstring and those of its public classes, functions and methods, each once."""
    seen: set[str] = set()
    parts: list[str] = []

    def add(obj: Any) -> None:
        doc = inspect.getdoc(obj)
        if doc and doc not in seen:
            seen.add(doc)
            parts.append(doc)

    add(module)
    for name in sorted(vars(module)):
        obj = getattr(module, name)
        if name.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        add(obj)
        if inspect.isclass(obj):
            for member in sorted(vars(obj)):
                if not member.startswith("_"):
                    add(getattr(obj, member, None))
    return "\n\n".join(parts)


def resolve_files(patterns: list[str]) -> list[Path]:
    """Expand globs, check existence and type: one error naming the offending pattern or file."""
    out: list[Path] = []
    for pattern in patterns:
        text = os.path.expanduser(str(pattern))
        if any(c in text for c in "*?["):
            matches = sorted(glob.glob(text, recursive=True))
            require(bool(matches), f"{pattern}: glob matches no file")
            paths = [Path(m) for m in matches]
        else:
            paths = [Path(text)]
        for path in paths:
            require(path.exists(), f"{path}: no such file")
            require(path.is_file(), f"{path}: not a file")
            require(path.suffix in SUFFIXES, f"{path}: unsupported file type (want {', '.join(SUFFIXES)})")
            out.append(path)
    return out


def read_documents(path: Path, text_field: str = "text") -> list[str]:
    """Documents of one file: .txt paragraphs (split on blank lines), .jsonl records, .parquet rows."""
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            schema = pq.read_schema(path)
            require(text_field in schema.names,
                    f"{path}: no column {text_field!r} (columns: {', '.join(schema.names)})")
            values = pq.read_table(path, columns=[text_field]).column(text_field).to_pylist()
        except (pa.ArrowInvalid, OSError) as exc:
            raise ConfigError(f"{path}: cannot read as parquet ({exc})") from None
        return [str(v) for v in values if v is not None and str(v).strip()]
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if path.suffix == ".txt":
        return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    docs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{number}: not JSON ({exc.msg})") from None
        value = record.get(text_field) if isinstance(record, dict) else None
        require(isinstance(value, str), f"{path}:{number}: no string field {text_field!r}")
        if value.strip():
            docs.append(value)
    return docs


def _is_local(source: str) -> bool:
    return (Path(source).expanduser().exists() or any(c in source for c in "*?[")
            or source.endswith(SUFFIXES) or source.startswith((".", "/", "~")))


def _local_files(cfg: CorpusConfig) -> list[Path] | None:
    if cfg.files:
        return resolve_files([f for f in cfg.files if not str(f).startswith(BUILTIN_PREFIX)])
    if not cfg.source.startswith(BUILTIN_PREFIX) and _is_local(cfg.source):
        return resolve_files([cfg.source])
    return None


def load_documents(cfg: CorpusConfig) -> datasets.Dataset:
    """A one-column (``text``) dataset of raw documents for ``cfg``."""
    if cfg.files:  # local files, and builtin:NAME entries mixed in (e.g. the offline corpus plus WikiText-2)
        docs: list[str] = []
        for entry in cfg.files:
            if str(entry).startswith(BUILTIN_PREFIX):
                docs += builtin_documents(str(entry)[len(BUILTIN_PREFIX):])
            else:
                docs += [d for path in resolve_files([entry]) for d in read_documents(path, cfg.text_field)]
        return datasets.Dataset.from_dict({"text": docs})
    files = _local_files(cfg)
    if files is not None:
        docs = [d for path in files for d in read_documents(path, cfg.text_field)]
        return datasets.Dataset.from_dict({"text": docs})
    if cfg.source.startswith(BUILTIN_PREFIX):
        return datasets.Dataset.from_dict({"text": builtin_documents(cfg.source[len(BUILTIN_PREFIX):])})
    name, _, config = cfg.source.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split="train")
    except (OSError, ValueError) as exc:  # ConnectionError, DatasetNotFoundError, unknown config ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"corpus source {cfg.source!r}: cannot load dataset {name!r} ({first}); "
                          f"without network, use builtin:python-docs or local files") from None
    require(cfg.text_field in ds.column_names,
            f"corpus source {cfg.source!r}: no column {cfg.text_field!r} (columns: {', '.join(ds.column_names)})")
    return ds.select_columns([cfg.text_field])


# ---------------------------------------------------------------- packing


def _packer(tokenizer: Any, text_column: str, seq_len: int) -> Any:
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    body = seq_len - 2

    def pack(batch: dict[str, list[Any]]) -> dict[str, Any]:
        texts = [t for t in batch[text_column] if isinstance(t, str) and t.strip()]
        ids = tokenizer(texts, add_special_tokens=False, verbose=False, return_attention_mask=False,
                        return_token_type_ids=False)["input_ids"] if texts else []
        flat = np.fromiter((i for doc in ids for i in doc), dtype=np.int32)
        rows = flat[: len(flat) // body * body].reshape(-1, body)
        out = np.empty((len(rows), seq_len), dtype=np.int32)
        out[:, 0], out[:, 1:-1], out[:, -1] = cls_id, rows, sep_id
        return {"input_ids": list(out)}

    return pack


def _cache_key(cfg: CorpusConfig, tokenizer: Any) -> str:
    """Config + tokenizer vocabulary + file sizes / mtimes (+ Python version for the builtin text)."""
    files = _local_files(cfg) or []
    parts = {
        "config": asdict(cfg),
        "files": [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files],
        "python": sys.version if any(str(s).startswith(BUILTIN_PREFIX) for s in (cfg.files or [cfg.source])) else "",
        "tokenizer": [type(tokenizer).__name__, sorted(tokenizer.get_vocab().items()),
                      tokenizer.cls_token_id, tokenizer.sep_token_id],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _split(packed: datasets.Dataset, cfg: CorpusConfig, key: str) -> datasets.DatasetDict:
    """Seeded shuffle, optional cap, then validation = the first ``fraction`` of the permutation."""
    n = len(packed)
    order = np.random.default_rng(cfg.seed).permutation(n)
    if cfg.max_sequences is not None:
        order = order[: cfg.max_sequences]
        n = len(order)
    n_val = int(round(n * cfg.validation_fraction))
    if cfg.validation_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    parts = {"train": order[n_val:], "validation": order[:n_val]}
    return datasets.DatasetDict({
        name: packed.select(idx.tolist(), new_fingerprint=f"{key}-{name}").flatten_indices(
            new_fingerprint=f"{key}-{name}-flat")
        for name, idx in parts.items()
    })


def _describe(cfg: CorpusConfig) -> str:
    return ", ".join(cfg.files) if cfg.files else cfg.source


def build_corpus(cfg: CorpusConfig, tokenizer: Any, cache_dir: str | os.PathLike | None = None) -> datasets.DatasetDict:
    """``train`` / ``validation`` splits of packed ``input_ids`` rows (int32, exactly ``seq_len`` each).

    With ``cache_dir`` the result is saved under ``cache_dir/corpus-<key>`` (key: config, tokenizer,
    file stats) and returned memory-mapped from there; a later call with the same inputs just reloads.
    """
    cfg.validate()
    require(tokenizer.cls_token_id is not None and tokenizer.sep_token_id is not None,
            f"corpus {_describe(cfg)}: tokenizer has no [CLS] / [SEP] token")
    key = _cache_key(cfg, tokenizer)
    target = Path(cache_dir) / f"corpus-{key}" if cache_dir is not None else None
    if target is not None and (target / "dataset_dict.json").is_file():
        return datasets.load_from_disk(str(target))

    docs = load_documents(cfg)
    features = datasets.Features({"input_ids": datasets.List(datasets.Value("int32"), length=cfg.seq_len)})
    packed = docs.map(_packer(tokenizer, docs.column_names[0], cfg.seq_len), batched=True,
                      batch_size=TOKENIZE_BATCH, remove_columns=docs.column_names, features=features,
                      new_fingerprint=f"{key}-packed", desc="tokenize + pack")
    require(len(packed) > 0, f"corpus {_describe(cfg)}: empty after tokenization "
            f"(fewer than {cfg.seq_len - 2} tokens per {TOKENIZE_BATCH} documents)")
    splits = _split(packed, cfg, key)
    if target is None:
        return splits
    return _save_and_reload(splits, target)


def _save_and_reload(splits: datasets.DatasetDict, target: Path) -> datasets.DatasetDict:
    """Write beside ``target`` then rename, so concurrent builders never see a half-written corpus."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        splits.save_to_disk(str(tmp))
        publish_dir(tmp)
        os.rename(tmp, target)
    except OSError:
        if not (target / "dataset_dict.json").is_file():  # not "another process finished first"
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return datasets.load_from_disk(str(target))


def shard_for_worker(dataset: datasets.Dataset, rank: int, world_size: int) -> datasets.Dataset:
    """Rank ``rank``'s contiguous slice of ``dataset``; each Ray Train worker calls this on its split.

    ``contiguous=True`` keeps the shard a view of the memory-mapped Arrow table: no copy.
    """
    require(world_size >= 1 and 0 <= rank < world_size, f"shard: rank {rank} not in [0, {world_size})")
    return dataset.shard(num_shards=world_size, index=rank, contiguous=True)


def corpus_stats(corpus: datasets.DatasetDict) -> dict[str, int]:
    """Sequence and token counts per split (for logs and reports)."""
    out: dict[str, int] = {}
    for name, ds in corpus.items():
        seq_len = ds.features["input_ids"].length
        out[f"{name}_sequences"] = len(ds)
        out[f"{name}_tokens"] = len(ds) * (seq_len if seq_len > 0 else 0)
    return out
