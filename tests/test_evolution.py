"""Search logic without a cluster: constraints and budgets, Algorithm 2's ask/tell search, Pareto fronts, the store."""

from __future__ import annotations

import json
import random
from collections import Counter

import pandas as pd
import pytest
from conftest import tiny_space

from raynas.config_loading import load_config
from raynas.errors import ConfigError
from raynas.search.config import SearchConfig
from raynas.search.constraints import Budget, Constraint
from raynas.search.evolution import EvolutionSearch, fast_rule_archs, roulette, roulette_weights
from raynas.search.pareto import answer_budget, best_per_budget, hypervolume_2d, non_dominated_sort, pareto_front
from raynas.search.results import EVALUATED_SCHEMA, ResultStore, chosen_rows, loss_terms_json
from raynas.spaces import load_space


class FlopsClock:
    """A stand-in latency predictor: milliseconds proportional to FLOPs (the searcher is under test, not this)."""

    def __init__(self, space, ms_per_gflop: float = 2.0, reference_ms: float | None = None) -> None:
        self.space, self.scale, self.space_name = space, ms_per_gflop / 1e9, space.name
        self.reference_ms = reference_ms if reference_ms is not None else space.flops(space.largest()) * self.scale
        self.calls = 0

    def predict(self, archs):
        self.calls += 1
        return [self.space.flops(a) * self.scale for a in archs]


def proxy_loss(space, arch) -> float:
    """A deterministic fitness landscape: bigger archs fit better, with a bumpy arch-dependent term."""
    a = space.parse(arch)
    bump = random.Random(str(a)).random()
    return 10.0 / (1.0 + space.params(a) / 1e4) + 0.3 * bump


def drive(search: EvolutionSearch, chunk: int = 7, stop_after: int | None = None) -> list[tuple[str, str, int]]:
    """Run a search to completion (or ``stop_after`` tells), as an evaluator would; ``(arch, budget, generation)``."""
    told: list[tuple[str, str, int]] = []
    while not search.done:
        picked = search.ask(chunk)
        assert picked, "a search that is not done and has nothing pending must have candidates"
        for arch, budget in picked:
            if stop_after is not None and len(told) >= stop_after:
                return told
            told.append((arch, budget, search.generation))
            search.tell(arch, proxy_loss(search.space, arch))
    return told


def rows_of(search: EvolutionSearch, constraint: Constraint | None = None) -> list[dict]:
    """The search's evaluations as stored rows (with costs when a constraint is given)."""
    rows = [{"arch": a, "generation": r["generation"], "proxy_loss": r["loss"], "budget": r["budget"]}
            for a, r in search.archive.items()]
    if constraint is not None:
        for row, costs in zip(rows, constraint.describe([r["arch"] for r in rows]), strict=True):
            row.update(costs)
    return rows


@pytest.fixture
def space():
    return tiny_space("mlm")


# ---------------------------------------------------------------- constraints


def test_budgets_parse_in_every_unit_and_refuse_bad_strings(space):
    clock = FlopsClock(space, reference_ms=40.0)
    lat = Constraint(space, "latency", clock)
    assert lat.parse_budget("4x") == Budget("4x", 10.0, "ms", 4.0)
    assert lat.parse_budget("12ms").value == 12.0 and lat.parse_budget("2.5 ms").value == 2.5
    assert lat.parse_budget(7).value == 7.0
    params = Constraint(space, "params")
    assert params.parse_budget("20K").value == 20_000 and params.parse_budget("1.5M").value == 1_500_000
    assert params.parse_budget("2x").value == space.params(space.largest()) / 2
    assert Constraint(space, "flops").parse_budget("1.5G").value == 1.5e9
    for bad, where in (("fast", lat), ("-3x", lat), ("0", lat), ("20M", lat), ("12ms", params), ("4y", params)):
        with pytest.raises(ConfigError, match="budget"):
            where.parse_budget(bad)
    with pytest.raises(ConfigError, match="reference"):
        Constraint(space, "latency", FlopsClock(space, reference_ms=0.0)).parse_budget("4x")
    with pytest.raises(ConfigError, match="predictor"):
        Constraint(space, "latency")
    with pytest.raises(ConfigError, match="unknown kind"):
        Constraint(space, "energy")


