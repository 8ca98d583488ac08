"""Architecture search (pure torch, no Ray): latency data and predictor, evolution, Pareto fronts, reports.

Ray adapters for these live in :mod:`raynas.orchestration` (latency tasks, the
Tune ``Searcher``); import submodules directly, e.g.
``from raynas.search.metrics import kendall_tau``. The latency names below are
also importable from the package; they load on first use, so importing
``raynas.search.metrics`` stays as light as numpy.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "LatencyPredictor": "raynas.search.predictor",
    "LatencyConfig": "raynas.search.latency_data",
    "LATENCY_SCHEMA": "raynas.search.latency_data",
    "build_latency_predictor": "raynas.search.latency_data",
    "measure_archs": "raynas.search.latency_data",
    "sample_archs": "raynas.search.latency_data",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'raynas.search' has no attribute {name!r}")
