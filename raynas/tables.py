"""Result tables: Arrow with a declared schema, written atomically as Parquet.

Every recipe that produces rows (benchmarks, extraction, later search trials)
writes through here, so a crash never leaves a truncated file and pandas can
read any of them with ``pd.read_parquet``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from raynas.atomic_io import atomic_file
from raynas.errors import ConfigError


def to_table(rows: Iterable[Mapping[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows -> table; a missing or extra column is a bug in the caller, so it raises."""
    rows = list(rows)
    for i, row in enumerate(rows):
        extra = set(row) - set(schema.names)
        if extra:
            raise ValueError(f"row {i}: columns {sorted(extra)} are not in the schema")
    return pa.Table.from_pylist(rows, schema=schema)


def write_parquet(table: pa.Table, path: str | os.PathLike) -> Path:
    with atomic_file(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def read_column(path: str | os.PathLike, column: str) -> list[Any]:
    """One column of a Parquet table, with a clear error naming file and column."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such file")
    try:
        schema = pq.read_schema(p)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ConfigError(f"{p}: not a readable Parquet file ({exc})") from None
    if column not in schema.names:
        raise ConfigError(f"{p}: no column {column!r} (columns: {', '.join(schema.names)})")
    return pq.read_table(p, columns=[column]).column(column).to_pylist()
