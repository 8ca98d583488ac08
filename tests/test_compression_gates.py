"""Hard-concrete gates, cost models, the Lagrangian and the budget projection, on tiny in-memory models."""

from __future__ import annotations

import pytest
import torch

from raynas.compression.gates import Gates, HardConcrete
from raynas.compression.removal import remove_pruned
from raynas.compression.targets import (
    CostModel,
    Lagrangian,
    LatencyModel,
    LayerCost,
    analytic_cost,
    kept_counts,
    project,
    ramp,
    target_fraction,
)
from raynas.errors import ConfigError
from raynas.models import RaynasConfig, RaynasForSequenceClassification
from raynas.spaces.ops import FFN, MHA, Identity, SepConv, encoder_params


def _model(seed: int = 0) -> RaynasForSequenceClassification:
    torch.manual_seed(seed)
    layers = [MHA(4, 8), FFN(48), MHA(4, 8), FFN(40), SepConv(3, 16), Identity(), MHA(2, 8), FFN(24)]
    config = RaynasConfig(vocab_size=100, hidden_size=32, layers=[op.to_dict() for op in layers],
                          max_position_embeddings=64, num_labels=3)
    return RaynasForSequenceClassification(config).eval()


def _batch(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    mask[2, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_keep_prob_is_the_probability_that_a_sample_is_nonzero() -> None:
    torch.manual_seed(0)
    gate = HardConcrete(5)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([-4.0, -1.0, 0.0, 1.0, 4.0]))
        draws = torch.stack([gate.sample() for _ in range(20000)])
    assert float(draws.min()) >= 0.0 and float(draws.max()) <= 1.0
    assert torch.allclose((draws > 0).float().mean(0), gate.keep_prob().detach(), atol=0.015)
    assert (draws == 0).any() and (draws == 1).any()  # the stretch makes exact zeros and ones


def test_gates_at_one_leave_the_model_unchanged_and_detach_leaves_no_trace() -> None:
    model, batch = _model(), _batch()
    ref = model(**batch).logits
    gates = Gates(model, block_gates=True)
    assert sorted(gates.kinds) == [0, 1, 2, 3, 6, 7]  # conv and identity are not gated
    gates.attach(model)
    gates.fix({i: torch.ones(g.log_alpha.numel()) for i, g in ((int(k), g) for k, g in gates.units.items())})
    assert torch.equal(model(**batch).logits, ref)
    gates.fix({i: torch.zeros(g.log_alpha.numel()) for i, g in ((int(k), g) for k, g in gates.units.items())})
    assert not torch.allclose(model(**batch).logits, ref)
    gates.detach()
    assert torch.equal(model(**batch).logits, ref)


def test_gated_model_equals_the_removed_model() -> None:
    model, batch = _model(), _batch()
    gates = Gates(model, block_gates=True)
    gates.attach(model)
    g = torch.Generator().manual_seed(3)
    units = {}
    for k, gate in gates.units.items():
        values = torch.rand(gate.log_alpha.numel(), generator=g)
        values[values < 0.4] = 0.0  # some units removed, the rest soft values
        units[int(k)] = values
    units[2] = torch.zeros(4)  # a whole MHA block emptied: LayerNorm(x + bias), not the identity
    blocks = {3: 0.0, 7: 0.5}
    gates.fix(units, blocks)
    gated = model(**batch).logits
    removed = remove_pruned(model, units, blocks)
    assert (removed(**batch).logits - gated).abs().max() <= 1e-5
    assert removed.config.ops[2] == MHA(0, 8) and removed.config.ops[3] == FFN(0)


def test_training_draws_differ_per_forward_and_evaluation_needs_fixed_gates() -> None:
    model, batch = _model(), _batch()
    gates = Gates(model, droprate_init=0.5)
    gates.attach(model)
    model.train()
    torch.manual_seed(0)
    a, b = model(**batch).logits, model(**batch).logits
    assert not torch.allclose(a, b)
    a.sum().backward()
    assert all(g.log_alpha.grad is not None and g.log_alpha.grad.abs().sum() > 0 for g in gates.units.values())
    model.eval()
    with pytest.raises(RuntimeError, match="deterministic"):
        model(**batch)


def test_analytic_cost_equals_the_ops_counts_for_any_mask() -> None:
    config = _model().config
    params, flops = analytic_cost(config, "params"), analytic_cost(config, "flops", 128)
    assert params.full == encoder_params(32, config.ops)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        kept = {i: int(torch.randint(0, c.units + 1, (), generator=g)) for i, c in params.layers.items()}
        ops = [MHA(kept[i], op.head_dim) if isinstance(op, MHA) else FFN(kept[i]) if isinstance(op, FFN) else op
               for i, op in enumerate(config.ops)]
        assert params.cost(kept) == encoder_params(32, ops)
        assert flops.cost(kept) == sum(op.flops(32, 128) for op in ops)


def test_expected_fraction_is_the_fraction_when_gates_are_certain() -> None:
    cost = analytic_cost(_model().config, "params")
    units = {i: (torch.arange(c.units) % 2).float() for i, c in cost.layers.items()}
    blocks = {i: torch.tensor(1.0) for i in cost.layers}
    blocks[1] = torch.tensor(0.0)  # a closed block counts as emptied
    kept = {i: int(u.sum()) for i, u in units.items()}
    kept[1] = 0
    assert abs(float(cost.expected_fraction(units, blocks)) - cost.fraction(kept)) < 1e-6


def test_project_fills_the_budget_to_within_one_unit_by_score() -> None:
    cost = analytic_cost(_model().config, "params")
    g = torch.Generator().manual_seed(1)
    scores = {i: torch.randn(c.units, generator=g) for i, c in cost.layers.items()}
    for fraction in (0.3, 0.5, 0.8):
        masks = project(scores, cost, fraction)
        achieved = cost.fraction(kept_counts(masks))
        biggest = max(c.slope for c in cost.layers.values()) / cost.full
        assert fraction - biggest <= achieved <= fraction + 1e-9
        kept_scores = torch.cat([scores[i][m] for i, m in masks.items()])
        dropped = torch.cat([scores[i][~m] for i, m in masks.items()])
        # every dropped unit that scores above the lowest kept one did not fit (a head after the budget was spent)
        assert kept_scores.numel() > 0 and dropped.numel() > 0


def test_project_pays_a_blocks_on_cost_once() -> None:
    cost = CostModel("speedup", {0: LayerCost(4, slope=1.0, on=10.0), 1: LayerCost(4, slope=1.0, on=10.0)}, fixed=2.0)
    scores = {0: torch.tensor([4.0, 3.0, 2.0, 1.0]), 1: torch.tensor([3.5, 0.0, 0.0, 0.0])}
    masks = project(scores, cost, 16.0 / cost.full)  # fixed 2 + on 10 + 4 units: one block only
    assert kept_counts(masks) == {0: 4, 1: 0}


def test_lagrangian_multipliers_ascend() -> None:
    lag = Lagrangian()
    opt = torch.optim.SGD(lag.parameters(), lr=0.1)
    expected = torch.tensor(0.8, requires_grad=True)
    lag(expected, 0.5).backward()
    opt.step()
    assert lag.lambdas[0] > 0 and lag.lambdas[1] > 0  # too big: both grow
    assert expected.grad is not None


def test_targets_out_of_range_are_one_line_errors() -> None:
    cost = analytic_cost(_model().config, "params")
    assert target_fraction("params", 0.6, cost) == pytest.approx(0.4)
    for kind, value in (("params", 0.0), ("params", 1.0), ("flops", -0.2), ("speedup", 1.0), ("size", 0.5)):
        with pytest.raises(ConfigError):
            target_fraction(kind, value, cost)
    with pytest.raises(ConfigError, match="out of reach"):
        target_fraction("params", 0.999, cost)  # the emptied blocks' biases and LayerNorms stay
    assert ramp(0, 10, 0.4) == 1.0 and ramp(5, 10, 0.4) == pytest.approx(0.7) and ramp(20, 10, 0.4) == 0.4


def test_latency_model_recovers_its_coefficients() -> None:
    truth = LatencyModel(3.0, 0.5, 1.0, 0.002, 0.7)
    g = torch.Generator().manual_seed(0)
    configs = []
    for _ in range(16):
        heads = torch.randint(0, 5, (3,), generator=g).tolist()
        inner = [(0, 16, 32, 64)[int(i)] for i in torch.randint(0, 4, (3,), generator=g)]  # empty blocks too
        layers = [op.to_dict() for h, f in zip(heads, inner) for op in (MHA(h, 8), FFN(f))]
        configs.append(RaynasConfig(vocab_size=50, hidden_size=32, layers=layers))
    fitted = LatencyModel.fit(configs, [truth.predict(c) for c in configs])
    assert fitted.per_head == pytest.approx(0.5, rel=1e-6) and fitted.on_ffn == pytest.approx(0.7, rel=1e-6)
    assert fitted.r2 > 0.999999
    cost = fitted.cost_model(configs[0])
    assert cost.full == pytest.approx(fitted.predict(configs[0]), rel=1e-9)
