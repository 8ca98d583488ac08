"""Physical removal of pruned attention heads and FFN neurons: a smaller model that computes the same.

The gated model (see :mod:`raynas.compression.gates`) scales, for every gated op-layer ``i``,

- MHA: ``LayerNorm(x + dropout(block * dense(ctx * z)))``, ``ctx`` the concatenated head
  contexts ``[B, T, heads * head_dim]`` and ``z`` the head gates ``units[i]`` repeated
  ``head_dim`` times per head;
- FFN: ``LayerNorm(x + dropout(block * output(gelu(intermediate(x)) * z)))``, ``z = units[i]``.

Both scalings act on the input and the output of one ``nn.Linear`` (``dense`` / ``output``),
so they fold into its weights exactly: ``block * W(ctx * z) + block * b`` is the linear map with
weight ``block * W * z[None, :]`` and bias ``block * b``. After folding, a unit whose gate is 0
contributes a zero column, so its column and the rows that feed it (its head's query / key /
value rows, its ``intermediate`` row) can be dropped without changing any output: the other
heads' attention and the other neurons' activations do not depend on them. Dropping the
zero-gated units *without* folding the non-zero gate values in would not be exact (a gate of
0.3 would silently become 1.0), and neither would dropping a block scaled by ``block`` as if it
were 1. That folding is what makes :func:`remove_pruned` exact.

A block with no unit left (or ``block == 0``) is not the identity: the gated model still
computes ``LayerNorm(x + block * b)``, the output projection's (scaled) bias plus the residual
LayerNorm. It becomes :class:`~raynas.models.modeling_raynas.RaynasEmptyBlock` (spec
``MHA(0, head_dim)`` / ``FFN(0)``) holding ``block * b`` and the LayerNorm; with ``block == 0``
that is ``LayerNorm(x)``, still not the identity.

Pure torch + transformers: this module never imports ray.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from raynas.errors import ConfigError
from raynas.models.configuration_raynas import RaynasConfig
from raynas.models.modeling_raynas import (
    RaynasAttention,
    RaynasEmptyBlock,
    RaynasFeedForward,
    RaynasIdentity,
    RaynasModel,
    RaynasPreTrainedModel,
    RaynasSepConv,
)
from raynas.spaces.ops import FFN, MHA, Identity, OpSpec

Tensor = torch.Tensor

__all__ = ["layer_sizes", "magnitude_scores", "remove_pruned"]


# ---- helpers -----------------------------------------------------------------------------
def base_model(model: nn.Module) -> tuple[RaynasModel, str]:
    """The ``RaynasModel`` inside ``model`` and its parameter-name prefix (``""`` or ``"raynas."``)."""
    if isinstance(model, RaynasModel):
        return model, ""
    base = getattr(model, "raynas", None)
    if isinstance(model, RaynasPreTrainedModel) and isinstance(base, RaynasModel):
        return base, "raynas."
    raise ConfigError(
        f"expected a raynas model (RaynasModel, RaynasForMaskedLM, RaynasForSequenceClassification, "
        f"RaynasForQuestionAnswering), got {type(model).__name__}; convert a BERT model with raynas.export.from_bert"
    )


def spec_of(layer: nn.Module) -> OpSpec:
    """The op spec of one op-layer module, read from the module itself."""
    if isinstance(layer, RaynasAttention):
        return layer.spec
    if isinstance(layer, RaynasFeedForward):
        return FFN(layer.intermediate.out_features)
    if isinstance(layer, (RaynasEmptyBlock, RaynasSepConv)):
        return layer.spec
    if isinstance(layer, RaynasIdentity):
        return Identity()
    raise ConfigError(f"unknown op-layer module {type(layer).__name__}")


def _gated_layer(layers: nn.ModuleList, index: Any, what: str) -> RaynasAttention | RaynasFeedForward:
    if not isinstance(index, int) or isinstance(index, bool):
        raise ConfigError(f"{what}: keys are op-layer indices (int), got {index!r}")
    if not 0 <= index < len(layers):
        raise ConfigError(f"{what}[{index}]: op-layer index out of range (the model has {len(layers)} op-layers)")
    layer = layers[index]
    if not isinstance(layer, (RaynasAttention, RaynasFeedForward)):
        raise ConfigError(
            f"{what}[{index}]: op-layer {index} is {type(layer).__name__} ({spec_of(layer)}); only MHA "
            f"(RaynasAttention) and FFN (RaynasFeedForward) op-layers are gated"
        )
    return layer


def _units_of(layer: RaynasAttention | RaynasFeedForward, raw: Any, index: int) -> Tensor:
    """``raw`` as a float64 vector of the layer's unit count with values in [0, 1], or ConfigError."""
    kind, count = (("heads", layer.spec.heads) if isinstance(layer, RaynasAttention)
                   else ("inner", layer.intermediate.out_features))
    z = torch.as_tensor(raw.detach() if isinstance(raw, Tensor) else raw)
    if z.dim() != 1 or z.numel() != count:
        raise ConfigError(
            f"units[{index}]: expected a vector of {count} gate values ({kind} of op-layer {index}), "
            f"got shape {tuple(z.shape)}"
        )
    z = z.to(device="cpu", dtype=torch.float64)
    if not bool(((z >= 0) & (z <= 1)).all()):
        raise ConfigError(f"units[{index}]: gate values must lie in [0, 1], got {z.tolist()}")
    return z


