"""What an engine trains: the student (a supernet or a plain masked-LM model) plus the objective's own weights.

DeepSpeed and DDP each own exactly one module, and the hidden-state projection
of distillation must be optimised, checkpointed and all-reduced with the
student, so both live in :class:`TrainStudent`. :class:`GradientAccumulator`
lets every data-parallel worker train *different* sub-models in one step (paper
Algorithm 1) under ZeRO: see its docstring. :func:`evaluate` is the validation
loss a worker reports. Pure torch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from raynas.training.objectives import Batch, SupernetObjective, TeacherOutput
from raynas.training.optim import Placement
from raynas.training.validation import batch_major_means

Tensor = torch.Tensor


class TrainStudent(nn.Module):
    """``net`` (a :class:`~raynas.supernet.Supernet` or any ``*ForMaskedLM``) and its objective, as one module."""

    def __init__(self, net: nn.Module, objective: SupernetObjective) -> None:
        super().__init__()
        self.net, self.objective = net, objective
        self.elastic = hasattr(net, "set_active")

    def forward(self, batch: Batch, arch: Any = None, teacher_out: TeacherOutput | None = None
                ) -> tuple[Tensor, dict[str, float], Any]:
        """Loss, its terms and the model output of ``arch`` (ignored for a plain model) on ``batch``."""
        if arch is not None and not self.elastic:
            raise ValueError("a plain model has no archs to activate: pass arch=None")
        return self.objective(self.net, batch, teacher_out, return_output=True, arch=arch)


class GradientAccumulator:
    """Sum the gradients of several sub-models off the engine's hooks; hand them over in one fixed-order backward.

    ZeRO-1/2 reduce gradients in buckets as backward produces them, so every
    rank must produce the same gradients in the same order. Different archs per
    rank break that (different layers, different order: a collective mismatch).
    Here each sub-model's loss goes through ``torch.autograd.grad`` (which does
    not fire the engine's post-accumulate hooks) into per-parameter buffers;
    :meth:`surrogate` then returns ``sum_p <p, g_p>``, whose backward gives
    every parameter exactly ``g_p``, through the same graph on every rank.
    Parameters no sub-model touched get an exact zero.
    """

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.buffers: list[Tensor] | None = None
        self.count = 0

    def add(self, loss: Tensor, scale: float = 1.0) -> None:
        grads = torch.autograd.grad(loss * scale if scale != 1.0 else loss, self.params, allow_unused=True)
        if self.buffers is None:
            self.buffers = [torch.zeros_like(p) for p in self.params]
        with torch.no_grad():
            for buf, g in zip(self.buffers, grads):
                if g is not None:
                    buf.add_(g)
        self.count += 1

    def surrogate(self) -> Tensor:
        """A scalar whose gradient w.r.t. each parameter is its accumulated gradient; resets the count."""
        if self.buffers is None:
            raise RuntimeError("nothing accumulated: call add() before surrogate()")
        total = torch.stack([(p * buf).sum() for p, buf in zip(self.params, self.buffers)]).sum()
        self.count = 0
        return total

    def zero(self) -> None:
        if self.buffers is not None:
            for buf in self.buffers:
                buf.zero_()


def evaluate(student: TrainStudent, archs: dict[str, Any], batches: list[Batch],
             placement: Placement) -> dict[str, float]:
    """``val_loss_<name>``: the objective (MLM, or the KD loss) per named arch, dropout off, on fixed batches.

    The batches (built on the CPU) go to ``placement.device``, forwards run under
    its autocast, as the training step's do. Batch-major, so a KD teacher runs
    once per batch for every arch (the loop of :func:`raynas.training.validation.validation_losses`,
    the proxy fitness search ranks by: training reports the same number). Archs
    run through ``forward(arch=)``; the train/eval mode is restored, the caller
    being mid-training.
    """
    was_training = student.training
    student.eval()
    try:
        # through the student's own forward: under ZeRO-3 that is where DeepSpeed gathers the weights
        results = batch_major_means(lambda b, arch: student(b, arch)[1], list(archs.values()), batches, placement)
    finally:
        student.train(was_training)
    return {f"val_loss_{name}": r["loss"] for name, r in zip(archs, results, strict=True)}