def test_a_budget_faster_than_the_smallest_arch_is_refused_with_both_numbers(space):
    clock = FlopsClock(space)
    lat = Constraint(space, "latency", clock)
    floor = lat.cost(space.smallest())
    ratio = clock.reference_ms / floor
    assert [b.label for b in lat.budgets(["2x", f"{ratio * 0.99:.2f}x"])] == ["2x", f"{ratio * 0.99:.2f}x"]
    with pytest.raises(ConfigError, match=r"budget 100x: faster than the smallest arch of the space \(1-32-16-1-16: "
                                          r"predicted .* ms > .* ms\)"):
        lat.budgets(["2x", "100x"])
    with pytest.raises(ConfigError, match="below the smallest arch"):
        Constraint(space, "params").budgets(["5K"])
    with pytest.raises(ConfigError, match="twice"):
        lat.budgets(["2x", "2x"])


def test_costs_are_cached_and_a_predictor_of_another_space_is_refused(space):
    clock = FlopsClock(space)
    lat = Constraint(space, "latency", clock)
    archs = [space.sample(random.Random(i)) for i in range(5)]
    first = lat.costs(archs)
    assert lat.costs(archs) == first and clock.calls == 1
    assert lat.describe(archs[:1])[0]["predicted_latency_ms"] == first[0]
    other = FlopsClock(space)
    other.space_name = "nas-bert"
    with pytest.raises(ConfigError, match="fitted on space 'nas-bert'"):
        Constraint(space, "latency", other)


# ---------------------------------------------------------------- Algorithm 2


def test_roulette_prefers_fitter_parents_and_is_uniform_on_ties():
    weights = roulette_weights([1.0, 2.0, 3.0])
    assert weights[0] == 1.0 and weights[0] > weights[1] > weights[2] > 0
    rng = random.Random(0)
    counts = Counter(roulette(weights, rng) for _ in range(6000))
    assert counts[0] > counts[1] > counts[2] > 0
    assert counts[0] / 6000 == pytest.approx(weights[0] / sum(weights), abs=0.03)
    same = Counter(roulette(roulette_weights([0.5] * 4), rng) for _ in range(4000))
    assert all(abs(n / 4000 - 0.25) < 0.04 for n in same.values())
    assert roulette_weights([1.0, float("nan")])[1] == 0.0


def test_every_candidate_fits_its_budget_and_no_arch_is_evaluated_twice(space):
    constraint = Constraint(space, "latency", FlopsClock(space))
    budgets = constraint.budgets(["1.5x", "3x", "6x"])
    search = EvolutionSearch(space, constraint.costs, budgets, generations=3, population=12, seed=1)
    told = drive(search)
    limit = {b.label: b.value for b in budgets}
    assert all(constraint.cost(a) <= limit[b] for a, b, _ in told)
    assert len({a for a, _, _ in told}) == len(told) == search.planned == 3 * 12 * 3
    assert Counter(g for _, _, g in told) == {1: 36, 2: 36, 3: 36}
    assert search.done and search.ask(5) == []
    with pytest.raises(ValueError, match="already evaluated"):
        search.tell(told[0][0], 1.0)
    # evaluations are shared: the best arch for a loose budget may come from a tighter budget's population
    best = {b.label: row for b, row in best_per_budget(rows_of(search, constraint), budgets)}
    assert all(constraint.cost(best[b.label]["arch"]) <= b.value for b in budgets)
    origins = Counter(r["origin"] for r in search.archive.values())
    assert origins["mutation"] > 0 and origins["exploration"] > 0 and origins["initial"] == 36


def test_mutation_and_exploration_each_happen_about_half_the_time():
    space = load_space("autotinybert-mlm")
    constraint = Constraint(space, "params")
    search = EvolutionSearch(space, constraint.costs, constraint.budgets(["1.2x"]), generations=3, population=300,
                             seed=3)
    drive(search, chunk=100)
    draws = search.stats["draws"]
    assert draws >= 600
    assert search.stats["mutations"] / draws == pytest.approx(0.5, abs=0.05)
    assert search.stats["explorations"] / draws == pytest.approx(0.5, abs=0.05)


def test_random_search_samples_the_same_count_of_feasible_archs(space):
    constraint = Constraint(space, "params")
    budgets = constraint.budgets(["2x", "4x"])
    search = EvolutionSearch(space, constraint.costs, budgets, strategy="random", generations=2, population=8, seed=0)
    told = drive(search)
    assert len(told) == 2 * 8 * 2 and {search.archive[a]["origin"] for a, _, _ in told} == {"random"}
    limit = {b.label: b.value for b in budgets}
    assert all(constraint.cost(a) <= limit[b] for a, b, _ in told)


