"""The search's record: one Parquet row per evaluated arch, one per chosen model, with declared schemas.

The evaluated table is append-only and written after every completed trial
(the whole table, atomically: a crash leaves the previous complete file), so a
killed search loses at most the trials in flight, and a rerun replays the rows
(:meth:`raynas.search.evolution.EvolutionSearch.replay`) instead of paying for
them again. An arch already in the table is refused: no arch is stored twice.
pandas reads both tables (``pd.read_parquet``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from raynas.errors import ConfigError
from raynas.search.constraints import COST_COLUMN, Budget, Constraint
from raynas.search.pareto import best_per_budget
from raynas.tables import to_table, write_parquet

EVALUATED_FILE, CHOSEN_FILE = "evaluated.parquet", "chosen.parquet"
TIMESTAMP = pa.timestamp("us", tz="UTC")
EVALUATED_SCHEMA = pa.schema([
    ("arch", pa.string()), ("space", pa.string()), ("strategy", pa.string()),
    ("budget", pa.string()),  # label of the budget it was generated for (it serves every budget it fits)
    ("origin", pa.string()),  # initial | mutation | exploration | random | fast | fallback
    ("params", pa.int64()), ("flops", pa.int64()),
    ("predicted_latency_ms", pa.float64()),  # null without a predictor
    ("measured_latency_ms", pa.float64()),  # null until measured
    ("proxy_loss", pa.float64()),  # the proxy fitness: validation loss of the inherited sub-model, lower is better
    ("loss_terms", pa.string()),  # JSON: every term of the objective (mlm, hidden, ...)
    ("generation", pa.int32()), ("trial_id", pa.string()), ("seed", pa.int64()),
    ("started_at", TIMESTAMP), ("finished_at", TIMESTAMP),  # the trial's evaluation (its archs run together)
])
CHOSEN_SCHEMA = pa.schema([
    ("budget", pa.string()), ("budget_value", pa.float64()), ("unit", pa.string()),  # ms | params | flops
    ("arch", pa.string()),  # null when no evaluated arch fits (then `note` says why)
    ("proxy_loss", pa.float64()), ("cost", pa.float64()),  # cost in `unit`
    ("predicted_latency_ms", pa.float64()), ("predicted_speedup", pa.float64()),  # vs the predictor's reference
    ("params", pa.int64()), ("flops", pa.int64()), ("generation", pa.int32()), ("note", pa.string()),
])


class ResultStore:
    """The evaluated-arch table at ``path``: rows in memory, rewritten atomically on every :meth:`add`."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._rows: list[dict[str, Any]] = []
        if self.path.exists():
            try:
                table = pq.read_table(self.path)
            except (pa.ArrowInvalid, OSError) as exc:
                raise ConfigError(f"{self.path}: not a readable Parquet table ({exc})") from None
            if not table.schema.equals(EVALUATED_SCHEMA):
                raise ConfigError(f"{self.path}: not an evaluated-archs table of this version (columns: "
                                  f"{', '.join(table.schema.names)}): use a new output folder")
            self._rows = table.to_pylist()
        self._archs = {r["arch"] for r in self._rows}

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, arch: object) -> bool:
        return arch in self._archs

    def rows(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._rows]

    def add(self, rows: Sequence[Mapping[str, Any]]) -> Path:
        """Append ``rows`` and persist the table; ValueError (nothing written) if an arch is already stored."""
        rows = [dict(r) for r in rows]
        names = [r["arch"] for r in rows]
        twice = sorted({a for a in names if a in self._archs or names.count(a) > 1})
        if twice:
            raise ValueError(f"{self.path}: arch(s) {', '.join(twice)} already stored (no arch is evaluated twice)")
        table = to_table(self._rows + rows, EVALUATED_SCHEMA)  # checks columns before anything is written
        write_parquet(table, self.path)
        self._rows += rows
        self._archs.update(names)
        return self.path

    def check_same_search(self, **expected: Any) -> None:
        """Refuse stored rows made by a search with other settings (e.g. ``space=``, ``strategy=``, ``seed=``)."""
        for key, value in expected.items():
            found = sorted({str(r[key]) for r in self._rows if r[key] != value})
            if found:
                raise ConfigError(f"{self.path}: rows of {key} {', '.join(found)}, but this search has {key} "
                                  f"{value}: use a new output folder (or the same settings to resume)")


def loss_terms_json(terms: Mapping[str, float]) -> str:
    """The objective's terms as a JSON object (sorted keys), without the total ``loss``."""
    return json.dumps({k: float(v) for k, v in sorted(terms.items()) if k != "loss"})


def chosen_rows(evaluated: Iterable[Mapping[str, Any]], budgets: Sequence[Budget],
                constraint: Constraint) -> list[dict[str, Any]]:
    """One row per budget: the lowest-loss evaluated arch that fits it (rows of :data:`CHOSEN_SCHEMA`)."""
    out = []
    for budget, row in best_per_budget(list(evaluated), budgets):
        base: dict[str, Any] = {"budget": budget.label, "budget_value": budget.value, "unit": budget.unit}
        if row is None:
            out.append({**base, "note": "no evaluated arch fits this budget"})
            continue
        latency = row.get("predicted_latency_ms")
        latency = None if latency is None or (isinstance(latency, float) and math.isnan(latency)) else latency
        out.append({**base, "arch": row["arch"], "proxy_loss": row["proxy_loss"],
                    "cost": float(row[COST_COLUMN[budget.unit]]), "predicted_latency_ms": latency,
                    "predicted_speedup": constraint.latency_speedup(latency), "params": row["params"],
                    "flops": row["flops"], "generation": row["generation"], "note": ""})
    return out


def write_chosen(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    return write_parquet(to_table(rows, CHOSEN_SCHEMA), path)


def format_chosen(rows: Sequence[Mapping[str, Any]]) -> str:
    """The chosen table as aligned text for a terminal."""
    head = ("budget", "arch", "proxy_loss", "pred_ms", "speedup", "params", "flops")

    def num(v: Any, fmt: str) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    cells = [(r["budget"], r.get("arch") or f"({r.get('note')})", num(r.get("proxy_loss"), ".4f"),
              num(r.get("predicted_latency_ms"), ".2f"), num(r.get("predicted_speedup"), ".2f"),
              num(r.get("params"), ","), num(r.get("flops"), ",")) for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *cells, strict=True)]
    return "\n".join("  ".join(str(c).ljust(w) if j < 2 else str(c).rjust(w)
                               for j, (c, w) in enumerate(zip(line, widths, strict=True))) for line in (head, *cells))