def _block_of(raw: Any, index: int) -> float:
    try:
        value = float(raw.detach() if isinstance(raw, Tensor) else raw)
    except (TypeError, ValueError, RuntimeError):
        raise ConfigError(f"block[{index}]: expected one number in [0, 1], got {raw!r}") from None
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ConfigError(f"block[{index}]: the block gate must lie in [0, 1], got {value!r}")
    return value


def _cpu(t: Tensor) -> Tensor:
    """``t`` on the CPU in at least float32 precision: the folding's working copy (float64 stays float64)."""
    return t.detach().to(device="cpu", dtype=torch.promote_types(t.dtype, torch.float32))


def _fold_mha(layer: RaynasAttention, z: Tensor, block: float) -> tuple[MHA, dict[str, Tensor]]:
    """The new spec and weights (CPU, at least float32) of a gated attention block."""
    hd = layer.spec.head_dim
    dense_b = _cpu(layer.dense.bias)
    norm = {f"LayerNorm.{k}": _cpu(v) for k, v in layer.LayerNorm.state_dict().items()}
    keep = torch.nonzero(z > 0).flatten()
    if block == 0.0 or keep.numel() == 0:
        return MHA(0, hd), {"bias": block * dense_b, **norm}
    cols = (keep[:, None] * hd + torch.arange(hd)[None, :]).flatten()
    dense_w = _cpu(layer.dense.weight)
    scale = z[keep].repeat_interleave(hd).to(dense_w.dtype)
    out: dict[str, Tensor] = {}
    for name in ("query", "key", "value"):
        proj = getattr(layer, name)
        out[f"{name}.weight"] = _cpu(proj.weight)[cols]
        out[f"{name}.bias"] = _cpu(proj.bias)[cols]
    out["dense.weight"] = block * dense_w[:, cols] * scale[None, :]
    out["dense.bias"] = block * dense_b
    return MHA(int(keep.numel()), hd), {**out, **norm}


def _fold_ffn(layer: RaynasFeedForward, z: Tensor, block: float) -> tuple[FFN, dict[str, Tensor]]:
    """The new spec and weights (CPU, at least float32) of a gated feed-forward block."""
    out_b = _cpu(layer.output.bias)
    norm = {f"LayerNorm.{k}": _cpu(v) for k, v in layer.LayerNorm.state_dict().items()}
    keep = torch.nonzero(z > 0).flatten()
    if block == 0.0 or keep.numel() == 0:
        return FFN(0), {"bias": block * out_b, **norm}
    out_w = _cpu(layer.output.weight)
    return FFN(int(keep.numel())), {
        "intermediate.weight": _cpu(layer.intermediate.weight)[keep],
        "intermediate.bias": _cpu(layer.intermediate.bias)[keep],
        "output.weight": block * out_w[:, keep] * z[keep].to(out_w.dtype)[None, :],
        "output.bias": block * out_b,
        **norm,
    }


# ---- public API ----------------------------------------------------------------------------
def layer_sizes(model: nn.Module) -> list[dict[str, Any]]:
    """Per op-layer, its op and size, read from the modules: for reports.

    ``{"op": "mha", "heads": h, "head_dim": d}``, ``{"op": "ffn", "inner": n}``,
    ``{"op": "conv", "kernel": k, "inner": c}``, ``{"op": "id"}``; a fully pruned block shows
    ``heads`` / ``inner`` 0. The list is a valid ``RaynasConfig(layers=...)``.
    """
    base, _ = base_model(model)
    return [spec_of(layer).to_dict() for layer in base.layers]


