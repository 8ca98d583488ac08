"""Fine-tuning's resumable state, and the hooks through which other methods (pruning) extend the loop.

A checkpoint holds everything the next step depends on: the student (and the
hidden-state projection; never the frozen teacher), the optimizer, the schedule,
the hooks' own state (gates, multipliers, a fixed mask), every random generator,
and the data order -- the loader's generator state at the start of the current
epoch plus how many batches of it were done. A resumed run therefore continues
exactly as an uninterrupted one would (tested with ``torch.equal`` on the weights),
which is what makes a killed hour-long pruning trial worth restarting rather than
rerunning. Written atomically; removed when the run finishes.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from raynas.atomic_io import atomic_file

CHECKPOINT = "finetune-checkpoint.pt"
FAULT_ENV = "RAYNAS_FAULT_FINETUNE_STEP"  # "N": raise once right after step N's checkpoint (fault tests)


class TrainingHooks(Protocol):
    """What another method adds to the fine-tuning loop, so it trains with the same loss, optimizer and schedule.

    ``prepare`` may replace the loaded model (pruning converts it and attaches gates)
    and gets the step count; ``loss`` is added to each step's loss; ``after_step``
    runs after the optimizer step (its own parameters, its phase changes);
    ``evaluating(True/False)`` brackets every evaluation; ``status`` is appended to
    the log lines and merged into the results; ``state_dict`` / ``load_state_dict``
    go into and come out of checkpoints.
    """

    def prepare(self, model: nn.Module, total_steps: int, device: torch.device) -> nn.Module: ...

    def loss(self, step: int) -> Tensor | None: ...

    def after_step(self, step: int) -> None: ...

    def evaluating(self, on: bool) -> None: ...

    def status(self) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class Resume:
    step: int
    in_epoch: int  # batches of the current epoch already trained
    epoch_state: Tensor  # the loader generator's state when the current epoch began
    train_time: float
    losses: list[float] = field(default_factory=list)  # the current epoch's step losses so far


def _rng() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(path: Path, objective: nn.Module, optimizer: Any, schedule: Any, hooks: TrainingHooks | None,
               resume: Resume) -> None:
    """Write the checkpoint atomically (a crash mid-write leaves the previous one)."""
    state = {
        "model": {k: v for k, v in objective.state_dict().items() if not k.startswith("teacher.")},
        "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
        "hooks": hooks.state_dict() if hooks is not None else None, "rng": _rng(),
        "resume": {"step": resume.step, "in_epoch": resume.in_epoch, "epoch_state": resume.epoch_state,
                   "train_time": resume.train_time, "losses": resume.losses},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        torch.save(state, tmp)


def load_state(path: Path, objective: nn.Module, optimizer: Any, schedule: Any,
               hooks: TrainingHooks | None) -> Resume | None:
    """Restore a checkpoint into the freshly built run; None when there is none."""
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    missing, unexpected = objective.load_state_dict(state["model"], strict=False)
    missing = [k for k in missing if not k.startswith("teacher.")]
    if missing or unexpected:
        raise RuntimeError(f"{path}: not a checkpoint of this run (missing {missing[:3]}, unexpected {unexpected[:3]})")
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    if hooks is not None and state["hooks"] is not None:
        hooks.load_state_dict(state["hooks"])
    _set_rng(state["rng"])
    return Resume(**state["resume"])


def injected_fault(step: int, path: Path | None) -> None:
    """Fault tests: fail once, right after the checkpoint of step ``RAYNAS_FAULT_FINETUNE_STEP``."""
    spec = os.environ.get(FAULT_ENV, "")
    if not spec or path is None or step != int(spec):
        return
    marker = path.with_name(f".fault-{step}")
    if not marker.exists():
        marker.write_text(str(os.getpid()))
        raise RuntimeError(f"injected fault after step {step} ({FAULT_ENV})")
