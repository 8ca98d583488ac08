"""GLUE metrics in plain numpy, so evaluation workers need neither sklearn nor scipy.

Each function matches its reference (``sklearn.metrics`` for accuracy, F1 and
Matthews correlation; ``scipy.stats`` for Pearson and Spearman) to float
precision, including the degenerate cases, which the tests check on random inputs:

* ``binary_f1`` is 0.0 when there are no true and no predicted positives
  (sklearn's ``zero_division`` default);
* ``matthews_corrcoef`` is 0.0 when predictions or labels are constant (sklearn);
* ``pearson`` / ``spearman`` are ``nan`` when either input is constant, or holds
  a nan or an infinity (scipy); so STS-B's ``combined`` is ``nan`` then too.
  Checkpoint selection must treat ``nan`` as the worst score
  (``max`` over a list holding nan gives arbitrary answers).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from raynas.evaluation.tasks import canonical_task

# canonical task name -> the metrics glue_metrics reports for it
_ACCURACY_TASKS = ("sst2", "mnli", "mnli_m", "mnli_mm", "qnli", "rte", "wnli")
_F1_TASKS = ("mrpc", "qqp")

# The single number GLUE papers report per task. BERT (Devlin et al. 2019, Table 1):
# "F1 scores are reported for QQP and MRPC, Spearman correlations are reported for
# STS-B, and accuracy scores are reported for the other tasks"; CoLA is Matthews
# correlation (the GLUE leaderboard's CoLA metric). TinyBERT and AutoTinyBERT follow
# the same convention. SQuAD papers report EM and F1; F1 is the headline number.
_PRIMARY = {
    "cola": "mcc", "stsb": "spearmanr", "mrpc": "f1", "qqp": "f1",
    **{task: "accuracy" for task in _ACCURACY_TASKS},
    "squad": "f1", "squad_v2": "f1",
}


def _pair(predictions: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Both inputs as 1-D arrays of one length; a mismatch is a caller bug, so ValueError."""
    p, y = np.asarray(predictions).ravel(), np.asarray(labels).ravel()
    if p.shape != y.shape:
        raise ValueError(f"{p.size} predictions but {y.size} labels")
    if p.size == 0:
        raise ValueError("no predictions to score")
    return p, y


def accuracy(predictions: Any, labels: Any) -> float:
    """Fraction of exact matches (``sklearn.metrics.accuracy_score``)."""
    p, y = _pair(predictions, labels)
    return float(np.mean(p == y))


def binary_f1(predictions: Any, labels: Any, pos_label: int = 1) -> float:
    """F1 of the positive class (``f1_score(average="binary")``); 0.0 when it never occurs."""
    p, y = _pair(predictions, labels)
    pred_pos, true_pos = p == pos_label, y == pos_label
    tp = int(np.sum(pred_pos & true_pos))
    denominator = int(np.sum(pred_pos)) + int(np.sum(true_pos))  # 2tp + fp + fn
    return 0.0 if denominator == 0 else 2.0 * tp / denominator


def matthews_corrcoef(predictions: Any, labels: Any) -> float:
    """Matthews correlation, multiclass form (as sklearn); 0.0 when either side is constant."""
    p, y = _pair(predictions, labels)
    classes, codes = np.unique(np.concatenate([y, p]), return_inverse=True)
    n = y.size
    k = classes.size
    confusion = np.zeros((k, k), dtype=np.float64)
    np.add.at(confusion, (codes[:n], codes[n:]), 1.0)
    t_sum, p_sum = confusion.sum(axis=1), confusion.sum(axis=0)
    samples = float(n)
    cov_ytyp = np.trace(confusion) * samples - t_sum @ p_sum
    cov_ypyp = samples**2 - p_sum @ p_sum
    cov_ytyt = samples**2 - t_sum @ t_sum
    if cov_ypyp * cov_ytyt == 0:
        return 0.0
    return float(cov_ytyp / math.sqrt(cov_ytyt * cov_ypyp))


