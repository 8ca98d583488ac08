"""The model-family report: one table and one plot of size, speed and downstream score per model.

This is the table AutoTinyBERT (Table 1) and NAS-BERT print for a family of
searched models: parameters, latency and speedup against a reference, the dev
score of every GLUE (and SQuAD) task, and the GLUE average with and without
CoLA. CoLA is small and noisy and moves the average most, which is why papers
give both. WNLI, when present, is shown but never averaged: BERT, TinyBERT and
AutoTinyBERT leave it out because its dev set is adversarial to every model.

An average covers one fixed set of tasks for every model (the GLUE tasks the
report holds); a model missing any of them gets nan, not an average over fewer
tasks, which would not be comparable with the other rows. The report states
the exact tasks each average covers.

Written atomically: ``report.parquet`` (declared schema, for code),
``report.md`` (for people) and ``score_vs_speedup.png`` (the trade-off at a glance).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
import pyarrow as pa

from raynas.atomic_io import atomic_file
from raynas.errors import ConfigError
from raynas.evaluation.tasks import canonical_task
from raynas.tables import to_table, write_parquet

# Column order of the report (GLUE order, as the papers print it), with display names.
TASK_ORDER = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli_m", "mnli_mm", "qnli", "rte", "wnli", "squad", "squad_v2")
TASK_LABELS = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "stsb": "STS-B", "qqp": "QQP", "mnli_m": "MNLI-m",
               "mnli_mm": "MNLI-mm", "qnli": "QNLI", "rte": "RTE", "wnli": "WNLI", "squad": "SQuAD v1.1",
               "squad_v2": "SQuAD v2.0"}
AVERAGED = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli_m", "mnli_mm", "qnli", "rte")  # GLUE without WNLI
BASE_COLUMNS = ("model", "params", "latency_ms", "speedup")
AVERAGE_COLUMNS = ("glue_avg", "glue_avg_no_cola")
# Keys measure_latency / compare_latency add that the report does not show: rows can be merged as they come.
IGNORED_KEYS = frozenset({"latency_p90_ms", "latency_min_ms", "seq_len", "batch_size", "threads"})
REFERENCE_MARK = " (ref)"
PNG_NAME = "score_vs_speedup.png"


def _number(value: Any) -> float:
    """A score or measurement as float; None and nan mean "missing"."""
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"expected a number, got {value!r}")
    return float(value)


def _normalise(rows: Sequence[Mapping[str, Any]], reference: str | None) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows with canonical task keys and float scores; the tasks present, in report order."""
    out: list[dict[str, Any]] = []
    present: set[str] = set()
    for i, row in enumerate(rows):
        where = f"row {i}"
        if not isinstance(row.get("model"), (str, os.PathLike)) or not str(row.get("model")):
            raise ConfigError(f"{where}: needs a 'model' name")
        name = str(row["model"])
        where = f"row {i} ({name})"
        for key in ("params", "latency_ms"):
            if key not in row:
                raise ConfigError(f"{where}: missing {key!r}")
        params = row["params"]
        if isinstance(params, bool) or not isinstance(params, int) or params < 0:
            raise ConfigError(f"{where}: params should be a non-negative integer, got {params!r}")
        clean: dict[str, Any] = {"model": name, "params": params}
        try:
            clean["latency_ms"] = _number(row["latency_ms"])
            clean["speedup"] = _number(row.get("speedup"))
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        for key, value in row.items():
            if key in BASE_COLUMNS or key in IGNORED_KEYS:
                continue
            try:
                task = canonical_task(key)
            except ConfigError:
                raise ConfigError(f"{where}: {key!r} is neither a report column nor a task "
                                  f"(tasks: {', '.join(TASK_ORDER)})") from None
            if task not in TASK_ORDER:
                raise ConfigError(f"{where}: task {key!r}: report mnli_m and mnli_mm separately")
            if task in clean:
                raise ConfigError(f"{where}: task {task} given twice")
            try:
                clean[task] = _number(value)
            except ConfigError as exc:
                raise ConfigError(f"{where}: {key}: {exc}") from None
            present.add(task)
        out.append(clean)
    names = [r["model"] for r in out]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"models listed twice: {', '.join(duplicates)}")
    if reference is not None and str(reference) not in names:
        raise ConfigError(f"reference {str(reference)!r} is not one of the models ({', '.join(names)})")
    tasks = [t for t in TASK_ORDER if t in present]
    scores = [r[t] for r in out for t in tasks if not math.isnan(r.get(t, math.nan))]
    if any(s != 0 for s in scores) and all(abs(s) <= 1 for s in scores):
        raise ConfigError("every score is within [-1, 1]: scores must be in percent (91.2, not 0.912)")
    return out, tasks


