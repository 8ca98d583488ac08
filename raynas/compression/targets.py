"""What a pruning target means: a cost model, the Lagrangian that steers the gates to it, the final mask.

A target is a fraction of the encoder's parameters, of its FLOPs, or a CPU
speedup. All three are *affine in the kept units of each layer*: a head costs
``4 d h + 3 h`` parameters (its q/k/v rows and biases, its ``dense`` columns) and
a fixed FLOP count per token; a neuron ``2 d + 1`` parameters; an emptied block
still holds its output bias and LayerNorm (``3 d``). Latency is affine too, once
measured: a per-head and a per-neuron slope plus a constant for each block that
still runs (its kernels launch whatever their width) -- :class:`LatencyModel`
fits those coefficients on this machine's timings of pruned shapes. So one
:class:`CostModel` (``slope`` per unit, ``on`` per non-empty block, ``base`` per
block, ``fixed`` for the rest) serves every kind, and its expectation under the
hard-concrete gates is differentiable.

Sparsity control (Wang et al. 2019; CoFiPruning): the training loss gets
``lambda_1 (E[r] - r_t) + lambda_2 (E[r] - r_t)^2`` where ``E[r]`` is the expected
remaining fraction and ``r_t`` ramps from 1 to the target; the multipliers are
trained by gradient *ascent* (their gradients are negated), so they grow while
the model is too large. The final mask does not rely on the multipliers having
settled -- on a small task they oscillate and overshoot (CoFi users' complaint):
:func:`project` keeps the units with the highest gate scores that fit the budget,
so the achieved size meets the target to within one unit's cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from raynas.errors import ConfigError
from raynas.models.configuration_raynas import RaynasConfig
from raynas.spaces.ops import FFN, MHA

TARGET_KINDS = ("params", "flops", "speedup")


@dataclass(frozen=True)
class LayerCost:
    """One gated op-layer: ``base + on * [any unit kept] + slope * units kept``."""

    units: int
    slope: float
    on: float = 0.0
    base: float = 0.0


@dataclass(frozen=True)
class CostModel:
    """A model's cost as an affine function of the units kept per gated op-layer (keys: op-layer index)."""

    kind: str
    layers: Mapping[int, LayerCost]
    fixed: float  # embeddings time, ungated ops, ... (whatever no gate changes)

    @property
    def full(self) -> float:
        return self.fixed + sum(c.base + c.on + c.slope * c.units for c in self.layers.values())

    def cost(self, kept: Mapping[int, int]) -> float:
        """The cost with ``kept[i]`` units left in op-layer i."""
        total = self.fixed
        for i, c in self.layers.items():
            k = int(kept[i])
            total += c.base + (c.on if k > 0 else 0.0) + c.slope * k
        return total

    def fraction(self, kept: Mapping[int, int]) -> float:
        """Remaining fraction of the full cost."""
        return self.cost(kept) / self.full

    def expected_fraction(self, units: Mapping[int, Tensor], blocks: Mapping[int, Tensor]) -> Tensor:
        """E[remaining fraction] given P(gate != 0) per unit and per block (differentiable)."""
        total = torch.zeros((), device=next(iter(units.values())).device)
        for i, c in self.layers.items():
            p = units[i]
            any_kept = 1.0 - torch.prod(1.0 - p)
            total = total + c.base + blocks[i] * (c.slope * p.sum() + c.on * any_kept)
        return (total + self.fixed) / self.full

    def floor(self) -> float:
        """The smallest reachable fraction (every gated unit removed)."""
        return (self.fixed + sum(c.base for c in self.layers.values())) / self.full


def analytic_cost(config: RaynasConfig, kind: str, seq_len: int = 128) -> CostModel:
    """Encoder parameters or FLOPs (at ``seq_len`` tokens) as a :class:`CostModel`; equal to the ops' counts."""
    if kind not in ("params", "flops"):
        raise ConfigError(f"target.kind: {kind!r} has no analytic cost (params, flops)")
    d = config.hidden_size

    def count(op: object) -> float:
        return float(op.params(d) if kind == "params" else op.flops(d, seq_len))  # type: ignore[attr-defined]

    layers, fixed = {}, 0.0
    for i, op in enumerate(config.ops):
        if isinstance(op, MHA) and op.heads > 0:
            empty = MHA(0, op.head_dim)
            layers[i] = LayerCost(op.heads, count(MHA(1, op.head_dim)) - count(empty), base=count(empty))
        elif isinstance(op, FFN) and op.inner > 0:
            layers[i] = LayerCost(op.inner, count(FFN(1)) - count(FFN(0)), base=count(FFN(0)))
        else:
            fixed += count(op)
    return CostModel(kind, layers, fixed)


