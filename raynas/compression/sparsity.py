"""Unstructured and block sparsity as hooks of the fine-tuning loop: gradual magnitude pruning (+ group lasso).

Structured pruning (:mod:`raynas.compression.pruner`) removes whole heads and
neurons, so the smaller model is faster everywhere. Sparsity keeps every matrix's
shape and zeroes entries instead: it reaches much higher fractions at the same
accuracy, and what it buys is size (the packed format stores only kept entries,
see :mod:`raynas.compression.encoding`), and speed only where a kernel skips the
zero blocks -- which :func:`block_sparse_copy` exists to *measure*, not to assume.

- Gradual pruning (Zhu & Gupta 2017, "To prune, or not to prune"): every prunable
  weight gets a mask; every ``frequency`` steps between ``start_fraction`` and
  ``end_fraction`` of the run the mask is recomputed at the cubic schedule's
  sparsity (:func:`cubic_sparsity`: prune fast while the network has redundancy,
  slowly as it approaches the target), by magnitude; the rest of the run trains
  with the masks fixed. Every matrix gets the same sparsity (their recipe) and a
  pruned entry never comes back (the weight is multiplied by its mask after every
  optimizer step, so AdamW's momentum cannot revive it).
- Block pruning (Narang et al. 2017, "Block-sparse recurrent neural networks"):
  the same, but the unit is a ``bh x bw`` block scored by its L2 norm (1x1 is
  plain magnitude; ``row`` / ``column`` are whole output neurons / input
  columns), with an optional group-lasso term lambda * mean over blocks of
  ||W_block||_2 that pushes whole blocks towards zero before they are cut.

Masks live in the hooks (their state_dict, with the step), not in the model, so a
saved model is an ordinary transformers model whose pruned weights are exact zeros.

Pure torch; no Ray.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from raynas.compression.encoding import Encoded, compressible_modules
from raynas.errors import ConfigError, require

_BLOCK_RE = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*$")


def cubic_sparsity(step: int, start: int, end: int, initial: float, final: float) -> float:
    """Zhu & Gupta's schedule: s_t = final + (initial - final) * (1 - (t - start) / (end - start))^3.

    ``initial`` before ``start``, ``final`` from ``end`` on (also when ``end <= start``).
    """
    if step < start:
        return initial
    if step >= end:
        return final
    return final + (initial - final) * (1.0 - (step - start) / (end - start)) ** 3


def parse_block(block: Any) -> tuple[int, int] | str:
    """``[bh, bw]`` / ``"bhxbw"`` -> (bh, bw); ``"row"`` / ``"column"`` stay strings (ConfigError otherwise)."""
    if isinstance(block, str):
        if block in ("row", "column"):
            return block
        match = _BLOCK_RE.match(block)
        require(match is not None, f"sparsify.block: expected 'BHxBW' (e.g. '4x4'), 'row', 'column' or [bh, bw], "
                                   f"got {block!r}")
        assert match is not None
        shape = (int(match.group(1)), int(match.group(2)))
    else:
        ok = (isinstance(block, (list, tuple)) and len(block) == 2
              and all(isinstance(b, int) and not isinstance(b, bool) for b in block))
        require(ok, f"sparsify.block: expected 'BHxBW', 'row', 'column' or [bh, bw], got {block!r}")
        shape = (int(block[0]), int(block[1]))
    require(shape[0] >= 1 and shape[1] >= 1, f"sparsify.block: block sides must be >= 1, got {block!r}")
    return shape


def block_shape(block: Any, shape: tuple[int, ...] | torch.Size) -> tuple[int, int]:
    """The (bh, bw) block of ``block`` for a weight of ``shape`` (``row`` = (1, cols), ``column`` = (rows, 1))."""
    parsed = parse_block(block)
    rows, cols = int(shape[0]), int(shape[1])
    if parsed == "row":
        return (1, cols)
    if parsed == "column":
        return (rows, 1)
    assert isinstance(parsed, tuple)
    return parsed


@dataclass
class SparsifySettings:
    """How to sparsify; every field JSON-able (a Tune trial config carries them)."""

    sparsity: float = 0.8  # final fraction of zeros in every prunable matrix, in [0, 1)
    initial_sparsity: float = 0.0
    block: list[int] | str = "1x1"  # [bh, bw] | "BHxBW" | "row" (output neurons) | "column" (input columns)
    start_fraction: float = 0.0  # share of the run's steps before the first mask update
    end_fraction: float = 0.7  # share of the run's steps when the final sparsity is reached; the rest trains fixed
    frequency: int = 10  # steps between mask updates
    group_lasso: float = 0.0  # lambda of the mean over blocks of ||W_block||_2
    embeddings: bool = False  # prune the word / position embeddings too

    def check(self, model: nn.Module | None = None) -> None:
        """Each field's range; with ``model``, also that the block tiles every prunable weight."""
        require(isinstance(self.sparsity, (int, float)) and 0.0 <= self.sparsity < 1.0,
                f"sparsify.sparsity: expected in [0, 1), got {self.sparsity!r}")
        require(isinstance(self.initial_sparsity, (int, float)) and 0.0 <= self.initial_sparsity <= self.sparsity,
                f"sparsify.initial_sparsity: expected in [0, sparsity], got {self.initial_sparsity!r}")
        parse_block(self.block)
        require(isinstance(self.start_fraction, (int, float)) and 0.0 <= self.start_fraction <= 1.0,
                f"sparsify.start_fraction: expected in [0, 1], got {self.start_fraction!r}")
        require(isinstance(self.end_fraction, (int, float)) and self.start_fraction <= self.end_fraction <= 1.0,
                f"sparsify.end_fraction: expected in [start_fraction, 1], got {self.end_fraction!r}")
        require(isinstance(self.frequency, int) and not isinstance(self.frequency, bool) and self.frequency >= 1,
                f"sparsify.frequency: expected an integer >= 1, got {self.frequency!r}")
        require(isinstance(self.group_lasso, (int, float)) and self.group_lasso >= 0.0,
                f"sparsify.group_lasso: expected >= 0, got {self.group_lasso!r}")
        require(isinstance(self.embeddings, bool), f"sparsify.embeddings: expected true/false, got {self.embeddings!r}")
        if model is None:
            return
        modules = compressible_modules(model, embeddings=self.embeddings)
        require(bool(modules), "sparsify: the model has no prunable weights")
        for name, module in modules.items():
            shape = tuple(module.weight.shape)
            bh, bw = block_shape(self.block, shape)
            require(shape[0] % bh == 0 and shape[1] % bw == 0,
                    f"sparsify.block: {bh}x{bw} does not tile {name}.weight of shape {shape[0]}x{shape[1]}")


