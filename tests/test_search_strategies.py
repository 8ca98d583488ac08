"""bench search's summary: means over seeds, and a win only where a strategy beats every other in that seed."""

from __future__ import annotations

import pytest

from raynas.benchmarks.search_strategies import summarize


def test_summary_counts_wins_per_seed_and_direction() -> None:
    per_budget = [
        {"strategy": "evolution", "seed": 0, "budget": "2x", "best_loss": 1.0},
        {"strategy": "random", "seed": 0, "budget": "2x", "best_loss": 2.0},
        {"strategy": "evolution", "seed": 1, "budget": "2x", "best_loss": 3.0},
        {"strategy": "random", "seed": 1, "budget": "2x", "best_loss": 3.0},  # a tie is no win
    ]
    per_run = [
        {"strategy": "evolution", "seed": 0, "hypervolume": 5.0}, {"strategy": "random", "seed": 0, "hypervolume": 4.0},
        {"strategy": "evolution", "seed": 1, "hypervolume": 1.0}, {"strategy": "random", "seed": 1, "hypervolume": 2.0},
    ]
    rows = {(r["strategy"], r["budget"]): r for r in summarize(per_budget, per_run)}
    assert rows["evolution", "2x"]["mean"] == pytest.approx(2.0) and rows["evolution", "2x"]["wins"] == 1
    assert rows["random", "2x"]["wins"] == 0
    assert rows["evolution", "hypervolume"]["wins"] == 1 and rows["random", "hypervolume"]["wins"] == 1
    assert rows["evolution", "hypervolume"]["better"] == "higher"


def test_a_budget_nothing_fits_is_no_win() -> None:
    per_budget = [{"strategy": "evolution", "seed": 0, "budget": "9x", "best_loss": None},
                  {"strategy": "random", "seed": 0, "budget": "9x", "best_loss": 1.0}]
    per_run = [{"strategy": "evolution", "seed": 0, "hypervolume": 0.0}, {"strategy": "random", "seed": 0, "hypervolume": 0.0}]
    rows = {(r["strategy"], r["budget"]): r for r in summarize(per_budget, per_run)}
    assert rows["evolution", "9x"]["wins"] == 0 and rows["random", "9x"]["wins"] == 0
