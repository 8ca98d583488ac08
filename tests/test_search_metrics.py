"""MAPE, RMSE, Kendall tau and pairwise accuracy against hand-computed values (and scipy's tau-b)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from raynas.search.metrics import kendall_tau, mape, pairwise_accuracy, rmse


def test_error_measures_by_hand() -> None:
    assert mape([11.0, 9.0], [10.0, 10.0]) == pytest.approx(10.0)
    assert rmse([1.0, 2.0], [1.0, 4.0]) == pytest.approx(math.sqrt(2.0))
    with pytest.raises(ValueError):
        mape([1.0], [0.0])
    with pytest.raises(ValueError):
        rmse([1.0, 2.0], [1.0])


def test_rank_measures_by_hand() -> None:
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # one swapped pair out of three: (2 - 1) / 3
    assert kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    assert pairwise_accuracy([1, 2, 3], [1, 3, 2]) == pytest.approx(2 / 3)
    assert pairwise_accuracy([1, 1, 3], [1, 2, 3]) == pytest.approx((0.5 + 1 + 1) / 3)  # a predicted tie counts half
    assert math.isnan(kendall_tau([1, 1, 1], [1, 2, 3]))


def test_tau_b_matches_scipy_with_ties() -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, 40).astype(float)
    b = a + rng.normal(0, 2, 40).round()
    assert kendall_tau(a, b) == pytest.approx(stats.kendalltau(a, b).statistic, abs=1e-12)
