"""Structured pruning as hooks of the fine-tuning loop: L0 gates + Lagrangian, then a fixed mask.

One loop trains everything (:func:`raynas.evaluation.finetune.finetune`: its loss,
distillation from the unpruned model, optimizer and schedule); :class:`Pruner`
adds what pruning needs, in two phases over the run's steps:

1. ``prune`` (the first ``prune_fraction`` of the steps): hard-concrete gates on
   every head and neuron are sampled each forward; the Lagrangian term steers the
   expected remaining fraction to the target, which ramps from the full model to
   the target over the first ``warmup_fraction`` of the steps. Gates and
   multipliers have their own Adam (``gate_lr``, ``lambda_lr``), as in CoFiPruning.
2. ``finetune`` (the rest): the mask is fixed -- the highest-``log_alpha`` units that
   fit the target (:func:`raynas.compression.targets.project`) -- and the weights
   recover under the same distillation loss, with the gates closed for good.

``method: magnitude`` is the baseline without L0: the mask comes from weight
magnitudes (normalised per unit type, so heads and neurons compete fairly)
before the first step, and the whole run is phase 2.

Evaluations before the mask is fixed use the mask the current ramped target
would give, so a mid-run score is a score of a model that could be exported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from raynas.compression.gates import Gates
from raynas.compression.removal import magnitude_scores
from raynas.compression.targets import (
    CostModel,
    Lagrangian,
    LatencyModel,
    analytic_cost,
    kept_counts,
    project,
    ramp,
    target_fraction,
)
from raynas.errors import ConfigError, require

METHODS = ("l0", "magnitude")


@dataclass
class PruneSettings:
    """How to prune; every field JSON-able (a Tune trial config carries them)."""

    kind: str = "params"  # params | flops (sparsity in (0, 1)) | speedup (> 1, through a fitted latency model)
    target: float = 0.5
    method: str = "l0"  # l0 | magnitude (the baseline: no gates learned)
    prune_fraction: float = 0.7  # share of the steps with learnable gates; the rest fine-tunes the fixed mask
    warmup_fraction: float = 0.35  # share of the steps over which the target ramps in
    gate_lr: float = 0.05
    lambda_lr: float = 0.01  # small: larger rates overshoot (measured: Adam 0.05 -> 0.17 for 0.40 asked)
    droprate_init: float = 0.3  # initial P(gate closed) of the hard-concrete gates
    block_gates: bool = False  # CoFi's coarse gates on whole MHA / FFN blocks
    flops_seq_len: int = 128  # FLOPs are counted at this many tokens

    def check(self) -> None:
        require(self.method in METHODS, f"prune.method: expected one of {', '.join(METHODS)}, got {self.method!r}")
        require(0.0 < self.prune_fraction <= 1.0, f"prune.prune_fraction: expected (0, 1], got {self.prune_fraction!r}")
        require(0.0 <= self.warmup_fraction <= self.prune_fraction,
                f"prune.warmup_fraction: expected within [0, prune_fraction], got {self.warmup_fraction!r}")
        require(self.gate_lr > 0 and self.lambda_lr > 0, "prune.gate_lr / prune.lambda_lr: expected > 0")
        require(self.flops_seq_len >= 1, f"prune.flops_seq_len: expected >= 1, got {self.flops_seq_len!r}")


def cost_model(settings: PruneSettings, config: Any, latency: LatencyModel | None) -> CostModel:
    """The cost a target is a fraction of: analytic params / FLOPs, or the fitted latency model."""
    if settings.kind == "speedup":
        if latency is None:
            raise ConfigError("prune.kind: speedup needs a latency model (fitted by the prune recipe)")
        return latency.cost_model(config)
    return analytic_cost(config, settings.kind, settings.flops_seq_len)


class Pruner:
    """:class:`raynas.evaluation.finetune.TrainingHooks` for structured pruning (see the module doc)."""

    def __init__(self, settings: PruneSettings, latency: LatencyModel | None = None) -> None:
        settings.check()
        self.settings, self.latency = settings, latency
        self.model: nn.Module | None = None
        self.gates: Gates | None = None
        self.cost: CostModel | None = None
        self.fraction = 1.0
        self.masks: dict[int, Tensor] | None = None  # the fixed mask, once phase 2 starts
        self._expected = float("nan")
        self.expected_at_fix = float("nan")  # E[remaining fraction] when the mask was fixed (l0)

    # ---- TrainingHooks ----------------------------------------------------------------------
    def prepare(self, model: nn.Module, total_steps: int, device: torch.device) -> nn.Module:
        from raynas.export import from_bert  # a BERT checkpoint is pruned in the raynas format (per-layer sizes)

        if getattr(model.config, "model_type", None) == "bert":
            model = from_bert(model).train()
        s = self.settings
        self.cost = cost_model(s, model.config, self.latency)
        self.fraction = target_fraction(s.kind, s.target, self.cost)
        self.step = 0
        self.prune_steps = 0 if s.method == "magnitude" else max(1, round(s.prune_fraction * total_steps))
        self.warmup_steps = round(s.warmup_fraction * total_steps)
        self.gates = Gates(model, s.block_gates, s.droprate_init).to(device)
        self.gates.attach(model)
        self.lagrangian = Lagrangian().to(device)
        self.optimizer = torch.optim.Adam([
            {"params": list(self.gates.parameters()), "lr": s.gate_lr},
            {"params": list(self.lagrangian.parameters()), "lr": s.lambda_lr},
        ])
        self.model = model
        if s.method == "magnitude":
            self._fix(project(_normalised(magnitude_scores(model), self.gates.kinds), self.cost, self.fraction))
        return model

    def loss(self, step: int) -> Tensor | None:
        if self.masks is not None:
            return None
        assert self.gates is not None and self.cost is not None
        units, blocks = self.gates.keep_probs()
        expected = self.cost.expected_fraction(units, blocks)
        self._expected = float(expected.detach())
        return self.lagrangian(expected, self.target_at(step))

    def after_step(self, step: int) -> None:
        self.step = step
        if self.masks is not None:
            return
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if step >= self.prune_steps:
            self._fix(self.current_mask())

    def evaluating(self, on: bool) -> None:
        assert self.gates is not None
        if self.masks is not None:
            return
        if on:
            self.gates.fix(_as_values(self.current_mask(self.target_at(self.step))))
        else:
            self.gates.unfix()

    def status(self) -> dict[str, float]:
        out = {"target_fraction": self.fraction, "expected_fraction": self._expected}
        if self.masks is not None:
            out["achieved_fraction"] = self.achieved_fraction()
        else:
            lam = self.lagrangian.lambdas.detach().tolist()
            out.update(lambda_1=lam[0], lambda_2=lam[1])
        return out

    def state_dict(self) -> dict[str, Any]:
        """Gates, multipliers, their optimizer, and the fixed mask once there is one (for checkpoints)."""
        assert self.gates is not None
        return {"gates": self.gates.state_dict(), "lagrangian": self.lagrangian.state_dict(),
                "optimizer": self.optimizer.state_dict(), "masks": self.masks, "step": self.step,
                "expected": self._expected, "expected_at_fix": self.expected_at_fix}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert self.gates is not None
        self.gates.load_state_dict(state["gates"])
        self.lagrangian.load_state_dict(state["lagrangian"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self._expected = state["step"], state["expected"]
        if state["masks"] is not None:
            self._fix(state["masks"])
            self.expected_at_fix = state["expected_at_fix"]

    # ---- the mask ---------------------------------------------------------------------------
    def target_at(self, step: int) -> float:
        """The remaining fraction asked for at ``step`` (the ramp from 1 to the target)."""
        return ramp(step, self.warmup_steps, self.fraction)

    def current_mask(self, fraction: float | None = None) -> dict[int, Tensor]:
        """The mask the gates give now: the best-scoring units within ``fraction`` (default: the target)."""
        assert self.gates is not None and self.cost is not None
        return project(self.gates.scores(), self.cost, self.fraction if fraction is None else fraction)

    def _fix(self, masks: dict[int, Tensor]) -> None:
        assert self.gates is not None
        self.masks = masks
        self.expected_at_fix = self._expected
        self.gates.fix(_as_values(masks))
        for p in self.gates.parameters():
            p.requires_grad_(False)

    def achieved_fraction(self) -> float:
        assert self.masks is not None and self.cost is not None
        return self.cost.fraction(kept_counts(self.masks))

    def unit_values(self) -> dict[int, Tensor]:
        """The fixed gate values (1 kept, 0 removed) per op-layer, for :func:`remove_pruned`."""
        if self.masks is None:
            raise RuntimeError("pruner: the mask is not fixed yet")
        return _as_values(self.masks)


def _as_values(masks: dict[int, Tensor]) -> dict[int, Tensor]:
    return {i: m.to(torch.float32) for i, m in masks.items()}


def _normalised(scores: dict[int, Tensor], kinds: dict[int, str]) -> dict[int, Tensor]:
    """Magnitudes divided by the mean of their unit type, so a head and a neuron are comparable."""
    out = {}
    for kind in set(kinds.values()):
        layer_ids = [i for i, k in kinds.items() if k == kind]
        mean = torch.cat([scores[i].flatten() for i in layer_ids]).mean().clamp_min(1e-12)
        out.update({i: scores[i] / mean for i in layer_ids})
    return out
