"""Mixed precision: how many bits each part of the model gets, from measured sensitivity and a size budget.

Layers differ in how much a narrow grid hurts them (HAQ, Wang et al. 2019; HAWQ,
Dong et al. 2019): the embeddings and the first and last layers usually suffer
most. Instead of a learned policy we measure it directly and cheaply -- quantize
ONE group (a transformer layer, the embeddings, the pooler) at one width, keep
everything else fp32, and take the KL divergence of the quantized model's output
distribution from the fp32 one over a few batches (:func:`measure_sensitivity`).
Treating the groups' damages as additive, :func:`choose_bits` then narrows, one
step at a time, whichever group loses the least KL per bit saved until the
payload fits the budget -- the greedy answer to a knapsack whose items are
ordered bit-widths. :func:`plan_per_module` turns the per-group plan into the
per-module one :class:`raynas.compression.quantizers.KMeansSettings` takes.

Pure torch; no Ray.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from raynas.compression.encoding import INT_BITS, KMEANS_BITS, compressible_modules, payload_bits
from raynas.compression.quantizers import encode_weight
from raynas.errors import ConfigError, require

_LAYER = re.compile(r"(?:^|\.)layers?\.(\d+)\.")


def layer_groups(names: Iterable[str]) -> dict[str, list[str]]:
    """Module names by group: ``layer.N`` (from ``layer.N.`` / ``layers.N.``), ``embeddings``, ``pooler``.

    Anything else is a group of its own, named after the module. Groups come in
    the order their first module does.
    """
    groups: dict[str, list[str]] = {}
    for name in names:
        found = _LAYER.search(name)
        if found:
            group = f"layer.{found.group(1)}"
        elif "embeddings" in name.split("."):
            group = "embeddings"
        elif "pooler" in name.split("."):
            group = "pooler"
        else:
            group = name
        groups.setdefault(group, []).append(name)
    return groups


@dataclass
class MixedSettings:
    """Mixed precision: the candidate k-means widths, the size budget, the calibration set, the codebook training."""

    candidate_bits: list[int] = field(default_factory=lambda: [2, 3, 4, 8])
    size_fraction: float = 0.1  # of the fp32 payload of the encoded weights
    calibration_samples: int = 256  # train sentences the sensitivity is measured on
    iters: int = 100  # Lloyd iterations of each codebook
    train_codebook: bool = True

    def check(self) -> None:
        require(bool(self.candidate_bits), "candidate_bits: give at least one width")
        for b in self.candidate_bits:
            require(b in KMEANS_BITS, f"candidate_bits: {b!r} is not a supported width {KMEANS_BITS}")
        f = self.size_fraction
        require(isinstance(f, (int, float)) and 0 < f < 1,
                f"size_fraction: expected a fraction of the fp32 size in (0, 1), got {f!r}")
        narrowest = min(self.candidate_bits)
        require(32 * f >= narrowest, f"size_fraction: {f:g} of fp32 is {32 * f:.2f} bits per weight, below the "
                                     f"narrowest candidate width ({narrowest} bits)")
        require(isinstance(self.calibration_samples, int) and self.calibration_samples >= 1,
                f"calibration_samples: expected an integer >= 1, got {self.calibration_samples!r}")


def _logits(output: Any) -> list[Tensor]:
    logits = getattr(output, "logits", None)
    if logits is not None:
        return [logits]
    start, end = getattr(output, "start_logits", None), getattr(output, "end_logits", None)
    if start is not None and end is not None:
        return [start, end]
    raise ConfigError("mixed_precision: the model's output has neither logits nor start/end logits")


def _kl(reference: list[Tensor], quantized: list[Tensor]) -> float:
    """KL(p_fp32 || p_quantized) over the last dim, averaged over positions and over the logit tensors."""
    total = 0.0
    for ref, out in zip(reference, quantized):
        log_p = torch.log_softmax(ref.double(), dim=-1)
        log_q = torch.log_softmax(out.double(), dim=-1)
        total += float((log_p.exp() * (log_p - log_q)).sum(-1).mean().clamp_min(0))
    return total / len(reference)


@torch.no_grad()
def measure_sensitivity(model: nn.Module, batches: list[dict[str, Tensor]], candidate_bits: Iterable[int],
                        scheme: str = "kmeans", embeddings: bool = True) -> list[dict[str, Any]]:
    """One row per group x width: ``{"group", "bits", "kl", "bytes"}`` with only that group quantized.

    ``kl`` is KL(fp32 logits || quantized logits) averaged over ``batches`` (dicts the
    model takes; the logits are ``output.logits`` or the QA start / end logits);
    ``bytes`` is the group's payload at that width (:func:`payload_bits` / 8). The
    model runs in eval mode and its weights are restored exactly afterwards.
    """
    widths = sorted(set(int(b) for b in candidate_bits))
    require(scheme in ("kmeans", "int"), f"quantize.scheme: expected kmeans or int, got {scheme!r}")
    supported = KMEANS_BITS if scheme == "kmeans" else INT_BITS
    require(bool(widths) and all(b in supported for b in widths),
            f"quantize.candidate_bits: {scheme} supports {supported}, got {widths}")
    require(len(batches) > 0, "mixed_precision: at least one batch is needed")
    modules = compressible_modules(model, embeddings=embeddings)
    device = next(model.parameters()).device
    batches = [{k: v.to(device) if isinstance(v, Tensor) else v for k, v in b.items()} for b in batches]
    was_training = model.training
    model.eval()
    try:
        reference = [_logits(model(**b)) for b in batches]
        rows = []
        for group, names in layer_groups(modules).items():
            saved = {n: modules[n].weight.detach().clone() for n in names}
            try:
                for bits in widths:
                    encs = {n: encode_weight(saved[n], scheme, bits) for n in names}
                    for n, enc in encs.items():
                        modules[n].weight.copy_(enc.dequantize().to(saved[n].dtype))
                    kl = sum(_kl(ref, _logits(model(**b))) for ref, b in zip(reference, batches)) / len(batches)
                    rows.append({"group": group, "bits": bits, "kl": kl,
                                 "bytes": sum(payload_bits(e) for e in encs.values()) / 8})
            finally:
                for n, weight in saved.items():
                    modules[n].weight.copy_(weight)
    finally:
        model.train(was_training)
    return rows


def group_entries(model: nn.Module, groups: Mapping[str, list[str]]) -> dict[str, int]:
    """The number of weight entries of each group (a ``sizes`` for :func:`choose_bits`)."""
    modules = dict(model.named_modules())
    return {g: sum(modules[n].weight.numel() for n in names) for g, names in groups.items()}


def choose_bits(rows: list[dict[str, Any]], sizes: Mapping[str, int] | None, budget_bits: float) -> dict[str, int]:
    """The per-group widths that fit ``budget_bits``, losing as little summed KL as the greedy can.

    Every group starts at its widest measured width; while the payload is over the
    budget, the group whose next narrower width costs the least KL increase per bit
    saved takes that step (ties: the first group). The payload of a group at a
    width is ``sizes[group] * bits`` when ``sizes`` (entries per group, e.g.
    :func:`group_entries`) is given -- a bits-per-weight budget -- else the row's
    exact ``bytes * 8`` (codes + scales / codebook + mask). A budget below the
    narrowest width everywhere is a ConfigError.
    """
    table: dict[str, dict[int, dict[str, Any]]] = {}
    for row in rows:
        table.setdefault(row["group"], {})[int(row["bits"])] = row
    require(bool(table), "mixed_precision: no sensitivity rows")
    if sizes is not None:
        missing = [g for g in table if g not in sizes]
        require(not missing, f"mixed_precision: sizes lack the groups {missing[:3]}")

    def cost(group: str, bits: int) -> float:
        return float(sizes[group]) * bits if sizes is not None else 8.0 * float(table[group][bits]["bytes"])

    narrowest = sum(cost(g, min(widths)) for g, widths in table.items())
    require(narrowest <= budget_bits, f"quantize.budget_bits: {budget_bits:.0f} bits cannot hold the model even at "
                                      f"the narrowest widths ({narrowest:.0f} bits)")
    plan = {g: max(widths) for g, widths in table.items()}
    total = sum(cost(g, b) for g, b in plan.items())
    while total > budget_bits:
        best: tuple[float, str, int] | None = None
        for group, bits in plan.items():
            narrower = [b for b in table[group] if b < bits]
            if not narrower:
                continue
            nxt = max(narrower)
            saved = cost(group, bits) - cost(group, nxt)
            if saved <= 0:
                continue
            ratio = (float(table[group][nxt]["kl"]) - float(table[group][bits]["kl"])) / saved
            if best is None or ratio < best[0]:
                best = (ratio, group, nxt)
        if best is None:  # only steps that save nothing are left; cannot happen when the narrowest fits
            raise ConfigError(f"quantize.budget_bits: {budget_bits:.0f} bits cannot be reached")
        _, group, nxt = best
        total += cost(group, nxt) - cost(group, plan[group])
        plan[group] = nxt
    return plan


def plan_per_module(plan: Mapping[str, int], groups: Mapping[str, list[str]]) -> dict[str, int]:
    """A per-group plan as the per-module ``bits`` dict that :class:`KMeansSettings` takes."""
    unknown = [g for g in plan if g not in groups]
    require(not unknown, f"quantize.bits: the plan names unknown groups {unknown[:3]}")
    return {name: int(bits) for group, bits in plan.items() for name in groups[group]}