@torch.no_grad()
def magnitude_scores(model: nn.Module) -> dict[int, Tensor]:
    """Magnitude-pruning baseline: one score per head / neuron of every MHA and FFN op-layer.

    Head ``h`` of an MHA op-layer: the L2 norm of its ``head_dim`` rows of the query, key and
    value weights and its ``head_dim`` columns of the ``dense`` weight, taken together. Neuron
    ``j`` of an FFN op-layer: the L2 norm of row ``j`` of the ``intermediate`` weight and column
    ``j`` of the ``output`` weight. Biases are not counted. Keys: op-layer indices (as for
    :func:`remove_pruned`'s ``units``); values: float32 vectors ``[heads]`` / ``[inner]`` on the
    model's device. Pruned-away (empty) blocks, conv and identity op-layers have no entry.
    """
    base, _ = base_model(model)
    scores: dict[int, Tensor] = {}
    for i, layer in enumerate(base.layers):
        if isinstance(layer, RaynasAttention):
            h, hd = layer.spec.heads, layer.spec.head_dim
            sq = sum(getattr(layer, n).weight.float().pow(2).reshape(h, hd, -1).sum(dim=(1, 2))
                     for n in ("query", "key", "value"))
            sq = sq + layer.dense.weight.float().pow(2).reshape(-1, h, hd).sum(dim=(0, 2))
            scores[i] = sq.sqrt()
        elif isinstance(layer, RaynasFeedForward):
            sq = layer.intermediate.weight.float().pow(2).sum(dim=1) + layer.output.weight.float().pow(2).sum(dim=0)
            scores[i] = sq.sqrt()
    return scores


@torch.no_grad()
def remove_pruned(
    model: nn.Module, units: Mapping[int, Tensor], block: Mapping[int, float] | None = None
) -> nn.Module:
    """A NEW model of ``model``'s class without the pruned heads / neurons, computing what the gated model computes.

    ``units[i]``: the deterministic gate values of op-layer ``i`` (an MHA or FFN op-layer of
    ``model.raynas.layers``), a vector ``[heads]`` / ``[inner]`` in [0, 1]; ``block[i]``: its
    block gate in [0, 1] (missing: 1.0). A layer with a ``block`` entry but no ``units`` entry
    has all its units at 1. Units with gate value > 0 are kept; their gate values and the
    block gate are folded into the output projection (``dense`` / ``output``: weight scaled
    by ``block * units`` per column, bias by ``block``), which is why the result is exact
    rather than an approximation (see the module docstring). A layer with no unit kept, or
    ``block == 0``, becomes ``MHA(0, head_dim)`` / ``FFN(0)``, a ``RaynasEmptyBlock`` that
    computes ``LayerNorm(x + block * bias)`` -- not the identity. Other op-layers,
    embeddings, pooler, task head and config fields (``num_labels``, ``id2label``,
    ``problem_type``, ...) are copied unchanged; the new config is a new ``RaynasConfig``
    with per-layer sizes. The result is in eval mode, with ``model``'s dtype and device;
    ``model`` itself is not modified, and hooks or gate modules attached to it are not
    carried over.

    Raises ConfigError for a non-raynas model, a key that is not an MHA / FFN op-layer
    index, a gate vector of the wrong length, or a value outside [0, 1].
    """
    base, prefix = base_model(model)
    block = dict(block or {})
    gated = [*units, *(k for k in block if k not in units)]
    folded: dict[int, tuple[OpSpec, dict[str, Tensor]]] = {}
    for i in gated:
        layer = _gated_layer(base.layers, i, "units" if i in units else "block")
        count = layer.spec.heads if isinstance(layer, RaynasAttention) else layer.intermediate.out_features
        z = _units_of(layer, units[i], i) if i in units else torch.ones(count)
        b = _block_of(block[i], i) if i in block else 1.0
        folded[i] = _fold_mha(layer, z, b) if isinstance(layer, RaynasAttention) else _fold_ffn(layer, z, b)

    ops = [folded[i][0] if i in folded else spec_of(layer) for i, layer in enumerate(base.layers)]
    raw = model.config.to_dict()
    raw["layers"] = [op.to_dict() for op in ops]
    config = RaynasConfig.from_dict(raw)

    cls = type(model)
    kwargs = {}
    if "add_pooling_layer" in inspect.signature(cls.__init__).parameters:
        kwargs["add_pooling_layer"] = base.pooler is not None
    new = cls(config, **kwargs)
    param = next(model.parameters())
    new.to(device=param.device, dtype=param.dtype)

    source = model.state_dict()
    state = {}
    for key in new.state_dict():
        parts = key[len(prefix):].split(".", 2) if key.startswith(f"{prefix}layers.") else None
        if parts is not None and int(parts[1]) in folded:
            state[key] = folded[int(parts[1])][1][parts[2]]
        elif key in source:
            state[key] = source[key]
        else:  # the same class and config fields: every other tensor exists in the source
            raise ConfigError(f"{key}: missing from the source model's state dict")
    new.load_state_dict(state, strict=True)
    return new.eval()
