"""Bin-wise progressive shrinking and performance approximation on a tiny layer-wise space (pure python, seconds)."""

from __future__ import annotations

import itertools
import json
import math
import random
import time

import numpy as np
import pytest

from raynas.blockwise import approximation
from raynas.blockwise.approximation import Assembled, assemble, rank_agreement
from raynas.blockwise.shrinking import (
    STAGES_SCHEMA,
    BlockShrink,
    ShrinkConfig,
    ShrinkState,
    bin_of,
    initial_pool,
    keep_count,
    path_params,
    stages_to_finish,
)
from raynas.config_loading import FieldErrors, load_config
from raynas.errors import ConfigError
from raynas.search.constraints import Budget, Constraint
from raynas.spaces.layerwise import LayerwiseArch, LayerwiseSpace
from raynas.tables import to_table

HIDDEN = 32
EMB = {"vocab_size": 100, "max_position_embeddings": 64, "type_vocab_size": 2}


def make_space(num_layers: int = 8, **ops) -> LayerwiseSpace:
    ops = ops or {"mha": [8, 16, 32], "ffn": [32, 64], "conv": {"kernels": [3], "inner": [16, 32]}, "identity": True}
    return LayerwiseSpace.from_dict({"name": "tiny-nas-bert", "num_layers": num_layers, "hidden": {"values": [HIDDEN]},
                                     "head_dim": 8, "ops": ops, "embeddings": EMB})


SPACE = make_space()


def synthetic_loss(path, seed: int = 0) -> float:
    """Bigger paths fit the teacher better, plus path-specific noise (fixed per path and seed)."""
    noise = random.Random(f"{seed}:{','.join(path)}").gauss(0.0, 0.05)
    return 1.0 / (1.0 + path_params(SPACE, HIDDEN, path) / 4000.0) + noise


# ---- config ----------------------------------------------------------------------------------
def test_config_errors_name_every_bad_field():
    with pytest.raises(FieldErrors) as err:
        ShrinkConfig(bins=0, keep_fraction=1.0, max_per_bin=0, steps_per_stage=0, warmup_steps=-1)
    for name in ("bins", "keep_fraction", "max_per_bin", "steps_per_stage", "warmup_steps"):
        assert any(p.startswith(f"{name}:") for p in err.value.problems), (name, err.value.problems)
    with pytest.raises(FieldErrors, match="candidates_per_bin: 2 is below max_per_bin 4"):
        ShrinkConfig(candidates_per_bin=2, max_per_bin=4)
    with pytest.raises(ConfigError) as err:  # the same checks through YAML-style overrides
        load_config(ShrinkConfig, None, ["bins=0", "keep_fraction=0", "candidates_per_bin=8"])
    assert "bins:" in str(err.value) and "keep_fraction:" in str(err.value)
    assert load_config(ShrinkConfig, None, ["bins=3"]) == ShrinkConfig(bins=3)


def test_keep_count_always_progresses():
    cfg = ShrinkConfig(keep_fraction=0.9, max_per_bin=2)
    assert [keep_count(n, cfg) for n in (1, 2, 3, 10)] == [1, 2, 2, 9]
    half = ShrinkConfig(keep_fraction=0.5, max_per_bin=2)
    assert [keep_count(n, half) for n in (16, 9, 5, 3)] == [8, 5, 3, 2]
    cfg = ShrinkConfig(keep_fraction=0.3, max_per_bin=2)
    assert keep_count(10, cfg) == 3  # 10 * 0.3 is 3.0000000000000004 in floats: not 4


