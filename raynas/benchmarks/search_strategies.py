"""Evolution against random search at the same number of evaluations, over several seeds.

AutoTinyBERT's claim for its evolutionary search is that it finds better archs
than random sampling for the same evaluation budget. This benchmark checks that
claim on the user's own supernet and predictor: every (strategy, seed) run is a
full :func:`raynas.orchestration.search_tune.run_search` with the same budgets,
generations and population (random search draws the same number of feasible
archs), scored on the *same* validation batches, each in its own folder (so a
rerun resumes rather than repeats). Per budget it reports the best feasible
proxy loss each run found and, per run, the hypervolume of its (predicted
latency, loss) front against one reference point shared by all runs (the
largest budget's latency, the worst loss any run saw), so fronts compare.
Ray only through ``run_search``.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from pathlib import Path
from typing import Any, Callable, Sequence

from raynas.search.config import SearchConfig
from raynas.search.constraints import Constraint
from raynas.search.pareto import best_within, front_hypervolume

Row = dict[str, Any]


def compare_strategies(supernet_dir: str, constraint: Constraint, base: SearchConfig, out: Path,
                       batches: Sequence[Any], strategies: Sequence[str] = ("evolution", "random"),
                       seeds: Sequence[int] = (0, 1, 2), progress: Callable[[str], None] | None = None,
                       ) -> tuple[list[Row], list[Row]]:
    """``(per-budget rows, per-run rows)``: best feasible loss per (strategy, seed, budget); hypervolume per run."""
    from raynas.orchestration.search_tune import run_search

    say = progress or (lambda _: None)
    runs: dict[tuple[str, int], Any] = {}
    for seed in seeds:
        for strategy in strategies:  # seed-major: a slow period of a shared machine hits both strategies alike
            cfg = dataclasses.replace(base, strategy=strategy, seed=seed)
            say(f"bench search: {strategy}, seed {seed}")
            runs[strategy, seed] = run_search(cfg, supernet_dir, constraint, out / f"{strategy}-seed{seed}",
                                              batches=batches, progress=say)
    budgets = next(iter(runs.values())).budgets
    worst = max(r["proxy_loss"] for run in runs.values() for r in run.evaluated)
    reference = (max(b.value for b in budgets), worst)
    per_budget: list[Row] = []
    per_run: list[Row] = []
    for (strategy, seed), run in runs.items():
        for b in budgets:
            best = best_within(run.evaluated, b)
            per_budget.append({"strategy": strategy, "seed": seed, "budget": b.label, "budget_value": b.value,
                               "best_loss": None if best is None else float(best["proxy_loss"]),
                               "best_arch": None if best is None else str(best["arch"]),
                               "evaluations": len(run.evaluated)})
        feasible = [r for r in run.evaluated if r[_cost_column(constraint)] is not None]
        per_run.append({"strategy": strategy, "seed": seed, "evaluations": len(run.evaluated),
                        "hypervolume": front_hypervolume(feasible, budgets[0].unit, reference),
                        "eval_s_per_arch": run.timing.get("eval_s_per_arch", math.nan),
                        "tune_overhead_s_per_trial": run.timing.get("tune_overhead_s_per_trial", math.nan),
                        "wall_s": run.timing.get("wall_s", math.nan)})
    return per_budget, per_run


def _cost_column(constraint: Constraint) -> str:
    from raynas.search.constraints import COST_COLUMN

    return COST_COLUMN[constraint.unit]


def summarize(per_budget: Sequence[Row], per_run: Sequence[Row]) -> list[Row]:
    """Per strategy and budget (and ``budget = "hypervolume"``): mean and std over seeds, and wins over seeds."""
    out: list[Row] = []
    strategies = sorted({r["strategy"] for r in per_run})
    budgets = list(dict.fromkeys(r["budget"] for r in per_budget))
    for budget in budgets:
        values = {s: [r["best_loss"] for r in per_budget if r["strategy"] == s and r["budget"] == budget] for s in strategies}
        for s in strategies:
            out.append(_stats(s, budget, values[s], lower_is_better=True, rivals=values, per_seed=True))
    hv = {s: [r["hypervolume"] for r in per_run if r["strategy"] == s] for s in strategies}
    for s in strategies:
        out.append(_stats(s, "hypervolume", hv[s], lower_is_better=False, rivals=hv, per_seed=True))
    return out


def _stats(strategy: str, budget: str, values: list[Any], lower_is_better: bool, rivals: dict[str, list[Any]],
           per_seed: bool) -> Row:
    """Mean/std of one strategy's values and in how many seeds it beat every other strategy (ties: no win)."""
    vals = [v for v in values if v is not None]
    wins = 0
    for i, v in enumerate(values):
        others = [rv[i] for s, rv in rivals.items() if s != strategy]
        if v is None or any(o is None for o in others):
            continue
        if all((v < o) if lower_is_better else (v > o) for o in others):
            wins += 1
    return {"strategy": strategy, "budget": budget, "mean": statistics.fmean(vals) if vals else math.nan,
            "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "seeds": len(values), "wins": wins,
            "better": "lower" if lower_is_better else "higher"}
