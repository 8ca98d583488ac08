"""Training one student block on its teacher pairs, and scoring its candidate paths.

NAS-BERT trains each block on its own: block ``k`` is fed the teacher's hidden
states at the input of teacher block ``k`` and learns to reproduce the
teacher's hidden states at its output (MSE), one random path through the block
per step. Because blocks are independent, each can run anywhere (a Ray actor of
its own, see :mod:`raynas.orchestration.blockwise_tune`); this module is the
pure-torch loop they all run.

Every step draws its path and its rows from generators seeded by ``(seed,
block, step)``, and dropout from the same seed, so a block resumed from a
checkpoint at step ``s`` continues exactly as an uninterrupted run would: the
shrinking decisions (which paths survive) do not depend on where a run was
killed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from raynas.training.optim import Placement, adamw, lr_lambda

Tensor = torch.Tensor
Path_ = tuple[str, ...]


def block_mse(pred: Tensor, target: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean squared error over hidden features, averaged over real (unpadded) tokens only."""
    err = (pred.float() - target.float()).pow(2).mean(dim=-1)
    keep = attention_mask.to(err.dtype)
    return (err * keep).sum() / keep.sum().clamp_min(1.0)


@dataclass
class BlockData:
    """One block's teacher pairs: ``(inputs, outputs, mask)`` for training and for held-out validation."""

    train_in: Tensor
    train_out: Tensor
    train_mask: Tensor
    val_in: Tensor
    val_out: Tensor
    val_mask: Tensor

    @classmethod
    def from_numpy(cls, train: tuple[np.ndarray, np.ndarray, np.ndarray],
                   val: tuple[np.ndarray, np.ndarray, np.ndarray]) -> BlockData:
        """Zero-copy where numpy allows (read-only object-store buffers are copied once, not per step)."""
        def t(a: np.ndarray) -> Tensor:
            return torch.from_numpy(np.ascontiguousarray(a) if a.flags.writeable else np.array(a))
        return cls(*(t(a) for a in train), *(t(a) for a in val))


def _step_seed(seed: int, block: int, step: int) -> int:
    return (seed * 1_000_003 + block * 10_007 + step) % (2**63 - 1)


class BlockTrainer:
    """AdamW + warm-up/decay over a :class:`~raynas.blockwise.blocks.StudentBlock`, steps and scores.

    ``total_steps`` is the whole schedule of the block (every shrinking stage),
    so the learning rate decays across stages rather than restarting at each.
    """

    def __init__(self, block: Any, data: BlockData, *, lr: float, weight_decay: float, total_steps: int,
                 warmup_ratio: float, batch_size: int, seed: int, index: int,
                 placement: Placement | None = None) -> None:
        self.placement = placement or Placement(torch.device("cpu"))
        self.block, self.data = block.to(self.placement.device), data
        self.batch_size, self.seed, self.index = batch_size, seed, index
        self.optimizer = adamw(self.block, lr, weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(total_steps, warmup_ratio))
        self.step = 0

    def _batch(self, rows: Tensor, split: str) -> tuple[Tensor, Tensor, Tensor]:
        d = self.data
        src = (d.train_in, d.train_out, d.train_mask) if split == "train" else (d.val_in, d.val_out, d.val_mask)
        return tuple(t[rows].to(self.placement.device, non_blocking=True) for t in src)  # type: ignore[return-value]

    def train_until(self, until: int, pool: Sequence[Path_], every: int = 0,
                    on_checkpoint: Callable[[BlockTrainer], None] | None = None,
                    on_log: Callable[[int, float], None] | None = None, log_every: int = 0) -> float:
        """Train from ``self.step`` to ``until`` on paths drawn from ``pool``; mean loss of those steps.

        ``on_checkpoint`` is called every ``every`` steps (and not at the end:
        the caller checkpoints the finished stage together with its scores).
        """
        if not pool:
            raise ValueError(f"block {self.index}: no path to train")
        n = self.data.train_in.shape[0]
        self.block.train()
        total, count = 0.0, 0
        while self.step < until:
            seed = _step_seed(self.seed, self.index, self.step)
            path = pool[random.Random(seed).randrange(len(pool))]
            rows = torch.randint(n, (min(self.batch_size, n),), generator=torch.Generator().manual_seed(seed))
            torch.manual_seed(seed)  # dropout
            h_in, h_out, mask = self._batch(rows, "train")
            with self.placement.autocast():
                loss = block_mse(self.block(h_in, mask, path), h_out, mask)
            self.optimizer.zero_grad(set_to_none=True)
            if loss.requires_grad:  # an all-identity path (no projections) has nothing to train
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.block.parameters(), 1.0)
                self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            total, count = total + float(loss.detach()), count + 1
            if on_log is not None and log_every and self.step % log_every == 0:
                on_log(self.step, total / count)
            if on_checkpoint is not None and every and self.step % every == 0 and self.step < until:
                on_checkpoint(self)
        return total / count if count else float("nan")

    @torch.no_grad()
    def score(self, paths: Sequence[Path_], batch_size: int = 32) -> dict[Path_, float]:
        """Validation MSE of each path on every held-out pair (token-weighted over the whole set)."""
        self.block.eval()
        n = self.data.val_in.shape[0]
        out: dict[Path_, float] = {}
        for path in paths:
            err, tokens = 0.0, 0.0
            for start in range(0, n, batch_size):
                rows = torch.arange(start, min(n, start + batch_size))
                h_in, h_out, mask = self._batch(rows, "val")
                with self.placement.autocast():
                    pred = self.block(h_in, mask, path)
                t = float(mask.sum())
                err += float(block_mse(pred, h_out, mask)) * t
                tokens += t
            out[tuple(path)] = err / max(tokens, 1.0)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"block": self.block.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.block.load_state_dict(state["block"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