def test_a_tight_budget_fills_its_population_from_feasible_mutations(space):
    constraint = Constraint(space, "params")
    floor = constraint.cost(space.smallest())
    tight = Budget("tight", floor * 1.5, "params")  # 64 of 3132 archs fit
    search = EvolutionSearch(space, constraint.costs, [tight], generations=2, population=6, seed=0, max_attempts=8)
    told = drive(search)
    assert len(told) == 12 and all(constraint.cost(a) <= tight.value for a, _, _ in told)
    assert search.stats["accepted_fallback"] > 0


def test_fast_rule_one_candidate_per_layer_count_and_budget():
    space = load_space("autotinybert-mlm")
    constraint = Constraint(space, "latency", FlopsClock(space))
    budgets = constraint.budgets(["4x", "8x"])
    search = EvolutionSearch(space, constraint.costs, budgets, strategy="fast", seed=0)
    told = drive(search)
    assert search.done and search.generation == 1 and len(told) == search.planned
    per = Counter((b, space.parse(a).layers) for a, b, _ in told)
    assert max(per.values()) == 1 and len(told) <= len(space.dims["layers"].values) * len(budgets)
    limit = {b.label: b.value for b in budgets}
    step = space.dims["hidden"].values[1] - space.dims["hidden"].values[0]
    for arch, label, _ in told:
        a = space.parse(arch)
        assert 1.6 * a.hidden <= a.ffn <= 1.9 * a.hidden and 0.7 * a.hidden <= a.qkv <= a.hidden
        assert constraint.cost(a) <= limit[label]
        wider = fast_rule_archs(space, a.layers, a.hidden + step) if a.hidden < space.dims["hidden"].max else []
        assert all(constraint.cost(w) > limit[label] for w in wider), "a wider rule-abiding arch fits"
    with pytest.raises(ConfigError, match="homogeneous"):
        nas = tiny_space("layerwise")
        EvolutionSearch(nas, Constraint(nas, "params").costs, [Budget("b", 1e12, "params")], strategy="fast")


def test_replay_of_stored_rows_rebuilds_the_interrupted_search(space):
    constraint = Constraint(space, "latency", FlopsClock(space))
    budgets = constraint.budgets(["2x", "4x"])

    def fresh(seed: int = 5) -> EvolutionSearch:
        return EvolutionSearch(space, constraint.costs, budgets, generations=3, population=6, seed=seed)

    whole = fresh()
    drive(whole)
    cut = fresh()
    drive(cut, stop_after=17)  # killed mid-generation 2 (12 per generation)
    resumed = fresh()
    assert resumed.replay(rows_of(cut)) == 17
    assert resumed.generation == 2 and len(resumed.archive) == 17
    drive(resumed)
    assert resumed.archive == whole.archive and resumed.history == whole.history
    # the state dict round-trips through JSON and continues identically
    half = fresh()
    drive(half, stop_after=9)
    again = fresh()
    again.load_state_dict(json.loads(json.dumps(half.state_dict())))
    assert again.ask(100) == half.ask(100)
    with pytest.raises(ConfigError, match="different search"):
        fresh(seed=6).replay(rows_of(whole))
    with pytest.raises(ConfigError, match="other settings"):
        fresh(seed=6).load_state_dict(half.state_dict())


def test_a_failed_evaluation_is_retried_once_then_dropped(space):
    constraint = Constraint(space, "params")
    search = EvolutionSearch(space, constraint.costs, constraint.budgets(["2x"]), generations=1, population=3)
    (arch, _), *_ = search.ask(3)
    search.fail([arch])
    assert search.ask(1)[0][0] == arch
    search.fail([arch])
    assert arch in search.dropped and search.stats["failed"] == 1
    for a in search.pending:
        search.tell(a, 1.0)
    assert search.done and arch not in search.archive


# ---------------------------------------------------------------- Pareto fronts and budgets


def test_non_dominated_sorting_and_hypervolume_on_hand_made_points():
    pts = [(1, 5), (2, 3), (3, 4), (4, 1), (2, 3), (5, 5)]
    assert non_dominated_sort(pts) == [[0, 1, 3, 4], [2], [5]]
    assert non_dominated_sort([]) == []
    assert hypervolume_2d([(1, 5), (2, 3), (4, 1)], (6, 6)) == pytest.approx(1 + 6 + 10)
    assert hypervolume_2d(pts, (6, 6)) == pytest.approx(17)  # dominated points add nothing
    assert hypervolume_2d([(7, 1)], (6, 6)) == 0.0


