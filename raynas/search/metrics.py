"""Error and rank-agreement measures shared by the latency predictor, search and ranking benchmarks.

A predictor or a proxy is judged two ways: how far its numbers are from the
truth (MAPE, RMSE) and whether it *orders* candidates as the truth does
(Kendall's tau, pairwise ranking accuracy as AutoTinyBERT's Appendix E reports
it). Search only needs the order to be right, so the rank measures matter most;
one implementation here keeps every report computing them the same way.
Pure python/numpy: no torch, no Ray.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _pair(pred: Sequence[float], true: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    p, t = np.asarray(pred, dtype=float), np.asarray(true, dtype=float)
    if p.shape != t.shape or p.ndim != 1:
        raise ValueError(f"expected two 1-d sequences of equal length, got shapes {p.shape} and {t.shape}")
    if len(p) == 0:
        raise ValueError("expected at least one value")
    return p, t


def mape(pred: Sequence[float], true: Sequence[float]) -> float:
    """Mean absolute percentage error of ``pred`` against ``true`` (in percent; ``true`` must be non-zero)."""
    p, t = _pair(pred, true)
    if np.any(t == 0):
        raise ValueError("mape: a true value is zero")
    return float(np.mean(np.abs(p - t) / np.abs(t)) * 100.0)


def rmse(pred: Sequence[float], true: Sequence[float]) -> float:
    """Root mean squared error, in the unit of the values."""
    p, t = _pair(pred, true)
    return float(np.sqrt(np.mean((p - t) ** 2)))


def _pair_signs(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Signs of every pairwise difference (i < j) of both sequences."""
    i, j = np.triu_indices(len(pred), k=1)
    return np.sign(pred[i] - pred[j]), np.sign(true[i] - true[j])


def kendall_tau(pred: Sequence[float], true: Sequence[float]) -> float:
    """Kendall's tau-b (ties in either sequence handled as scipy does); 1: same order, -1: reversed.

    Returns nan when either sequence is constant (no order to agree on).
    """
    p, t = _pair(pred, true)
    if len(p) < 2:
        return float("nan")
    sp, st = _pair_signs(p, t)
    concordant_minus_discordant = float(np.sum(sp * st))
    n_p, n_t = float(np.sum(sp != 0)), float(np.sum(st != 0))
    if n_p == 0 or n_t == 0:
        return float("nan")
    return concordant_minus_discordant / np.sqrt(n_p * n_t)


def pairwise_accuracy(pred: Sequence[float], true: Sequence[float]) -> float:
    """Share of pairs (with distinct true values) that ``pred`` orders as ``true`` does; a tie in ``pred`` counts half.

    AutoTinyBERT Appendix E's "pairwise ranking accuracy" between one-shot and
    stand-alone sub-models (96.7 % there).
    """
    p, t = _pair(pred, true)
    if len(p) < 2:
        return float("nan")
    sp, st = _pair_signs(p, t)
    keep = st != 0
    if not np.any(keep):
        return float("nan")
    agree = np.where(sp[keep] == 0, 0.5, (sp[keep] == st[keep]).astype(float))
    return float(np.mean(agree))
