"""Fine-tuning's resumable state, and the hooks through which other methods (pruning) extend the loop.

A checkpoint holds everything the next step depends on: the student (and the
hidden-state projection; never the frozen teacher), the optimizer, the schedule,
the hooks' own state (gates, multipliers, a fixed mask), every random generator,
and the data order -- the loader's generator state at the start of the current
epoch plus how many batches of it were done. A resumed run therefore continues
exactly as an uninterrupted one would (tested with ``torch.equal`` on the weights),
which is what makes a killed hour-long pruning trial worth restarting rather than
rerunning. Removed when the run finishes (:func:`remove_state`).

Written complete or not at all (temp file, fsync, rename), and the one before
is kept beside it (``finetune-checkpoint.prev.pt``, a hard link until the new
one replaces it, so no extra copy is written): a checkpoint damaged after the
fact (a truncated file) is detected when loading and the previous one is used,
with a warning. A full disk while writing stops the job with one line
(:class:`~raynas.training.checkpoints.CheckpointWriteError`), the previous
checkpoint intact.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from raynas.atomic_io import atomic_file
from raynas.training.checkpoints import classify

CHECKPOINT, PREVIOUS = "finetune-checkpoint.pt", "finetune-checkpoint.prev.pt"
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


def previous_path(path: Path) -> Path:
    """The checkpoint before ``path`` (kept until the next one is written, for a damaged ``path``)."""
    return path.with_name(PREVIOUS) if path.name == CHECKPOINT else path.with_name(f"{path.stem}.prev{path.suffix}")


def save_state(path: Path, objective: nn.Module, optimizer: Any, schedule: Any, hooks: TrainingHooks | None,
               resume: Resume) -> None:
    """Write the checkpoint atomically and durably; the one it replaces becomes the previous one.

    Order: the current file is hard-linked as the previous one, then the new one is written to a temp name,
    fsync'd and renamed over it; a crash anywhere leaves ``path`` whole (old or new).
    """
    state = {
        "model": {k: v for k, v in objective.state_dict().items() if not k.startswith("teacher.")},
        "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
        "hooks": hooks.state_dict() if hooks is not None else None, "rng": _rng(),
        "resume": {"step": resume.step, "in_epoch": resume.in_epoch, "epoch_state": resume.epoch_state,
                   "train_time": resume.train_time, "losses": resume.losses},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = previous_path(path)
    try:
        if path.is_file():
            previous.unlink(missing_ok=True)
            try:
                os.link(path, previous)
            except OSError:  # a file system without hard links
                shutil.copyfile(path, previous)
        with atomic_file(path) as tmp, tmp.open("wb") as f:
            torch.save(state, f)  # a Python file: a full disk raises OSError(ENOSPC), not torch's "unexpected pos"
    except (OSError, RuntimeError) as exc:
        kept = "previous checkpoint intact" if path.is_file() else "no earlier checkpoint"
        err = classify(exc, f"{path.name} (step {resume.step})", path.parent, kept, shutil.disk_usage(path.parent).free)
        if err is None:
            raise
        raise err from None


def _read(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(state, None), or (None, why it cannot be loaded)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False), None
    except Exception as exc:  # noqa: BLE001 -- torch raises RuntimeError, EOFError, UnpicklingError, ... for a cut file
        text = str(exc).strip()
        return None, f"{type(exc).__name__}: {text.splitlines()[0] if text else 'unreadable'}"


def _usable(path: Path) -> dict[str, Any] | None:
    """The checkpoint to resume from: ``path``, or the previous one (a warning line) when ``path`` is damaged."""
    state, problem = _read(path)
    if state is not None:
        return state
    previous = previous_path(path)
    state, why = _read(previous) if previous.is_file() else (None, None)
    then = (f"resuming from the previous one ({previous.name}, step {state['resume']['step']})" if state is not None
            else "no earlier checkpoint: starting from step 0" if why is None
            else f"the previous one is too ({why}): starting from step 0")
    print(f"warning: checkpoint {path.name} in {path.parent} is corrupt ({problem}); {then}", file=sys.stderr)
    if state is not None:  # the good one becomes current again (atomically): the next save keeps it as previous
        tmp = path.with_name(f".{path.name}.relink")
        tmp.unlink(missing_ok=True)
        os.link(previous, tmp)
        os.replace(tmp, path)
    return state


def load_state(path: Path, objective: nn.Module, optimizer: Any, schedule: Any,
               hooks: TrainingHooks | None) -> Resume | None:
    """Restore a checkpoint into the freshly built run; None when there is none (or none undamaged).

    A previous checkpoint without a current one is a finished run's leftover (``save_state`` never leaves
    that state): it is removed, not resumed from.
    """
    if not path.is_file():
        previous_path(path).unlink(missing_ok=True)
        return None
    state = _usable(path)
    if state is None:
        return None
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


def remove_state(path: Path) -> None:
    """The run is done: its result, not its checkpoints, is what is kept (the current and the previous)."""
    path.unlink(missing_ok=True)
    previous_path(path).unlink(missing_ok=True)


def injected_fault(step: int, path: Path | None) -> None:
    """Fault tests: fail once, right after the checkpoint of step ``RAYNAS_FAULT_FINETUNE_STEP``."""
    spec = os.environ.get(FAULT_ENV, "")
    if not spec or path is None or step != int(spec):
        return
    marker = path.with_name(f".fault-{step}")
    if not marker.exists():
        marker.write_text(str(os.getpid()))
        raise RuntimeError(f"injected fault after step {step} ({FAULT_ENV})")
