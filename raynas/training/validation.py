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

import contextlib
from typing import Any, Callable, Sequence

import torch
from torch import nn

from raynas.training.objectives import Batch, SupernetObjective
from raynas.training.optim import Placement

Tensor = torch.Tensor


def validation_losses(
    net: nn.Module,
    archs: Sequence[Any],
    batches: Sequence[Batch],
    objective: SupernetObjective | None = None,
    placement: Placement | None = None,
) -> list[dict[str, float]]:
    """Per arch, the mean over ``batches`` of the objective's loss and of each of its terms.

    ``net``: a :class:`~raynas.supernet.Supernet` (``archs`` in its space, strings
    or parsed) or a plain masked-LM model (``archs=[None]``); it must be in eval
    mode (dropout off): this function changes nothing on it, so the caller owns
    that switch. ``objective`` defaults to MLM (batches then need ``labels``); a
    KD objective carries its teacher. ``placement``: the device the net is on
    (batches are moved there) and the autocast its forwards run under; default:
    batches as given, no autocast. Returns one ``{"loss": ..., <term>: ...}`` dict
    per arch, in order.
    """
    if net.training:
        raise ValueError("validation_losses: put the net in eval mode first (dropout would make losses random)")
    if any(arch is not None for arch in archs) and not hasattr(net, "set_active"):
        raise ValueError(f"{type(net).__name__} is a plain model: it has no archs (pass archs=[None])")
    objective = objective if objective is not None else SupernetObjective("mlm")
    return batch_major_means(lambda batch, arch: objective(net, batch, arch=arch)[1], archs, batches, placement)


@torch.no_grad()
def batch_major_means(
    terms_of: Callable[[Batch, Any], dict[str, float]],
    archs: Sequence[Any],
    batches: Sequence[Batch],
    placement: Placement | None = None,
) -> list[dict[str, float]]:
    """Per arch, the mean over ``batches`` of ``terms_of(batch, arch)`` (a dict of loss terms).

    The loop behind :func:`validation_losses`, for callers that must score
    through their own module (supernet training scores through its
    ``TrainStudent``, whose forward is where ZeRO-3 gathers the weights).
    """
    if not batches:
        raise ValueError("validation: no validation batches")
    sums: list[dict[str, float]] = [{} for _ in archs]
    autocast = placement.autocast() if placement is not None else contextlib.nullcontext()
    with autocast:
        for raw in batches:  # batch-major: one device copy and one teacher forward per batch, for every arch
            batch = placement.batch(raw) if placement is not None else raw
            for arch, acc in zip(archs, sums):
                for name, value in terms_of(batch, arch).items():
                    acc[name] = acc.get(name, 0.0) + value
    return [{name: total / len(batches) for name, total in acc.items()} for acc in sums]
