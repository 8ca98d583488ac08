"""What the training loops share: AdamW groups, the LR schedule, and where / in what precision a loop runs.

Pure torch, so the Ray/DeepSpeed engine and the plain fine-tuning loop build the
same optimizer from one definition instead of two that drift apart, and
fine-tuning and latency measurement read a ``device`` setting the same way.

Both loops use BERT's recipe: AdamW with no weight decay on biases and
normalisation weights, and a linear warmup followed by a linear decay to 0. The
two loops ramp the warmup differently, and both ramps are kept so that existing
results reproduce exactly (see :func:`linear_warmup_decay`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Mapping

import torch
from torch import nn

from raynas.errors import ConfigError

DEVICE_TYPES = ("cpu", "cuda")
PRECISIONS = ("fp32", "bf16", "auto")


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: decay on matrices, none on biases and norms (as BERT pre-training does).

    A tensor takes no decay when it is under 2-D (biases, LayerNorm weights) or
    its name says it is a norm, so a 2-D norm parameter is not decayed toward 0.
    Frozen parameters (a teacher inside the module, frozen embeddings) are left out.
    """
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(module: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; the one constructor both training loops call."""
    return torch.optim.AdamW(param_groups(module, weight_decay), lr=lr)


def linear_warmup_decay(total_steps: int, warmup_steps: int, *, ramp_from_zero: bool) -> Callable[[int], float]:
    """The LR multiplier at ``step``: linear warmup over ``warmup_steps``, then linear decay to 0 at ``total_steps``.

    ``ramp_from_zero=True`` is transformers' ``get_linear_schedule_with_warmup``
    (BERT's original code): step 0 runs at LR 0, step ``w`` reaches the peak.
    ``ramp_from_zero=False`` counts step 0 as the first warmup step (``(step + 1) / w``),
    so no step is spent at LR 0 -- what supernet pre-training uses. The decay is the
    same in both: ``(total - step) / (total - warmup)``, never negative.
    """
    shift = 0 if ramp_from_zero else 1

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return float(step + shift) / float(max(1, warmup_steps))
        return max(0.0, float(total_steps - step) / float(max(1, total_steps - warmup_steps)))

    return multiplier


def lr_lambda(steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """Supernet pre-training's schedule: at least one warmup step, step 0 already above LR 0."""
    return linear_warmup_decay(steps, max(1, int(steps * warmup_ratio)), ramp_from_zero=False)


def warmup_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float,
                    ramp_from_zero: bool = True) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over :func:`linear_warmup_decay` with ``int(warmup_ratio * total_steps)`` warmup steps.

    With the default ramp this equals transformers' ``get_linear_schedule_with_warmup``
    step for step (fine-tuning used that before; the equality is tested).
    """
    warmup = int(warmup_ratio * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer,
                                             linear_warmup_decay(total_steps, warmup, ramp_from_zero=ramp_from_zero))


# ---- device and precision ------------------------------------------------------------------
def resolve_device(name: str, field: str = "device") -> torch.device:
    """``auto``: cuda when this process sees a GPU (a Ray worker given one sees exactly it), else cpu.

    An explicit ``cuda`` without a visible GPU is an error here, before any model
    loads, rather than a CUDA error deep inside the first forward.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        raise ConfigError(f"{field}: expected auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{field}: {name} requested, but torch sees no GPU (use auto or cpu)")
    return device


def autocast_dtype(precision: str, device: torch.device, field: str = "precision") -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``; None means plain fp32.

    ``auto`` is bf16 on cuda and fp32 on cpu; bf16 on cpu is refused (CPU runs stay
    fp32, as DeepSpeed's CPU path does), so a config cannot silently run slower.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"{field}: expected one of {list(PRECISIONS)}, got {precision!r}")
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if device.type != "cuda":
        raise ConfigError(f"{field}: bf16 autocast needs a cuda device, got {device}")
    return torch.bfloat16


@dataclass(frozen=True)
class Placement:
    """Where a loop's models and batches live and which autocast its forwards run under: one object to pass."""

    device: torch.device
    amp_dtype: torch.dtype | None = None

    @classmethod
    def resolve(cls, device: str, precision: str = "fp32") -> Placement:
        where = resolve_device(device)
        return cls(where, autocast_dtype(precision, where))

    def batch(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every tensor of ``batch`` on the device (non-blocking: the loader pins memory on cuda)."""
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def autocast(self) -> ContextManager[Any]:
        """bf16 autocast when configured, else nothing (so fp32 runs are bit-identical to no autocast)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def synchronize(self) -> None:
        """Wait for queued GPU work, so a wall-clock reading covers it; a no-op on cpu."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