@dataclass(frozen=True)
class LatencyModel:
    """Milliseconds as ``intercept + sum over layers of (on_mha + per_head * heads)`` and the FFN twin.

    Fitted by least squares on measured (shape, ms) pairs of pruned variants of one
    model on the machine that will run it; ``r2`` says how well it explains them.
    """

    intercept: float
    per_head: float
    on_mha: float
    per_neuron: float
    on_ffn: float
    r2: float = float("nan")

    @staticmethod
    def features(config: RaynasConfig) -> list[float]:
        heads = [op.heads for op in config.ops if isinstance(op, MHA)]
        inner = [op.inner for op in config.ops if isinstance(op, FFN)]
        return [1.0, float(sum(heads)), float(sum(h > 0 for h in heads)), float(sum(inner)), float(sum(n > 0 for n in inner))]

    @classmethod
    def fit(cls, configs: Sequence[RaynasConfig], ms: Sequence[float]) -> LatencyModel:
        if len(configs) < 6:
            raise ConfigError(f"latency model: {len(configs)} measured shape(s); at least 6 are needed for 5 coefficients")
        x = torch.tensor([cls.features(c) for c in configs], dtype=torch.float64)
        y = torch.tensor(list(ms), dtype=torch.float64)
        coef = torch.linalg.lstsq(x, y[:, None]).solution[:, 0].clamp_min(0.0)  # no unit makes a model faster
        residual = y - x @ coef
        r2 = 1.0 - float(residual.pow(2).sum() / (y - y.mean()).pow(2).sum().clamp_min(1e-12))
        return cls(*(float(v) for v in coef.tolist()), r2=r2)

    def predict(self, config: RaynasConfig) -> float:
        coef = [self.intercept, self.per_head, self.on_mha, self.per_neuron, self.on_ffn]
        return float(sum(a * b for a, b in zip(coef, self.features(config))))

    def cost_model(self, config: RaynasConfig) -> CostModel:
        layers, fixed = {}, self.intercept
        for i, op in enumerate(config.ops):
            if isinstance(op, MHA) and op.heads > 0:
                layers[i] = LayerCost(op.heads, self.per_head, on=self.on_mha)
            elif isinstance(op, FFN) and op.inner > 0:
                layers[i] = LayerCost(op.inner, self.per_neuron, on=self.on_ffn)
        return CostModel("speedup", layers, fixed)


def target_fraction(kind: str, value: float, cost: CostModel) -> float:
    """The remaining fraction a target asks for: ``1 - sparsity``, or ``1 / speedup`` of predicted latency."""
    if kind not in TARGET_KINDS:
        raise ConfigError(f"target.kind: expected one of {', '.join(TARGET_KINDS)}, got {kind!r}")
    if kind == "speedup":
        if not (isinstance(value, (int, float)) and value > 1.0):
            raise ConfigError(f"target: a speedup must be > 1, got {value!r}")
        fraction = 1.0 / value
    else:
        if not (isinstance(value, (int, float)) and 0.0 < value < 1.0):
            raise ConfigError(f"target: a {kind} sparsity must be a fraction in (0, 1), got {value!r}")
        fraction = 1.0 - value
    if fraction < cost.floor():
        best = (1.0 / cost.floor()) if kind == "speedup" else 1.0 - cost.floor()
        raise ConfigError(f"target: {value:g} is out of reach: removing every head and neuron gives at most "
                          f"{best:.3g} ({'speedup' if kind == 'speedup' else kind + ' sparsity'})")
    return fraction


def ramp(step: int, warmup_steps: int, final: float) -> float:
    """The remaining-fraction target at ``step``: 1 at step 0, ``final`` from ``warmup_steps`` on (linear)."""
    if warmup_steps <= 0:
        return final
    return 1.0 - (1.0 - final) * min(1.0, step / warmup_steps)


class Lagrangian(nn.Module):
    """``lambda_1 * gap + lambda_2 * gap^2``; the multipliers ascend (their gradients are negated)."""

    def __init__(self) -> None:
        super().__init__()
        self.lambdas = nn.Parameter(torch.zeros(2))
        self.lambdas.register_hook(lambda grad: -grad)

    def forward(self, expected: Tensor, target: float) -> Tensor:
        gap = expected - target
        return self.lambdas[0] * gap + self.lambdas[1] * gap * gap


def project(scores: Mapping[int, Tensor], cost: CostModel, fraction: float) -> dict[int, Tensor]:
    """Boolean keep-masks: the highest-scoring units, greedily, while the cost stays within ``fraction``.

    Scores of different layers are compared directly (gate ``log_alpha``, or normalised
    magnitudes for the baseline). A unit that does not fit is skipped and cheaper ones
    are still tried, so the result is within one unit's cost of the budget.
    """
    budget = fraction * cost.full + 1e-9 * cost.full
    kept = {i: 0 for i in cost.layers}
    masks = {i: torch.zeros(c.units, dtype=torch.bool) for i, c in cost.layers.items()}
    total = cost.cost(kept)
    ranked = sorted(((float(s), i, j) for i in cost.layers for j, s in enumerate(scores[i].tolist())),
                    key=lambda t: (-t[0], t[1], t[2]))
    for _score, i, j in ranked:
        c = cost.layers[i]
        extra = c.slope + (c.on if kept[i] == 0 else 0.0)
        if total + extra <= budget:
            masks[i][j] = True
            kept[i] += 1
            total += extra
    return masks


def kept_counts(masks: Mapping[int, Tensor]) -> dict[int, int]:
    return {i: int(m.sum()) for i, m in masks.items()}