def _row(arch: str, params: int, loss: float) -> dict:
    return {"arch": arch, "params": params, "flops": 10 * params, "predicted_latency_ms": params / 1000,
            "proxy_loss": loss, "generation": 1}


def test_a_new_budget_is_answered_from_stored_rows_when_the_front_covers_it():
    rows = [_row("a", 1000, 5.0), _row("b", 2000, 4.0), _row("c", 2100, 4.5), _row("d", 4000, 3.0),
            _row("e", 8000, 2.0)]
    assert [r["arch"] for r in pareto_front(rows, "params")] == ["a", "b", "d", "e"]
    covered = answer_budget(rows, Budget("4.5K", 4500, "params"))
    assert covered.covered and covered.row["arch"] == "d" and "d at" in covered.reason
    tight = answer_budget(rows, Budget("500", 500, "params"))
    assert not tight.covered and tight.row is None and "tighter than any evaluated arch" in tight.reason
    far = answer_budget(rows, Budget("20K", 20000, "params"))
    assert not far.covered and far.row["arch"] == "e" and "did not" not in far.reason and "may find better" in far.reason
    by_ms = answer_budget(rows, Budget("2.2ms", 2.2, "ms"))
    assert by_ms.covered and by_ms.row["arch"] == "b"


# ---------------------------------------------------------------- results and config


def _stored(space, arch: str, loss: float) -> dict:
    from datetime import datetime, timezone

    now = datetime.now(timezone.utc)
    return {"arch": arch, "space": space.name, "strategy": "evolution", "budget": "2x", "origin": "initial",
            "params": space.params(arch), "flops": space.flops(arch), "predicted_latency_ms": None,
            "measured_latency_ms": None, "proxy_loss": loss, "loss_terms": loss_terms_json({"mlm": loss, "loss": loss}),
            "generation": 1, "trial_id": "t1", "seed": 0, "started_at": now, "finished_at": now}


def test_store_refuses_duplicates_and_round_trips_through_pandas(space, tmp_path):
    path = tmp_path / "evaluated.parquet"
    store = ResultStore(path)
    store.add([_stored(space, "1-32-16-1-16", 4.0), _stored(space, "2-64-128-4-64", 3.0)])
    with pytest.raises(ValueError, match="already stored"):
        store.add([_stored(space, "3-64-128-4-64", 2.5), _stored(space, "1-32-16-1-16", 4.0)])
    df = pd.read_parquet(path)
    assert list(df["arch"]) == ["1-32-16-1-16", "2-64-128-4-64"] and list(df.columns) == EVALUATED_SCHEMA.names
    assert json.loads(df["loss_terms"][0]) == {"mlm": 4.0} and df["predicted_latency_ms"].isna().all()
    again = ResultStore(path)
    assert len(again) == 2 and "2-64-128-4-64" in again and again.rows()[1]["proxy_loss"] == 3.0
    with pytest.raises(ConfigError, match="seed 0"):
        again.check_same_search(seed=1)
    constraint = Constraint(space, "params")
    chosen = chosen_rows(again.rows(), constraint.budgets(["1.1x", "11x"]), constraint)
    assert chosen[0]["arch"] == "2-64-128-4-64" and chosen[0]["cost"] == space.params("2-64-128-4-64")
    assert chosen[1]["arch"] == "1-32-16-1-16" and chosen[1]["predicted_speedup"] is None


def test_search_config_defaults_are_the_papers_and_bad_fields_are_named_together(tmp_path):
    cfg = SearchConfig()
    assert (cfg.generations, cfg.population, cfg.mutation_prob, cfg.exploration_prob) == (4, 25, 0.5, 0.5)
    path = tmp_path / "search.yaml"
    path.write_text("strategy: annealing\npopulation: 0\nbudgets: [2x, 2x]\nobjective: kd\n")
    with pytest.raises(ConfigError) as err:
        load_config(SearchConfig, path, ["mutation_prob=2"])
    for name in ("strategy", "population", "budgets", "teacher", "mutation_prob"):
        assert name in str(err.value)
    with pytest.raises(ConfigError, match="colour: unknown key"):
        load_config(SearchConfig, None, ["colour=red"])
    assert load_config(SearchConfig, None, ["budgets=[3x]", "seed=4"]).budgets == ["3x"]