def _float_pair(predictions: Any, labels: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """Float arrays for a correlation, or None where scipy's answer is nan."""
    p, y = _pair(predictions, labels)
    if p.size < 2:
        raise ValueError("a correlation needs at least 2 points")
    p, y = p.astype(np.float64), y.astype(np.float64)
    if not (np.all(np.isfinite(p)) and np.all(np.isfinite(y))):
        return None
    if np.all(p == p[0]) or np.all(y == y[0]):
        return None
    return p, y


def _correlation(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson r the way scipy computes it: centre, scale to unit norm, dot, clip (exact ±1 for 2 points)."""
    xm, ym = x - x.mean(), y - y.mean()
    xm, ym = xm / np.linalg.norm(xm), ym / np.linalg.norm(ym)
    r = float(np.clip(xm @ ym, -1.0, 1.0))
    return float(round(r)) if x.size == 2 else r


def pearson(predictions: Any, labels: Any) -> float:
    """Pearson correlation (``scipy.stats.pearsonr``); nan for constant or non-finite input."""
    pair = _float_pair(predictions, labels)
    return math.nan if pair is None else _correlation(*pair)


def average_ranks(values: Any) -> np.ndarray:
    """1-based ranks with ties given their mean rank (``scipy.stats.rankdata(method="average")``)."""
    x = np.asarray(values).ravel()
    order = np.argsort(x, kind="mergesort")
    inverse = np.empty(x.size, dtype=np.intp)
    inverse[order] = np.arange(x.size)
    ordered = x[order]
    starts = np.concatenate([[True], ordered[1:] != ordered[:-1]])
    dense = np.cumsum(starts)[inverse]  # 1-based id of each value's tie group
    bounds = np.concatenate([np.flatnonzero(starts), [x.size]])
    return 0.5 * (bounds[dense] + bounds[dense - 1] + 1)


def spearman(predictions: Any, labels: Any) -> float:
    """Spearman correlation with average ranks for ties (``scipy.stats.spearmanr``); nan as pearson."""
    pair = _float_pair(predictions, labels)
    if pair is None:
        return math.nan
    return _correlation(average_ranks(pair[0]), average_ranks(pair[1]))


def _class_ids(predictions: Any) -> np.ndarray:
    """Class ids from ids or from logits (argmax over the last axis), as Trainer hands them."""
    p = np.asarray(predictions)
    return p.argmax(axis=-1) if p.ndim == 2 else p


def _scores(predictions: Any) -> np.ndarray:
    """Regression outputs; an (N, 1) array from a one-label head is squeezed."""
    p = np.asarray(predictions, dtype=np.float64)
    return p[:, 0] if p.ndim == 2 and p.shape[1] == 1 else p


def glue_metrics(task: str, predictions: Any, labels: Any) -> dict[str, float]:
    """The standard metric set of a GLUE task.

    ``predictions`` are class ids or logits (N, num_labels) for classification and
    scores for STS-B. CoLA -> ``mcc``; SST-2, MNLI (-m / -mm), QNLI, RTE, WNLI ->
    ``accuracy``; MRPC, QQP -> ``f1``, ``accuracy`` and their mean ``combined``;
    STS-B -> ``pearson``, ``spearmanr`` and their mean ``combined``. Task names are
    as in :func:`raynas.evaluation.tasks.canonical_task` (``SST-2``, ``sst2``,
    ``MNLI-mm`` all work).
    """
    name = canonical_task(task)
    if name == "stsb":
        p = _scores(predictions)
        r, rho = pearson(p, labels), spearman(p, labels)
        return {"pearson": r, "spearmanr": rho, "combined": (r + rho) / 2}
    if name == "cola":
        return {"mcc": matthews_corrcoef(_class_ids(predictions), labels)}
    if name in _F1_TASKS:
        p = _class_ids(predictions)
        f1, acc = binary_f1(p, labels), accuracy(p, labels)
        return {"f1": f1, "accuracy": acc, "combined": (f1 + acc) / 2}
    if name in _ACCURACY_TASKS:
        return {"accuracy": accuracy(_class_ids(predictions), labels)}
    raise ValueError(f"task {task!r} is not a GLUE task (use squad_metrics for SQuAD)")


def primary_metric(task: str) -> str:
    """Name of the one number papers report for ``task``: a key of :func:`glue_metrics`.

    CoLA: ``mcc`` (Matthews). STS-B: ``spearmanr`` -- BERT, TinyBERT and
    AutoTinyBERT report Spearman (the GLUE leaderboard shows Pearson/Spearman, and
    ``glue_metrics`` gives both). MRPC, QQP: ``f1``. SST-2, MNLI-m/-mm, QNLI, RTE,
    WNLI: ``accuracy``. SQuAD v1.1 / v2.0: ``f1`` (a key of the squad_metrics results).
    """
    return _PRIMARY[canonical_task(task)]