def _fill_speedup(rows: list[dict[str, Any]], reference: str | None) -> None:
    """A missing speedup is derived from the reference's latency, so hand-made rows need not carry one."""
    if reference is None:
        return
    ref_ms = next(r["latency_ms"] for r in rows if r["model"] == str(reference))
    for row in rows:
        if math.isnan(row["speedup"]):
            row["speedup"] = ref_ms / row["latency_ms"] if row["latency_ms"] > 0 else math.nan


def _average(row: Mapping[str, Any], tasks: Sequence[str]) -> float:
    """Mean over exactly ``tasks``; nan if there are none or the model lacks any of them."""
    values = [row.get(t, math.nan) for t in tasks]
    if not values or any(math.isnan(v) for v in values):
        return math.nan
    return sum(values) / len(values)


def averaged_tasks(tasks: Sequence[str]) -> tuple[list[str], list[str]]:
    """The tasks ``glue_avg`` and ``glue_avg_no_cola`` cover, given the tasks a report holds."""
    with_cola = [t for t in AVERAGED if t in tasks]
    return with_cola, [t for t in with_cola if t != "cola"]


def report_schema(tasks: Sequence[str]) -> pa.Schema:
    """model, params, latency_ms, speedup, one float64 per task (GLUE order), the two averages."""
    fields = [pa.field("model", pa.string()), pa.field("params", pa.int64()), pa.field("latency_ms", pa.float64()),
              pa.field("speedup", pa.float64())]
    fields += [pa.field(t, pa.float64()) for t in tasks]
    fields += [pa.field(c, pa.float64()) for c in AVERAGE_COLUMNS]
    return pa.schema(fields)


def score_scale(task: str) -> float:
    """Tables print GLUE metrics (fractions) as percentages; SQuAD's F1 / EM are percentages already."""
    return 1.0 if task.lower().startswith("squad") else 100.0


def fmt_number(value: float | None, spec: str, suffix: str = "") -> str:
    """A number for a table; None and nan read '-'."""
    return "-" if value is None or math.isnan(value) else f"{value:{spec}}{suffix}"


def _averages_line(with_cola: Sequence[str], no_cola: Sequence[str], tasks: Sequence[str]) -> str:
    first = f"GLUE avg over {', '.join(with_cola)}" if with_cola else "GLUE avg: no GLUE task in this report"
    second = f"without CoLA over {', '.join(no_cola)}" if no_cola else "without CoLA: no task left"
    line = f"{first}; {second}"
    if "wnli" in tasks:
        line += " (WNLI is shown but not averaged, as in BERT and TinyBERT)"
    return line + "."


def _markdown(table: list[dict[str, Any]], tasks: Sequence[str], title: str, reference: str | None,
              with_cola: Sequence[str], no_cola: Sequence[str]) -> str:
    averages = [c for c, covered in zip(AVERAGE_COLUMNS, (with_cola, no_cola)) if covered]
    header = ["Model", "Params (M)", "Latency (ms)", "Speedup"] + [TASK_LABELS[t] for t in tasks]
    header += [{"glue_avg": "GLUE avg", "glue_avg_no_cola": "GLUE avg (no CoLA)"}[c] for c in averages]
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table:
        name = row["model"] + (REFERENCE_MARK if reference is not None and row["model"] == str(reference) else "")
        cells = [name.replace("|", "\\|"), f"{row['params'] / 1e6:.1f}", fmt_number(row["latency_ms"], ".1f"),
                 fmt_number(row["speedup"], ".2f", "x")]
        cells += [fmt_number(row.get(t, math.nan), ".1f") for t in [*tasks, *averages]]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", _averages_line(with_cola, no_cola, tasks)]
    if reference is not None:
        lines.append(f"Reference: {reference} (marked{REFERENCE_MARK}); speedup = reference latency / model latency.")
    lines.append("Scores in percent; '-' marks a score not measured.")
    return "\n".join(lines) + "\n"


