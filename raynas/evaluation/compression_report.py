"""The compression table: bytes on disk, CPU latency and dev score of every variant beside fp32 and the teacher.

One row per model (the fp32 model, the teacher, extra models such as an L0-pruned
one, every compressed variant), written as Parquet, Markdown, and one figure with
two panels -- score against bytes on disk, score against measured latency -- so
the two things further compression trades (size for storage and download, latency
for serving) are read side by side and not conflated: k-means makes a model small
but not fast on a CPU; int8 kernels make it fast; structured pruning does both.
Pure pandas / matplotlib; no Ray, no torch.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa

from raynas.atomic_io import atomic_file
from raynas.evaluation.report import fmt_number, score_scale
from raynas.tables import to_table, write_parquet

SCHEMA = pa.schema([
    ("name", pa.string()), ("kind", pa.string()), ("method", pa.string()), ("source", pa.string()),
    ("bits", pa.string()), ("runtime", pa.string()), ("bytes_on_disk", pa.int64()), ("size_ratio", pa.float64()),
    ("payload_bits", pa.int64()), ("sparsity", pa.float64()), ("latency_ms", pa.float64()),
    ("speedup", pa.float64()), ("bsr_latency_ms", pa.float64()), ("bsr_speedup", pa.float64()),
    ("score", pa.float64()), ("delta_score", pa.float64()), ("score_in_job", pa.float64()), ("reload_agreement", pa.float64()), ("reload_max_diff", pa.float64()),
    ("max_abs_diff", pa.float64()), ("path", pa.string()), ("train_time_s", pa.float64()), ("status", pa.string()),
    ("error", pa.string()),
])
PIPELINE_SCHEMA = pa.schema([("stage", pa.string()), ("params", pa.int64()), ("pareto", pa.bool_()),
                             *(f for f in SCHEMA)])
BACKEND_SCHEMA = pa.schema([
    ("backend", pa.string()), ("latency_ms", pa.float64()), ("latency_p90_ms", pa.float64()),
    ("speedup", pa.float64()), ("score", pa.float64()), ("delta_score", pa.float64()), ("bytes", pa.int64()),
    ("threads", pa.int64()),
])


def compression_markdown(rows: Sequence[dict[str, Any]], backends: Sequence[dict[str, Any]], title: str,
                         task: str, reference: str) -> str:
    """The variants table and, when measured, the int8 backend comparison."""
    s = score_scale(task)
    lines = [f"# {title}", "", "| model | method | bits | runtime | bytes on disk | vs fp32 | sparsity | latency (ms) | "
             "speedup | score | vs fp32 | reload agrees |", "|" + "---|" * 12]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['name']} | {r.get('method') or '-'} | failed: {r.get('error')} |" + " |" * 9)
            continue
        size = r.get("size_ratio")
        lines.append(
            f"| {r['name']} | {r.get('method') or r['kind']} | {r.get('bits') or 'fp32'} | {r.get('runtime') or '-'} | "
            f"{fmt_number(_mb(r.get('bytes_on_disk')), '.2f', ' MB')} | "
            f"{'-' if size is None else f'1/{1 / size:.1f}' if size < 1 else f'{size:.2f}x'} | "
            f"{fmt_number(None if r.get('sparsity') is None else 100 * r['sparsity'], '.0f', '%')} | "
            f"{fmt_number(r.get('latency_ms'), '.1f')} | {fmt_number(r.get('speedup'), '.2f', 'x')}"
            f"{_bsr(r)} | "
            f"{fmt_number(_times(s, r.get('score')), '.2f')} | {fmt_number(_times(s, r.get('delta_score')), '+.2f')} | "
            f"{fmt_number(r.get('reload_agreement'), '.4f')} |")
    lines += ["", f"bytes on disk: the folder's model.safetensors (packed codes, scales / codebooks, masks, and the fp32 "
              f"rest: biases, LayerNorms, task head). Latency: base encoder on the variant's runtime, batch 1 x 128, "
              f"every model timed interleaved in one process; speedup against {reference}. score: dev metric of the "
              "folder reloaded with from_pretrained in the measuring process; reload agrees: share of dev "
              "predictions equal to those of the model in memory before saving."]
    if backends:
        lines += ["", "## int8 backends on this CPU (the fp32 model, quantized by each)", "",
                  "| backend | latency (ms) | p90 (ms) | speedup | score | vs fp32 | file bytes |", "|" + "---|" * 7]
        for b in backends:
            lines.append(f"| {b['backend']} | {b['latency_ms']:.1f} | {b['latency_p90_ms']:.1f} | "
                         f"{b['speedup']:.2f}x | {fmt_number(_times(s, b.get('score')), '.2f')} | "
                         f"{fmt_number(_times(s, b.get('delta_score')), '+.2f')} | "
                         f"{fmt_number(_mb(b.get('bytes')), '.2f', ' MB')} |")
    return "\n".join(lines) + "\n"


def pareto_markdown(rows: Sequence[dict[str, Any]], title: str, task: str, reference: str) -> str:
    """One family across stages: every model with its size, latency and score; * marks the Pareto front."""
    s = score_scale(task)
    lines = [f"# {title}", "", "| | model | stage | bits | runtime | params | bytes on disk | vs reference | latency (ms) | "
             "speedup | score | vs reference |", "|" + "---|" * 12]
    for r in rows:
        size = r.get("size_ratio")
        lines.append(
            f"| {'*' if r.get('pareto') else ''} | {r['name']} | {r['stage']} | {r.get('bits') or 'fp32'} | "
            f"{r['runtime']} | {r['params']:,} | {fmt_number(_mb(r.get('bytes_on_disk')), '.2f', ' MB')} | "
            f"{'-' if size is None else f'{size:.3f}'} | {fmt_number(r.get('latency_ms'), '.1f')} | "
            f"{fmt_number(r.get('speedup'), '.2f', 'x')} | {fmt_number(_times(s, r.get('score')), '.2f')} | "
            f"{fmt_number(_times(s, r.get('delta_score')), '+.2f')} |")
    lines += ["", f"*: on the Pareto front (no other model is at least as small, as fast and as accurate, and better "
              f"in one). Reference: {reference}. Latency: base encoder on the model's runtime, batch 1 x 128, all "
              "models timed interleaved in one process. params: the loaded (dequantized) model's parameter count."]
    return "\n".join(lines) + "\n"


def _bsr(row: dict[str, Any]) -> str:
    """A block-pruned variant's speedup with BSR sparse kernels, beside its dense one."""
    return "" if row.get("bsr_speedup") is None else f" (BSR kernels: {row['bsr_speedup']:.2f}x)"