# ---- initial pool ---------------------------------------------------------------------------
def test_initial_pool_fills_every_bin_with_distinct_paths_deterministically():
    cfg = ShrinkConfig(bins=4, candidates_per_bin=12)
    bins, edges = initial_pool(SPACE, HIDDEN, 4, cfg, seed=3, block=1)
    assert (bins, edges) == initial_pool(SPACE, HIDDEN, 4, cfg, seed=3, block=1)
    assert bins != initial_pool(SPACE, HIDDEN, 4, cfg, seed=3, block=2)[0]
    assert bins != initial_pool(SPACE, HIDDEN, 4, cfg, seed=4, block=1)[0]
    cost = {t: SPACE.op_of(t).params(HIDDEN) for t in SPACE.tokens}
    lo, hi = 4 * min(cost.values()), 4 * max(cost.values())
    assert edges == [lo + (hi - lo) * i // 4 for i in range(4)] + [hi + 1]  # equal-width bins
    assert [len(b) for b in bins] == [12] * 4  # the smallest and the largest bins fill too
    everything = [p for b in bins for p in b]
    assert len(set(everything)) == len(everything)
    assert all(isinstance(p, tuple) and len(p) == 4 and set(p) <= set(SPACE.tokens) for p in everything)
    for i, paths in enumerate(bins):
        assert all(bin_of(edges, path_params(SPACE, HIDDEN, p)) == i for p in paths)
    smallest = min(cost, key=cost.get)
    largest = max(cost, key=cost.get)
    assert bins[0][0] == (smallest,) * 4 and bins[-1][0] == (largest,) * 4


def test_initial_pool_keeps_what_exists_and_merges_empty_bins():
    space = make_space(num_layers=4, ffn=[64], identity=True)  # paths of 2 ops: 0, 1 or 2 FFNs
    f = space.op_of("ffn64").params(HIDDEN)
    bins, edges = initial_pool(space, HIDDEN, 2, ShrinkConfig(bins=4, candidates_per_bin=5), seed=0, block=0)
    # [0, f/2) holds (id, id); [f/2, f) holds nothing and is merged into it; then one FFN; then two
    assert edges == [0, f, 6 * f // 4, 2 * f + 1]
    assert len(bins) == 3 and bins[0] == [("id", "id")] and bins[2] == [("ffn64", "ffn64")]
    assert sorted(bins[1]) == [("ffn64", "id"), ("id", "ffn64")]
    assert BlockShrink.start(space, HIDDEN, 2, ShrinkConfig(bins=4, candidates_per_bin=5), 0, 0).finished


def test_initial_pool_rejects_a_hidden_size_outside_the_space():
    with pytest.raises(ConfigError, match="hidden: 48"):
        initial_pool(SPACE, 48, 4, ShrinkConfig(), seed=0, block=0)


# ---- shrinking stages -------------------------------------------------------------------------
def run_stage(block: BlockShrink, cfg: ShrinkConfig, seed: int = 0) -> list[dict]:
    scores = {p: synthetic_loss(p, seed) for p in block.survivors()}
    return block.apply(scores, lambda p: path_params(SPACE, HIDDEN, p), cfg)


@pytest.mark.parametrize("keep", [0.5, 0.7])
def test_shrinking_invariants_and_stage_count(keep):
    cfg = ShrinkConfig(bins=4, candidates_per_bin=16, keep_fraction=keep, max_per_bin=2)
    block = BlockShrink.start(SPACE, HIDDEN, 4, cfg, seed=0, block=0)
    c = max(len(b) for b in block.bins)
    assert c == 16 and not block.finished
    stages = 0
    while not block.finished:
        before = [list(b) for b in block.bins]
        scores = {p: synthetic_loss(p) for p in block.survivors()}
        rows = block.apply(scores, lambda p: path_params(SPACE, HIDDEN, p), cfg)
        stages += 1
        assert block.stage == stages
        assert len(block.bins) == len(before)  # the smallest and the largest bins survive: no bin empties
        for i, (old, new) in enumerate(zip(before, block.bins)):
            assert 1 <= len(new) <= len(old) and set(new) <= set(old)
            assert len(new) == keep_count(len(old), cfg)
            mine = [r for r in rows if r["bin"] == i]
            assert sorted(r["path"] for r in mine) == sorted(",".join(p) for p in old)  # every scored path
            kept = sorted(mine, key=lambda r: r["val_loss"])[:len(new)]
            assert all(r["kept"] for r in kept) and sum(r["kept"] for r in mine) == len(new)
            assert {r["path"] for r in kept} == {",".join(p) for p in new}
        assert all(r["stage"] == stages - 1 and r["block"] == 0 for r in rows)
        assert to_table(rows, STAGES_SCHEMA).num_rows == len(rows)
    assert all(1 <= len(b) <= cfg.max_per_bin for b in block.bins)
    assert stages == stages_to_finish(c, cfg)
    if keep == 0.5:
        assert stages == math.ceil(math.log(c / cfg.max_per_bin) / math.log(1 / keep)) == 3
    with pytest.raises(ValueError, match="already finished"):
        run_stage(block, cfg)


def test_apply_needs_a_score_for_every_survivor():
    cfg = ShrinkConfig(bins=2, candidates_per_bin=4)
    block = BlockShrink.start(SPACE, HIDDEN, 4, cfg, seed=0, block=0)
    scores = {p: 1.0 for p in block.survivors()[1:]}
    with pytest.raises(KeyError, match="no val loss for 1 surviving path"):
        block.apply(scores, lambda p: 0, cfg)
    assert block.stage == 0 and sum(map(len, block.bins)) == 8  # nothing changed


def test_a_diverged_path_is_dropped_first():
    cfg = ShrinkConfig(bins=1, candidates_per_bin=4, max_per_bin=1)
    block = BlockShrink.start(SPACE, HIDDEN, 4, cfg, seed=0, block=0)
    paths = block.survivors()
    scores = {p: float("nan") if i == 0 else float(i) for i, p in enumerate(paths)}
    rows = block.apply(scores, lambda p: 0, cfg)
    assert not next(r for r in rows if r["path"] == ",".join(paths[0]))["kept"]
    assert block.bins == [[paths[1], paths[2]]]


def test_state_round_trip_and_resume_mid_way(tmp_path):
    cfg = ShrinkConfig(bins=3, candidates_per_bin=10, max_per_bin=2)
    state = ShrinkState.start(SPACE, HIDDEN, 4, num_blocks=2, cfg=cfg, seed=7)
    assert state.config == {**cfg.__dict__, "seed": 7, "hidden": HIDDEN} and state.shrink_config() == cfg
    for b in state.blocks.values():
        run_stage(b, cfg, seed=b.block)
    path = state.save(tmp_path / "state.json")
    assert json.loads(path.read_text())["blocks"]["1"]["stage"] == 1
    resumed = ShrinkState.load(path)
    assert resumed == state  # dataclass equality: int keys, tuples of str, edges, stages
    assert all(isinstance(p, tuple) for b in resumed.blocks.values() for p in b.survivors())

    def finish(s: ShrinkState) -> dict[int, list[tuple[str, ...]]]:
        while not s.finished:
            for b in s.blocks.values():
                if not b.finished:
                    run_stage(b, cfg, seed=b.block)
        return {k: b.survivors() for k, b in s.blocks.items()}

    assert finish(resumed) == finish(state)
    assert resumed.finished and all(b.stage == 3 for b in resumed.blocks.values())


def test_load_names_a_broken_state_file(tmp_path):
    bad = tmp_path / "state.json"
    bad.write_text('{"version": 1, "blocks": ')
    with pytest.raises(ConfigError, match="state.json"):
        ShrinkState.load(bad)
    bad.write_text(json.dumps({"version": 1, "config": {}, "blocks": {"0": {"block": 0, "edges": [0, 5],
                                                                              "bins": [[]], "stage": 0,
                                                                              "finished": False}}}))
    with pytest.raises(ConfigError, match="state.json: not a shrinking state"):
        ShrinkState.load(bad)


# ---- performance approximation -------------------------------------------------------------------
def survivors_for(num_blocks: int, per_block: int, ops_per_block: int, seed: int = 0):
    """Distinct paths per block with continuous random losses (no ties), via the shrinking pool sampler."""
    rng = random.Random(seed)
    out = []
    for k in range(num_blocks):
        cfg = ShrinkConfig(bins=4, candidates_per_bin=per_block)
        pool = [p for b in initial_pool(SPACE, HIDDEN, ops_per_block, cfg, seed, k)[0] for p in b]
        out.append([(p, rng.random()) for p in rng.sample(pool, per_block)])
    return out


def brute_force(survivors, constraint, budget, top_t):
    rows = []
    for combo in itertools.product(*survivors):
        arch = LayerwiseArch(HIDDEN, tuple(t for p, _ in combo for t in p))
        if constraint.fits(arch, budget):
            rows.append((sum(loss for _, loss in combo), SPACE.format(arch)))
    return sorted(rows)[:top_t]


@pytest.mark.parametrize("kind", ["params", "flops", "latency"])
def test_assemble_is_the_exact_top_t_under_each_budget(kind):
    class Predictor:  # a latency that is not a sum over blocks: the constraint is asked arch by arch
        reference_ms = 10.0

        def predict(self, archs):
            return [1.0 + (SPACE.params(a, "encoder") / 1e4) ** 1.5 for a in archs]

    constraint = Constraint(SPACE, kind, predictor=Predictor() if kind == "latency" else None)
    survivors = survivors_for(2, 8, 4)  # 2 blocks of 4 op-layers: the 8-layer space
    all_costs = sorted(constraint.cost(LayerwiseArch(HIDDEN, a + b)) for (a, _), (b, _) in
                       itertools.product(*survivors))
    texts = [repr(all_costs[len(all_costs) // 5]), repr(all_costs[len(all_costs) // 2]), repr(all_costs[-1])]
    budgets = constraint.budgets(texts) + [Budget("nothing", 1e-3, constraint.unit)]
    result = assemble(SPACE, HIDDEN, survivors, constraint, budgets, top_t=5)
    assert list(result) == [b.label for b in budgets] and result["nothing"] == []
    for budget in budgets[:-1]:
        got = result[budget.label]
        assert [(a.summed_loss, a.arch) for a in got] == brute_force(survivors, constraint, budget, 5)
        for a in got:
            assert isinstance(a, Assembled) and a.budget == budget.label and a.cost <= budget.value
            assert a.arch == SPACE.format(LayerwiseArch(HIDDEN, a.paths[0] + a.paths[1]))
            assert a.params == SPACE.params(a.arch, "base") and a.cost == constraint.cost(a.arch)
    assert len(result[texts[-1]]) == 5


def test_assemble_chunked_enumeration_matches_one_shot(monkeypatch):
    space = make_space(num_layers=6)
    survivors = []
    rng = random.Random(1)
    paths = list(itertools.product(space.tokens, repeat=2))
    for _ in range(3):
        survivors.append([(p, round(rng.random(), 2)) for p in rng.sample(paths, 8)])  # rounded: ties happen
    constraint = Constraint(space, "params")
    budgets = constraint.budgets([str(int(space.params(space.largest()) * f)) for f in (0.6, 0.8)])
    one_shot = assemble(space, HIDDEN, survivors, constraint, budgets, top_t=7)
    monkeypatch.setattr(approximation, "CHUNK", 8)  # one block costed at a time, the other two enumerated
    assert assemble(space, HIDDEN, survivors, constraint, budgets, top_t=7) == one_shot
    for budget in budgets:
        expect = []
        for combo in itertools.product(*survivors):  # ties: block 0's earlier survivor first, then block 1's ...
            arch = LayerwiseArch(HIDDEN, tuple(t for p, _ in combo for t in p))
            if constraint.fits(arch, budget):
                expect.append((sum(v for _, v in combo), len(expect), space.format(arch)))
        assert [a.arch for a in one_shot[budget.label]] == [a for _, _, a in sorted(expect)[:7]]


def test_assemble_four_blocks_of_twenty_is_fast():
    survivors = survivors_for(4, 20, 2)  # 160,000 combinations
    constraint = Constraint(SPACE, "params")
    budgets = constraint.budgets([str(int(SPACE.params(SPACE.largest()) * f)) for f in (0.5, 0.7, 0.9)])
    start = time.perf_counter()
    result = assemble(SPACE, HIDDEN, survivors, constraint, budgets, top_t=10)
    assert time.perf_counter() - start < 2.0
    for budget in budgets:
        losses = [a.summed_loss for a in result[budget.label]]
        assert len(losses) == 10 and losses == sorted(losses)
        assert all(constraint.fits(a.arch, budget) for a in result[budget.label])


def test_assemble_refuses_bad_input(monkeypatch):
    constraint = Constraint(SPACE, "params")
    budgets = constraint.budgets(["1e9"])
    survivors = survivors_for(2, 3, 4)
    with pytest.raises(ConfigError, match="hold 4 op-layers"):
        assemble(SPACE, HIDDEN, survivors[:1], constraint, budgets, top_t=1)
    with pytest.raises(ConfigError, match="top_t"):
        assemble(SPACE, HIDDEN, survivors, constraint, budgets, top_t=0)
    with pytest.raises(ConfigError, match="NaN"):
        assemble(SPACE, HIDDEN, [survivors[0], [(survivors[1][0][0], float("nan"))]], constraint, budgets, 1)
    monkeypatch.setattr(approximation, "MAX_COMBINATIONS", 8)
    with pytest.raises(ConfigError, match="3 x 3 = 9 combinations.*lower max_per_bin or bins"):
        assemble(SPACE, HIDDEN, survivors, constraint, budgets, top_t=1)


def test_rank_agreement_is_kendall_tau():
    assert rank_agreement([1.0, 2.0, 3.0], [10.0, 20.0, 30.0]) == 1.0
    assert rank_agreement([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == -1.0
    assert np.isnan(rank_agreement([1.0, 1.0], [1.0, 2.0]))
