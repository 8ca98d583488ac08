"""Pareto fronts of (cost, proxy loss), the best arch per budget, and new budgets answered from stored rows.

One search serves many budgets: every evaluated arch sits at its predicted
cost (latency, params or FLOPs) and its validation loss, both to be minimised.
NSGA-II's non-dominated sorting ranks them in fronts; the first front is the
trade-off curve, and the best arch for a budget is the lowest-loss arch whose
cost fits it -- always a point of the first front. A budget nobody searched for
is answered from the same rows when the search explored near it (see
:func:`answer_budget`), and said plainly when it did not.

Pure python/numpy; rows are mappings (or a pandas DataFrame) with the columns
of :data:`raynas.search.results.EVALUATED_SCHEMA`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from raynas.search.constraints import COST_COLUMN, Budget, human

Row = Mapping[str, Any]


def non_dominated_sort(points: Sequence[tuple[float, float]]) -> list[list[int]]:
    """NSGA-II fronts of 2-D points (both coordinates minimised): lists of indices, best front first.

    ``p`` dominates ``q`` when it is no worse in both and better in one; equal
    points do not dominate each other (they share a front).
    """
    if len(points) == 0:
        return []
    p = np.asarray(points, dtype=float).reshape(-1, 2)
    le = (p[:, None, :] <= p[None, :, :]).all(axis=2)
    lt = (p[:, None, :] < p[None, :, :]).any(axis=2)
    dominates = le & lt  # [i, j]: i dominates j
    count = dominates.sum(axis=0)  # how many points dominate j
    fronts: list[list[int]] = []
    current = [int(j) for j in np.flatnonzero(count == 0)]
    while current:
        fronts.append(current)
        nxt = []
        for i in current:
            for j in np.flatnonzero(dominates[i]):
                count[j] -= 1
                if count[j] == 0:
                    nxt.append(int(j))
        current = sorted(nxt)
    return fronts


def hypervolume_2d(points: Sequence[tuple[float, float]], reference: tuple[float, float]) -> float:
    """Area dominated by ``points`` (minimised) and bounded by ``reference``; points not better in both add nothing."""
    rx, ry = reference
    inside = [(x, y) for x, y in points if x < rx and y < ry]
    if not inside:
        return 0.0
    front = sorted({inside[i] for i in non_dominated_sort(inside)[0]})  # x ascending, hence y descending
    area = 0.0
    for k, (x, y) in enumerate(front):
        nx = front[k + 1][0] if k + 1 < len(front) else rx
        area += (nx - x) * (ry - y)
    return area


def _records(rows: Any) -> list[Row]:
    return rows.to_dict("records") if hasattr(rows, "to_dict") else list(rows)


def _usable(rows: Any, unit: str) -> list[tuple[float, float, Row]]:
    """``(cost, loss, row)`` for rows with a cost in ``unit`` and a finite loss."""
    column = COST_COLUMN[unit]
    out = []
    for r in _records(rows):
        cost, loss = r.get(column), r.get("proxy_loss")
        if cost is None or loss is None or not math.isfinite(float(cost)) or not math.isfinite(float(loss)):
            continue
        out.append((float(cost), float(loss), r))
    return out


def pareto_front(rows: Any, unit: str = "ms") -> list[Row]:
    """The first front of (cost in ``unit``, proxy loss), cheapest first."""
    usable = _usable(rows, unit)
    if not usable:
        return []
    first = non_dominated_sort([(c, loss) for c, loss, _ in usable])[0]
    return [usable[i][2] for i in sorted(first, key=lambda i: (usable[i][0], usable[i][1]))]


def front_hypervolume(rows: Any, unit: str, reference: tuple[float, float]) -> float:
    """Hypervolume of the rows' (cost, loss) points against ``reference`` (e.g. (largest budget, worst loss))."""
    return hypervolume_2d([(c, loss) for c, loss, _ in _usable(rows, unit)], reference)


def best_within(rows: Any, budget: Budget) -> Row | None:
    """The lowest-loss row whose cost fits ``budget`` (ties: the cheaper, then the arch string); None if none fits."""
    fitting = [(loss, c, str(r.get("arch")), r) for c, loss, r in _usable(rows, budget.unit) if c <= budget.value]
    return min(fitting, key=lambda t: t[:3])[3] if fitting else None


def best_per_budget(rows: Any, budgets: Sequence[Budget]) -> list[tuple[Budget, Row | None]]:
    """Each budget with its best fitting row, from every evaluation whichever budget it was generated for."""
    return [(b, best_within(rows, b)) for b in budgets]


@dataclass
class BudgetAnswer:
    """A budget answered from stored rows: the arch (if any fits), whether the rows cover it, and why."""

    budget: Budget
    row: Row | None
    covered: bool
    reason: str


def answer_budget(rows: Any, budget: Budget, slack: float = 0.2) -> BudgetAnswer:
    """The best stored arch for ``budget``, and whether the stored search covers it.

    Covered means some evaluated arch costs between ``(1 - slack) * budget`` and
    the budget: the search explored right below it, so the best arch that fits
    is a real answer rather than an arch chosen for a much tighter budget. Not
    covered: no arch fits (tighter than anything evaluated), or the nearest
    evaluated arch below is far under the budget (the search never looked near
    it; the best fitting arch is returned with that caveat). Either way the
    reason says what to do: search with this budget.
    """
    usable = _usable(rows, budget.unit)
    want = human(budget.value, budget.unit)
    if not usable:
        return BudgetAnswer(budget, None, False, f"budget {budget.label} ({want}): no stored arch has a cost in "
                                                  f"{budget.unit}")
    row = best_within(rows, budget)
    if row is None:
        cheapest = min(usable, key=lambda t: t[0])
        return BudgetAnswer(budget, None, False,
                            f"budget {budget.label} ({want}) is tighter than any evaluated arch (the cheapest, "
                            f"{cheapest[2].get('arch')}, costs {human(cheapest[0], budget.unit)}): search with it")
    cost = float(row[COST_COLUMN[budget.unit]])
    near = [c for c, _, _ in usable if (1.0 - slack) * budget.value <= c <= budget.value]
    if not near:
        below = max(c for c, _, _ in usable if c <= budget.value)
        return BudgetAnswer(budget, row, False,
                            f"budget {budget.label} ({want}): no evaluated arch costs within {slack:.0%} below it "
                            f"(the nearest costs {human(below, budget.unit)}, {below / budget.value:.0%} of it); "
                            f"best known {row.get('arch')} (loss {float(row['proxy_loss']):.4f}), but a search with "
                            "this budget may find better")
    return BudgetAnswer(budget, row, True,
                        f"budget {budget.label} ({want}): {row.get('arch')} at {human(cost, budget.unit)}, "
                        f"loss {float(row['proxy_loss']):.4f}, from {len(usable)} stored evaluations "
                        f"({len(near)} within {slack:.0%} below the budget)")