def _mb(value: Any) -> float | None:
    return None if value is None else value / 1e6


def _times(scale: float, value: Any) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else scale * value


def plot_size_latency(rows: Sequence[dict[str, Any]], path: str | os.PathLike, title: str, task: str) -> Path | None:
    """Score vs bytes on disk and score vs latency, one point per model, labelled (None without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    s = score_scale(task)
    ok = [r for r in rows if r.get("status") == "ok" and r.get("score") is not None]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, key, label in ((axes[0], "bytes_on_disk", "bytes on disk (MB, log)"),
                           (axes[1], "latency_ms", "CPU latency, batch 1 x 128 (ms)")):
        pts = [r for r in ok if r.get(key) is not None]
        for r in pts:
            x = r[key] / 1e6 if key == "bytes_on_disk" else r[key]
            marker = {"reference": "s", "teacher": "D", "extra": "^"}.get(r["kind"], "o")
            ax.scatter(x, s * r["score"], marker=marker, s=36)
            ax.annotate(r["name"], (x, s * r["score"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if key == "bytes_on_disk":
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(f"{task} dev score")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


def write_compression_report(rows: Sequence[dict[str, Any]], backends: Sequence[dict[str, Any]],
                             out: str | os.PathLike, title: str, task: str, reference: str) -> dict[str, str]:
    """``compression.parquet``, ``int8_backends.parquet`` (when measured), ``compression.md``, ``compression.png``."""
    out = Path(out)
    files = {"parquet": str(write_parquet(to_table(rows, SCHEMA), out / "compression.parquet"))}
    if backends:
        files["backends"] = str(write_parquet(to_table(backends, BACKEND_SCHEMA), out / "int8_backends.parquet"))
    text = compression_markdown(rows, backends, title, task, reference)
    with atomic_file(out / "compression.md") as tmp:
        tmp.write_text(text, encoding="utf-8")
    files["markdown"] = str(out / "compression.md")
    plot = plot_size_latency(rows, out / "compression.png", title, task)
    if plot is not None:
        files["plot"] = str(plot)
    files["text"] = text
    return files
