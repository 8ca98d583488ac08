"""What a search run shows a person: the Pareto plot (latency vs proxy loss) and a short Markdown report.

The tables are the record (Parquet, see :mod:`raynas.search.results`); this
module only draws and writes prose from them. The plot puts every evaluated
arch at its *predicted* latency, draws the non-dominated front, marks each
chosen model at its predicted latency and, where it was re-measured after
export, at its *measured* latency too (joined by a line), with each budget as a
vertical line: a predictor that is off shows as a long line crossing a budget.
The report says plainly when a model measured over its budget.

matplotlib is optional (the ``demo`` and ``report`` extras install it); without
it the report is still written and says the plot was skipped. Pure python: no
Ray, no torch.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from raynas.atomic_io import atomic_file

Row = Mapping[str, Any]


def pareto_plot(evaluated: Sequence[Row], front: Sequence[Row], models: Sequence[Row], budgets_ms: Mapping[str, float],
                path: str | os.PathLike, title: str = "", reference_ms: float | None = None) -> Path | None:
    """Write the PNG to ``path``; ``None`` (and nothing written) when matplotlib is not installed.

    ``evaluated`` / ``front`` rows need ``predicted_latency_ms`` and ``proxy_loss``;
    ``models`` rows need ``budget``, ``proxy_loss``, ``predicted_latency_ms`` and
    may carry ``measured_latency_ms`` (or ``plot_measured_ms``, where the measured point
    belongs, e.g. a measured speedup put on the predictor's reference scale) and ``meets_budget``.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    xs = [r["predicted_latency_ms"] for r in evaluated]
    ys = [r["proxy_loss"] for r in evaluated]
    ax.scatter(xs, ys, s=10, c="#b0b0b0", label=f"evaluated ({len(xs)})", zorder=1)
    pts = sorted((r["predicted_latency_ms"], r["proxy_loss"]) for r in front)
    if pts:
        ax.step([p[0] for p in pts], [p[1] for p in pts], where="post", c="#1f77b4", lw=1.5, label="Pareto front",
                zorder=2)
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=16, c="#1f77b4", zorder=2)
    for label, ms in budgets_ms.items():
        ax.axvline(ms, c="#999999", ls="--", lw=0.8, zorder=0)
        ax.text(ms, 1.0, f" {label}", transform=ax.get_xaxis_transform(), va="top", fontsize=8, color="#555555")
    marked = False
    for r in models:
        px, y = r["predicted_latency_ms"], r["proxy_loss"]
        ax.scatter([px], [y], marker="*", s=140, c="#d62728", zorder=4, label=None if marked else "chosen (predicted)")
        mx = r.get("plot_measured_ms", r.get("measured_latency_ms"))
        if mx is not None and not (isinstance(mx, float) and math.isnan(mx)):
            bad = r.get("meets_budget") is False
            ax.plot([px, mx], [y, y], c="#d62728", lw=0.8, zorder=3)
            ax.scatter([mx], [y], marker="x" if bad else "o", s=40, c="#d62728", zorder=4,
                       label=None if marked else "chosen (measured after export; x: over budget)")
        marked = True
    if reference_ms:
        ax.axvline(reference_ms, c="#2ca02c", lw=1.0, zorder=0)
        ax.text(reference_ms, 0.02, " reference", transform=ax.get_xaxis_transform(), fontsize=8, color="#2ca02c")
    ax.set_xlabel("latency (ms, predicted; measured where marked)")
    ax.set_ylabel("proxy loss (validation, lower is better)")
    ax.set_title(title or "search: latency vs proxy loss", fontsize=10)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown_table(rows: Sequence[Row], columns: Sequence[str]) -> str:
    """A GitHub Markdown table of ``columns`` (missing values as a dash)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_report(path: str | os.PathLike, title: str, sections: Sequence[tuple[str, str]]) -> Path:
    """``# title`` then ``## heading`` + body per section, written atomically."""
    text = f"# {title}\n\n" + "\n\n".join(f"## {h}\n\n{body.strip()}" for h, body in sections) + "\n"
    with atomic_file(path) as tmp:
        Path(tmp).write_text(text)
    return Path(path)
