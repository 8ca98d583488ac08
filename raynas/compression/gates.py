"""Hard-concrete gates on attention heads and FFN neurons, applied through the model's own modules.

McCarley et al. prune a fine-tuned BERT by putting a gate on every attention head
and every FFN neuron and learning which to close with an L0 penalty; the gates
follow Louizos et al. (2018): a stretched, clamped binary-concrete variable

    s = sigmoid((log u - log(1 - u) + log_alpha) / beta),  u ~ U(0, 1)
    z = clamp(s * (r - l) + l, 0, 1),                       l = -0.1, r = 1.1, beta = 2/3

whose probability of being non-zero, ``sigmoid(log_alpha - beta * log(-l / r))``, is
differentiable -- the expected L0 norm (and so the expected size of the model) is
a smooth function of ``log_alpha``. CoFiPruning adds coarse gates on a whole MHA or
FFN block; ``block_gates=True`` does the same.

Why hooks and not a forked model class: a gate on a head is a scale on that
head's slice of the context entering ``dense``, and a gate on a neuron is a scale
on that neuron's activation entering ``output``; both are the *input* of an
``nn.Linear`` the model already calls, so a forward pre-hook applies them, and a
forward hook scales the block's output by the block gate. The model stays the
stock raynas module tree (saved, exported and loaded as usual); the gates live
beside it in :class:`Gates` and leave no trace once detached. The semantics are
the contract :mod:`raynas.compression.removal` relies on to remove units exactly:

    MHA: LayerNorm(x + block * dense(ctx * z_heads)),  FFN: LayerNorm(x + block * output(gelu(.) * z_neurons))

In training each forward draws fresh gates (one draw per batch, as CoFi); in
evaluation, or once :meth:`Gates.fix` has set them, the gates are deterministic.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from raynas.compression.removal import base_model, spec_of
from raynas.errors import ConfigError
from raynas.models.modeling_raynas import RaynasAttention, RaynasFeedForward
from raynas.spaces.ops import MHA

LIMIT_L, LIMIT_R, BETA = -0.1, 1.1, 2.0 / 3.0
_EPS = 1e-6
_LOG_RATIO = math.log(-LIMIT_L / LIMIT_R)


class HardConcrete(nn.Module):
    """``n`` hard-concrete gates sharing nothing but their temperature and stretch."""

    def __init__(self, n: int, droprate_init: float = 0.3) -> None:
        super().__init__()
        if not 0.0 < droprate_init < 1.0:
            raise ConfigError(f"droprate_init: expected a probability in (0, 1), got {droprate_init!r}")
        mean = math.log(1.0 - droprate_init) - math.log(droprate_init)
        self.log_alpha = nn.Parameter(torch.empty(n).normal_(mean, 1e-2))

    def sample(self) -> Tensor:
        """A training draw: values in [0, 1], many exactly 0 or 1, differentiable in ``log_alpha``."""
        u = torch.rand_like(self.log_alpha).clamp(_EPS, 1.0 - _EPS)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / BETA)
        return (s * (LIMIT_R - LIMIT_L) + LIMIT_L).clamp(0.0, 1.0)

    def keep_prob(self) -> Tensor:
        """P(z != 0) per gate: the expected L0 norm is its sum."""
        return torch.sigmoid(self.log_alpha - BETA * _LOG_RATIO)


def gated_layers(model: nn.Module) -> dict[int, nn.Module]:
    """Op-layer index -> module for every MHA / FFN op-layer with units to gate (empty blocks excluded)."""
    layers = base_model(model)[0].layers
    return {i: m for i, m in enumerate(layers) if isinstance(m, (RaynasAttention, RaynasFeedForward))}


class Gates(nn.Module):
    """One :class:`HardConcrete` group per gated op-layer (heads or neurons), optional block gates.

    Keys of ``units`` / ``blocks`` are the op-layer indices as strings (ModuleDict keys).
    """

    def __init__(self, model: nn.Module, block_gates: bool = False, droprate_init: float = 0.3) -> None:
        super().__init__()
        layers = gated_layers(model)
        if not layers:
            raise ConfigError("gates: the model has no MHA or FFN op-layer to prune")
        self.kinds = {i: ("mha" if isinstance(m, RaynasAttention) else "ffn") for i, m in layers.items()}
        self.units = nn.ModuleDict({str(i): HardConcrete(_unit_count(m), droprate_init) for i, m in layers.items()})
        self.blocks = nn.ModuleDict({str(i): HardConcrete(1, droprate_init) for i in layers} if block_gates else {})
        self._fixed: tuple[dict[int, Tensor], dict[int, float]] | None = None
        self._handles: list[Any] = []

    # ---- values ---------------------------------------------------------------------------
    def keep_probs(self) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
        """P(unit gate != 0) and P(block gate != 0) (ones without block gates), per layer."""
        units = {int(k): g.keep_prob() for k, g in self.units.items()}
        ones = {i: p.new_ones(()) for i, p in units.items()}
        return units, {**ones, **{int(k): g.keep_prob()[0] for k, g in self.blocks.items()}}

    def scores(self) -> dict[int, Tensor]:
        """Per-unit ranking for the final mask: ``log_alpha`` of the unit plus that of its block."""
        out = {int(k): g.log_alpha.detach().clone() for k, g in self.units.items()}
        for k, g in self.blocks.items():  # a closed block closes all its units: rank them by the lower of the two
            out[int(k)] = torch.minimum(out[int(k)], g.log_alpha.detach())
        return out

    def fix(self, units: Mapping[int, Tensor], block: Mapping[int, float] | None = None) -> None:
        """Use these deterministic values from now on, in training and evaluation alike."""
        block = dict(block or {})
        fixed_units = {}
        for i, kind in self.kinds.items():
            if i not in units:
                raise ConfigError(f"gates.fix: no values for op-layer {i} ({kind})")
            value = torch.as_tensor(units[i], dtype=torch.float32).detach()
            if value.shape != self.units[str(i)].log_alpha.shape:
                raise ConfigError(f"gates.fix: op-layer {i} has {self.units[str(i)].log_alpha.numel()} units, "
                                  f"got {tuple(value.shape)}")
            fixed_units[i] = value
        self._fixed = (fixed_units, {i: float(block.get(i, 1.0)) for i in self.kinds})

    def unfix(self) -> None:
        self._fixed = None

    def _value(self, i: int, training: bool) -> tuple[Tensor, Tensor | float]:
        if self._fixed is not None:
            return self._fixed[0][i], self._fixed[1][i]
        if not training:
            raise RuntimeError("gates: evaluation needs deterministic gates; call Gates.fix first")
        key = str(i)
        block = self.blocks[key].sample()[0] if key in self.blocks else 1.0
        return self.units[key].sample(), block

    # ---- hooks ------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        """Register the hooks on ``model``'s ``dense`` (MHA) and ``output`` (FFN) linears."""
        if self._handles:
            raise RuntimeError("gates: already attached; detach first")
        layers = gated_layers(model)
        if {i: type(m) for i, m in layers.items()} != {i: _KIND_TYPES[k] for i, k in self.kinds.items()}:
            raise ConfigError("gates: the model's op-layers differ from the ones these gates were built for")
        for i, module in layers.items():
            linear = module.dense if isinstance(module, RaynasAttention) else module.output
            head_dim = module.spec.head_dim if isinstance(module, RaynasAttention) else 1
            state: dict[str, Any] = {}
            self._handles.append(linear.register_forward_pre_hook(self._pre_hook(i, head_dim, module, state)))
            self._handles.append(linear.register_forward_hook(self._post_hook(state)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _pre_hook(self, i: int, head_dim: int, layer: nn.Module, state: dict[str, Any]) -> Any:
        def hook(_module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
            units, block = self._value(i, layer.training)
            state["block"] = block
            z = units.to(device=args[0].device, dtype=args[0].dtype)
            if head_dim > 1:
                z = z.repeat_interleave(head_dim)
            return (args[0] * z, *args[1:])
        return hook

    @staticmethod
    def _post_hook(state: dict[str, Any]) -> Any:
        def hook(_module: nn.Module, _args: tuple[Tensor, ...], out: Tensor) -> Tensor:
            block = state.pop("block", 1.0)
            if isinstance(block, float) and block == 1.0:
                return out
            return out * (block.to(out.dtype) if isinstance(block, Tensor) else block)
        return hook


_KIND_TYPES = {"mha": RaynasAttention, "ffn": RaynasFeedForward}


def _unit_count(module: nn.Module) -> int:
    spec = spec_of(module)
    return spec.heads if isinstance(spec, MHA) else spec.inner
