"""Teacher pairs: the teacher's hidden states at every block boundary, computed once, on disk.

Every student block trains on (input of teacher block k, output of teacher block k)
for many steps and from several workers at once; running the teacher for each of
them would cost K teacher forwards per step. :func:`write_pairs` runs it once and
stores ``h_0 .. h_K`` per row in one uncompressed Arrow IPC file, written in record
batches (the boundaries of all rows are never in memory at once) and atomically
(a crash leaves no half-written file). :meth:`TeacherPairs.open` memory-maps it:
the OS page cache holds the data once however many workers read it.

Pure numpy / pyarrow / torch: no Ray here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import torch

from raynas.atomic_io import atomic_file
from raynas.blockwise.blocks import TeacherBlocks
from raynas.errors import ConfigError

Tensor = torch.Tensor
FORMAT = b"raynas-teacher-pairs/1"


def _fixed(values: np.ndarray, size: int) -> pa.FixedSizeListArray:
    """Rows of ``size`` values each, wrapping the (contiguous) numpy buffer without a copy."""
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(values).reshape(-1)), size)


def pairs_schema(num_blocks: int, seq_len: int, hidden: int) -> pa.Schema:
    """``attention_mask`` (int8 x T) and ``h0 .. hK`` (float32 x T*D), shape in the metadata."""
    fields = [pa.field("attention_mask", pa.list_(pa.int8(), seq_len), nullable=False)]
    fields += [pa.field(f"h{k}", pa.list_(pa.float32(), seq_len * hidden), nullable=False)
               for k in range(num_blocks + 1)]
    meta = {b"format": FORMAT, b"num_blocks": str(num_blocks).encode(), b"seq_len": str(seq_len).encode(),
            b"hidden": str(hidden).encode()}
    return pa.schema(fields, metadata=meta)


def write_pairs(teacher: TeacherBlocks, input_ids: Tensor, attention_mask: Tensor, path: str | os.PathLike,
                batch_size: int = 32, progress: Callable[[str], None] | None = None) -> Path:
    """Run ``teacher`` over ``input_ids`` [N, T] and write ``h_0 .. h_K`` per row to ``path`` (Arrow IPC).

    Rows go through the teacher ``batch_size`` at a time (on the teacher's device)
    and each batch is written as one record batch before the next is computed.
    ``progress`` gets a line about every 10% of the rows.
    """
    if input_ids.dim() != 2 or tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ConfigError(f"teacher pairs: input_ids {tuple(input_ids.shape)} and attention_mask "
                          f"{tuple(attention_mask.shape)} must both be [rows, seq_len]")
    n, seq_len = input_ids.shape
    if n == 0:
        raise ConfigError("teacher pairs: no rows to run the teacher on")
    if batch_size < 1:
        raise ConfigError(f"teacher pairs: batch_size must be positive, got {batch_size}")
    out = Path(path)
    schema = pairs_schema(teacher.num_blocks, seq_len, teacher.hidden_size)
    device = next(teacher.parameters()).device
    every, next_report = max(1, n // 10), 0
    with atomic_file(out) as tmp, pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for lo in range(0, n, batch_size):
            ids = input_ids[lo: lo + batch_size].to(device)
            mask = attention_mask[lo: lo + batch_size]
            states = teacher.boundaries(ids, mask.to(device))
            columns = [_fixed(mask.cpu().numpy().astype(np.int8), seq_len)]
            columns += [_fixed(h.detach().float().cpu().numpy(), seq_len * teacher.hidden_size) for h in states]
            writer.write_batch(pa.RecordBatch.from_arrays(columns, schema=schema))
            done = min(n, lo + batch_size)
            if progress is not None and (done >= next_report or done == n):
                progress(f"teacher pairs: {done}/{n} rows ({100 * done // n}%) -> {out}")
                next_report = done + every
    return out


class TeacherPairs:
    """A teacher-pairs file, memory-mapped: arrays below are read-only views of the file where possible."""

    def __init__(self, path: Path, table: pa.Table, num_blocks: int, seq_len: int, hidden: int) -> None:
        self.path, self._table = path, table
        self.num_rows, self.seq_len, self.hidden, self.num_blocks = table.num_rows, seq_len, hidden, num_blocks
        self._offsets = np.cumsum([0, *(len(c) for c in table.column(0).chunks)])
        self._chunks: dict[str, list[np.ndarray]] = {}

    @classmethod
    def open(cls, path: str | os.PathLike) -> TeacherPairs:
        """Memory-map ``path``; ConfigError naming the file if it is missing, truncated or not a pairs file."""
        p = Path(path)
        try:
            table = pa.ipc.open_file(pa.memory_map(str(p), "r")).read_all()
            table.validate()
        except (OSError, pa.ArrowException) as exc:
            raise ConfigError(f"{p}: not a readable teacher-pairs file ({exc}); delete it to recompute") from None
        meta = table.schema.metadata or {}
        try:
            if meta.get(b"format") != FORMAT:
                raise ValueError(f"format {meta.get(b'format')!r}, expected {FORMAT!r}")
            k, t, d = (int(meta[key]) for key in (b"num_blocks", b"seq_len", b"hidden"))
        except (KeyError, ValueError) as exc:
            raise ConfigError(f"{p}: not a teacher-pairs file ({exc}); delete it to recompute") from None
        if table.num_rows == 0:
            raise ConfigError(f"{p}: a teacher-pairs file with no rows; delete it to recompute")
        if not table.schema.equals(pairs_schema(k, t, d)):
            raise ConfigError(f"{p}: columns {table.schema.names} do not match a teacher-pairs file "
                              f"with {k} blocks, seq_len {t}, hidden {d}; delete it to recompute")
        return cls(p, table, k, t, d)

    def _views(self, name: str) -> list[np.ndarray]:
        """Per record batch, zero-copy numpy views of column ``name``: [n, T, D] (states) or [n, T] (mask)."""
        views = self._chunks.get(name)
        if views is None:
            shape = (self.seq_len,) if name == "attention_mask" else (self.seq_len, self.hidden)
            views = [c.flatten().to_numpy(zero_copy_only=True).reshape(len(c), *shape)
                     for c in self._table.column(name).chunks]
            self._chunks[name] = views
        return views

    def _column(self, name: str) -> np.ndarray:
        views = self._views(name)
        return views[0] if len(views) == 1 else np.concatenate(views)

    def _check(self, k: int) -> None:
        if not 0 <= k < self.num_blocks:
            raise ConfigError(f"block {k}: expected 0 <= block < {self.num_blocks} ({self.path})")

    def block(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(inputs [N,T,D] f32, outputs [N,T,D] f32, mask [N,T] int8)`` of block ``k``.

        Views of the mapped file when it holds one record batch; otherwise one
        copy per call (the batches are not contiguous): use :meth:`rows` to read
        a subset without materialising whole columns.
        """
        self._check(k)
        return self._column(f"h{k}"), self._column(f"h{k + 1}"), self._column("attention_mask")

    def rows(self, k: int, index: np.ndarray | list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """As :meth:`block`, only rows ``index`` (in that order): a training batch, copied out of the map."""
        self._check(k)
        idx = np.asarray(index, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_rows):
            raise IndexError(f"rows {idx.min()}..{idx.max()} out of range for {self.num_rows} rows ({self.path})")
        chunk = np.searchsorted(self._offsets, idx, side="right") - 1
        local = idx - self._offsets[chunk]

        def gather(name: str) -> np.ndarray:
            views = self._views(name)
            out = np.empty((len(idx), *views[0].shape[1:]), dtype=views[0].dtype)
            for c in np.unique(chunk):
                sel = chunk == c
                out[sel] = views[c][local[sel]]
            return out

        return gather(f"h{k}"), gather(f"h{k + 1}"), gather("attention_mask")
