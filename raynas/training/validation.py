"""Validation loss of many archs on one fixed validation set: the proxy fitness of search and ranking.

AutoTinyBERT's search scores each candidate by the loss of its sub-model
*inherited* from the trained supernet, on held-out data, with the same
objective the supernet was trained with (MLM, or distillation from the
teacher). Thousands of candidates are scored per search, so:

- the loop is batch-major: each validation batch is moved to the device once
  and a KD teacher runs once per batch (its :class:`TeacherCache` keys on the
  batch object), shared by every arch;
- archs run through ``Supernet.forward(..., arch=a)``, which writes no shared
  state, so one supernet instance serves concurrent callers (threads, or tasks
  of a Ray actor) without a lock.

Pure torch: no Ray here. Supernet training's periodic validation uses the
same function, so what training reports and what search ranks by cannot
drift apart.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Sequence

import torch
from torch import nn

from raynas.training.objectives import Batch, SupernetObjective

Tensor = torch.Tensor


def to_device(batch: Batch, device: torch.device | str | None) -> dict[str, Tensor]:
    """``batch`` with every tensor on ``device`` (unchanged where it is already there, or ``device`` is None)."""
    if device is None:
        return dict(batch)
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


def _runner(net: nn.Module, arch: Any) -> Callable[..., Any]:
    """``net`` restricted to ``arch``, called like a model: no ``set_active``, so nothing shared is written."""
    if arch is None:
        return net
    if not hasattr(net, "set_active"):
        raise ValueError(f"{type(net).__name__} is a plain model: it has no archs (pass archs=[None])")
    return partial(net, arch=arch)


@torch.no_grad()
def validation_losses(
    net: nn.Module,
    archs: Sequence[Any],
    batches: Sequence[Batch],
    objective: SupernetObjective | None = None,
    device: torch.device | str | None = None,
) -> list[dict[str, float]]:
    """Per arch, the mean over ``batches`` of the objective's loss and of each of its terms.

    ``net``: a :class:`~raynas.supernet.Supernet` (``archs`` in its space, strings
    or parsed) or a plain masked-LM model (``archs=[None]``); it must be in eval
    mode (dropout off): this function changes nothing on it, so the caller owns
    that switch. ``objective`` defaults to MLM (batches then need ``labels``); a
    KD objective carries its teacher, which must already be on ``device``.
    Returns one ``{"loss": ..., <term>: ...}`` dict per arch, in order.
    """
    if net.training:
        raise ValueError("validation_losses: put the net in eval mode first (dropout would make losses random)")
    if not batches:
        raise ValueError("validation_losses: no validation batches")
    objective = objective if objective is not None else SupernetObjective("mlm")
    runners = [_runner(net, arch) for arch in archs]
    sums: list[dict[str, float]] = [{} for _ in archs]
    for raw in batches:  # batch-major: one device copy and one teacher forward per batch, for every arch
        batch = to_device(raw, device)
        for run, acc in zip(runners, sums):
            _, terms = objective(run, batch)
            for name, value in terms.items():
                acc[name] = acc.get(name, 0.0) + value
    return [{name: total / len(batches) for name, total in acc.items()} for acc in sums]