def block_norms(weight: Tensor, block: tuple[int, int]) -> Tensor:
    """The L2 norm of every (bh x bw) block of a 2-D weight: shape (rows / bh, cols / bw)."""
    bh, bw = block
    rows, cols = weight.shape
    return torch.linalg.vector_norm(weight.reshape(rows // bh, bh, cols // bw, bw), dim=(1, 3))


def expand_blocks(block_mask: Tensor, block: tuple[int, int]) -> Tensor:
    """A per-block mask (rows / bh, cols / bw) as a per-entry mask (rows, cols)."""
    return block_mask.repeat_interleave(block[0], dim=0).repeat_interleave(block[1], dim=1)


def prune_blocks(weight: Tensor, mask: Tensor, block: tuple[int, int], sparsity: float) -> Tensor:
    """The new entry mask: the ``round(sparsity * blocks)`` lowest-norm blocks off, previously pruned ones first.

    Monotone: a block that ``mask`` already removed stays removed (the count never
    goes down either), so the schedule only ever adds zeros. Ties break by position
    (a stable sort), so the same weights always give the same mask.
    """
    bh, bw = block
    rows, cols = weight.shape
    norms = block_norms(weight.detach().float(), block).flatten()
    kept = mask.reshape(rows // bh, bh, cols // bw, bw)[:, 0, :, 0].flatten()
    n = norms.numel()
    count = max(round(sparsity * n), int((~kept).sum()))
    scores = torch.where(kept, norms, torch.full_like(norms, -1.0))  # norms >= 0: pruned blocks sort first
    order = torch.argsort(scores, stable=True)
    new = torch.ones(n, dtype=torch.bool, device=weight.device)
    new[order[:count]] = False
    return expand_blocks(new.reshape(rows // bh, cols // bw), block)


class Sparsifier:
    """:class:`raynas.evaluation.finetune_state.TrainingHooks` for gradual (block) pruning (see the module doc)."""

    def __init__(self, settings: SparsifySettings) -> None:
        settings.check()
        self.settings = settings
        self.modules: dict[str, nn.Module] = {}
        self.blocks: dict[str, tuple[int, int]] = {}
        self._masks: dict[str, Tensor] = {}
        self.step = 0
        self.start_step = self.end_step = 0
        self.target = 0.0  # the schedule's sparsity at the last mask update

    # ---- TrainingHooks ----------------------------------------------------------------------
    def prepare(self, model: nn.Module, total_steps: int, device: torch.device) -> nn.Module:
        s = self.settings
        s.check(model)
        self.modules = compressible_modules(model, embeddings=s.embeddings)
        self.blocks = {n: block_shape(s.block, m.weight.shape) for n, m in self.modules.items()}
        # on ``device``: the loop moves the model there after prepare (module objects, so these references hold)
        self._masks = {n: torch.ones(m.weight.shape, dtype=torch.bool, device=device) for n, m in self.modules.items()}
        self.start_step = round(s.start_fraction * total_steps)
        self.end_step = round(s.end_fraction * total_steps)
        self.step, self.target = 0, 0.0
        return model

    def loss(self, step: int) -> Tensor | None:
        """The group-lasso term: lambda * (sum over blocks of ||W_block||_2) / (number of blocks).

        Divided by the block count so one lambda means the same on a tiny and a full-size model.
        """
        lam = self.settings.group_lasso
        if lam == 0.0:
            return None
        total: Tensor | None = None
        count = 0
        for name, module in self.modules.items():
            block = self.blocks[name]
            # pruned blocks are exact zeros (masked after every step): they add 0, and the norm's gradient there is 0
            norms = block_norms(module.weight, block)
            term = norms.sum()
            total = term if total is None else total + term.to(total.device)
            count += norms.numel()
        assert total is not None
        return lam * total / count

    def after_step(self, step: int) -> None:
        self.step = step
        if self.updates_at(step):
            self.target = cubic_sparsity(step, self.start_step, self.end_step, self.settings.initial_sparsity,
                                         self.settings.sparsity)
            with torch.no_grad():
                for name, module in self.modules.items():
                    self._masks[name] = prune_blocks(module.weight, self._masks[name], self.blocks[name], self.target)
        self.apply()

    def evaluating(self, on: bool) -> None:
        return None  # the weights are masked after every step: what is evaluated is what is saved

    def status(self) -> dict[str, float]:
        return {"sparsity": self.achieved_sparsity()}

    def state_dict(self) -> dict[str, Any]:
        return {"masks": dict(self._masks), "step": self.step, "target": self.target}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        masks = state["masks"]
        if set(masks) != set(self.modules):
            raise RuntimeError("sparsify: the checkpoint's masks are not those of this model's prunable weights")
        self._masks = {n: masks[n].to(device=self.modules[n].weight.device, dtype=torch.bool) for n in self.modules}
        self.step, self.target = int(state["step"]), float(state["target"])

    # ---- the masks --------------------------------------------------------------------------
    def updates_at(self, step: int) -> bool:
        """Whether the masks are recomputed after ``step``: every ``frequency`` steps from the first step at or
        after ``start`` up to ``end``, and at ``end`` itself (so the final sparsity is always reached).

        A function of the step alone, so a resumed run updates at the same steps.
        """
        first = max(self.start_step, 1)  # after_step sees steps 1, 2, ...
        last = max(self.end_step, first)
        return first <= step <= last and ((step - first) % self.settings.frequency == 0 or step == last)

    def apply(self) -> None:
        """Zero every pruned entry (``weight.data *= mask``)."""
        with torch.no_grad():
            for name, module in self.modules.items():
                module.weight.data.mul_(self._masks[name])

    def masks(self) -> dict[str, Tensor]:
        """The current masks by module name (bool, the weight's shape; True = kept)."""
        return dict(self._masks)

    def achieved_sparsity(self) -> float:
        """The fraction of exact zeros over all prunable weights (measured on the weights, not the masks)."""
        zeros = sum(int((m.weight == 0).sum()) for m in self.modules.values())
        total = sum(m.weight.numel() for m in self.modules.values())
        return zeros / total if total else 0.0

    def encoded(self, model: nn.Module) -> dict[str, Encoded]:
        """Every prunable weight of ``model`` as a masked fp32 :class:`Encoded` (for the packed format)."""
        modules = compressible_modules(model, embeddings=self.settings.embeddings)
        if set(modules) != set(self._masks):
            raise ConfigError("sparsify: the model's prunable weights are not those the masks were made for")
        return {n: Encoded("float", 32, m.weight.detach().float().clone(), mask=self._masks[n].to(m.weight.device))
                for n, m in modules.items()}


class BSRLinear(nn.Module):
    """A Linear whose weight is a BSR block-sparse tensor, computed by the MKL sparse kernel on CPU.

    ``y = addmm(b, W_bsr, x^T)^T``: the sparse matrix on the left, which is the form
    torch's CPU sparse kernels (MKL sparse BLAS) implement; square blocks only (MKL
    refuses others: "doesn't support matrices with non-square blocks"); no bf16 kernel.
    For timing only: no backward, float32.
    """

    def __init__(self, linear: nn.Linear, mask: Tensor, block: tuple[int, int]) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = (linear.weight.detach() * mask.to(linear.weight.device)).float()
        self.weight = weight.to_sparse_bsr(block)
        bias = linear.bias.detach().float() if linear.bias is not None else torch.zeros(self.out_features)
        self.register_buffer("bias", bias.reshape(-1, 1).contiguous())

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features)
        out = torch.addmm(self.bias, self.weight, flat.t())
        return out.t().reshape(*x.shape[:-1], self.out_features)


def block_sparse_copy(model: nn.Module, masks: dict[str, Tensor], block: Any) -> nn.Module:
    """A deep copy of ``model`` whose masked Linear layers compute with BSR weights (the rest dense, masked).

    Its outputs equal the dense masked model's (to float rounding); it exists to
    *time* whether block sparsity is a speedup on CPU. ConfigError where no CPU BSR
    kernel exists: a non-square block (``row``, ``column``, 4x8, ...), a model not
    on the CPU or not float32, or a block that does not tile a weight.
    """
    clone = copy.deepcopy(model).eval()
    modules = dict(clone.named_modules())
    for name, mask in masks.items():
        require(name in modules, f"block_sparse_copy: the model has no module {name!r}")
        module = modules[name]
        weight = module.weight
        if not isinstance(module, nn.Linear):  # embeddings: a lookup, nothing to multiply; keep it dense, masked
            with torch.no_grad():
                weight.mul_(mask.to(weight.device))
            continue
        bh, bw = block_shape(block, weight.shape)
        require(bh == bw, f"sparsify.block: no CPU BSR kernel for non-square blocks ({bh}x{bw} on {name}: "
                          f"MKL supports square blocks only)")
        require(weight.shape[0] % bh == 0 and weight.shape[1] % bw == 0,
                f"sparsify.block: {bh}x{bw} does not tile {name}.weight of shape "
                f"{weight.shape[0]}x{weight.shape[1]}")
        require(weight.device.type == "cpu" and weight.dtype == torch.float32,
                f"block_sparse_copy: BSR kernels need a float32 CPU model ({name} is {weight.dtype} on "
                f"{weight.device})")
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else clone, child, BSRLinear(module, mask, (bh, bw)))
    return clone