def _plot_axis(tasks: Sequence[str], with_cola: Sequence[str]) -> tuple[str, str]:
    """(column, axis label) for y: the one task when there is one, else the GLUE average, else the first task."""
    if len(tasks) == 1:
        return tasks[0], f"{TASK_LABELS[tasks[0]]} score (%)"
    if with_cola:
        return "glue_avg", f"GLUE avg over {len(with_cola)} tasks (%)"
    if tasks:
        return tasks[0], f"{TASK_LABELS[tasks[0]]} score (%)"
    return "glue_avg", "GLUE avg (%)"


def _plot(table: list[dict[str, Any]], tasks: Sequence[str], with_cola: Sequence[str], title: str,
          reference: str | None, path: Path) -> None:
    """Score against speedup, one labelled point per model, written through the Agg canvas.

    A bare ``Figure`` with ``FigureCanvasAgg`` draws off-screen without touching
    pyplot's global backend, so a caller's interactive session is left alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    column, ylabel = _plot_axis(tasks, with_cola)
    fig = Figure(figsize=(7, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    plotted = 0
    for row in table:
        x, y = row["speedup"], row.get(column, math.nan)
        if math.isnan(x) or math.isnan(y):
            continue
        is_ref = reference is not None and row["model"] == str(reference)
        ax.scatter([x], [y], marker="*" if is_ref else "o", s=160 if is_ref else 40,
                   color="tab:red" if is_ref else "tab:blue", zorder=3)
        label = Path(row["model"]).name or row["model"]  # a folder's last part: full paths crowd the plot
        ax.annotate(label + (REFERENCE_MARK if is_ref else ""), (x, y), textcoords="offset points",
                    xytext=(5, 5), fontsize=8)
        plotted += 1
    ax.margins(x=0.2, y=0.1)  # room for the labels right of the outermost points
    if reference is not None:
        ax.axvline(1.0, color="tab:red", linestyle=":", linewidth=1)
    if plotted == 0:
        ax.text(0.5, 0.5, "no model has both a speedup and a score", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlabel("speedup over reference (x)" if reference is not None else "speedup (x)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")


def family_report(rows: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike, title: str,
                  reference: str | None = None) -> dict[str, Path]:
    """Write ``report.parquet``, ``report.md`` and ``score_vs_speedup.png`` for a model family.

    Each row is one model: ``model``, ``params``, ``latency_ms``, ``speedup`` and
    one key per task with its primary score in percent (task names as
    ``canonical_task`` reads them: ``sst2``, ``SST-2``, ``MNLI-m`` ...). The keys
    ``compare_latency`` adds are accepted and dropped, so its rows can be merged
    with scores directly. A missing score is nan / '-'; a missing speedup is
    derived from ``reference``'s latency. Returns ``{"parquet", "markdown", "plot"}``
    -> path.
    """
    try:
        import matplotlib  # noqa: F401  (checked first: no partial report without the plot)
    except ImportError:
        raise ConfigError("family_report needs matplotlib for the plot: pip install raynas[report]") from None
    if not rows:
        raise ConfigError("family_report: no models given")
    table, tasks = _normalise(rows, reference)
    _fill_speedup(table, reference)
    with_cola, no_cola = averaged_tasks(tasks)
    for row in table:
        row["glue_avg"] = _average(row, with_cola)
        row["glue_avg_no_cola"] = _average(row, no_cola)
    schema = report_schema(tasks)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arrow_rows = [{name: row.get(name, math.nan) for name in schema.names} for row in table]
    paths = {"parquet": write_parquet(to_table(arrow_rows, schema), out / "report.parquet"),
             "markdown": out / "report.md", "plot": out / PNG_NAME}
    with atomic_file(paths["markdown"]) as tmp:
        tmp.write_text(_markdown(table, tasks, title, reference, with_cola, no_cola), encoding="utf-8")
    _plot(table, tasks, with_cola, title, reference, paths["plot"])
    return paths


def load_report(path: str | os.PathLike) -> pd.DataFrame:
    """A written report as a DataFrame: pass ``report.parquet`` or the folder holding it."""
    p = Path(path)
    if p.is_dir():
        p = p / "report.parquet"
    if not p.is_file():
        raise ConfigError(f"{p}: no such file")
    try:
        return pd.read_parquet(p)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ConfigError(f"{p}: not a readable Parquet file ({exc})") from None
