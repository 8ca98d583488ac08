"""Performance approximation: rank whole models by the sum of their blocks' validation losses.

After shrinking, block ``k`` has a few surviving paths, each with its block
validation loss. NAS-BERT approximates a full model's quality by the sum of its
blocks' losses, so every combination of one survivor per block can be ranked
without training it; the combinations that fit a budget (checked by the same
:class:`~raynas.search.constraints.Constraint` ``raynas search`` uses, so
``20M`` means the same model size there and here) give the top-T candidates
that a short real training then decides between. One shrinking run answers
many budgets.

The enumeration is exact. For params and FLOPs constraints the cost of an arch
is a constant plus one number per block, so all combinations are costed and
ranked with numpy in chunks (4 blocks x 20 survivors = 160k combinations take
milliseconds); other constraints (latency predictors) walk the combinations in
loss order and ask the constraint in batches until each budget has its top-T.
Pure python + numpy: no torch, no Ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from raynas.errors import ConfigError
from raynas.search.constraints import Budget, Constraint
from raynas.search.metrics import kendall_tau
from raynas.spaces.layerwise import LayerwiseArch, LayerwiseSpace

OpPath = tuple[str, ...]
#: most combinations enumerated exactly when the cost is additive (params, flops); beyond it: lower m or B
MAX_COMBINATIONS = 20_000_000
#: most combinations walked when every arch has to be costed by the constraint itself (latency)
MAX_PREDICTED = 2_000_000
CHUNK = 1 << 18  # combinations costed at once
BATCH = 2048  # archs per constraint call on the non-additive path


@dataclass(frozen=True)
class Assembled:
    """One assembled model: its arch string, its per-block paths, and what ranked and admitted it."""

    arch: str  # space.format(LayerwiseArch(hidden, paths[0] + paths[1] + ...))
    paths: tuple[OpPath, ...]
    summed_loss: float  # sum of the blocks' validation losses (block 0 first), lower is better
    params: int  # the exported AutoModel's params (space.params(arch, "base"): embeddings + encoder + pooler)
    cost: float  # constraint.cost(arch), in the constraint's unit
    budget: str  # the budget label it was chosen for

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, "paths": [",".join(p) for p in self.paths], "summed_loss": self.summed_loss,
                "params": self.params, "cost": self.cost, "budget": self.budget}


def _check_survivors(space: LayerwiseSpace, survivors: Sequence[Sequence[tuple[Sequence[str], float]]]
                     ) -> tuple[list[list[OpPath]], list[np.ndarray]]:
    if not survivors:
        raise ConfigError("survivors: no block given")
    paths: list[list[OpPath]] = []
    losses: list[np.ndarray] = []
    for k, block in enumerate(survivors):
        ps = [tuple(p) for p, _ in block]
        if not ps:
            raise ConfigError(f"survivors: block {k} has no surviving path")
        if len(set(ps)) != len(ps):
            raise ConfigError(f"survivors: block {k} lists a path twice")
        if len({len(p) for p in ps}) != 1:
            raise ConfigError(f"survivors: block {k} has paths of different lengths")
        ls = np.array([float(v) for _, v in block], dtype=np.float64)
        if np.isnan(ls).any():
            bad = ps[int(np.flatnonzero(np.isnan(ls))[0])]
            raise ConfigError(f"survivors: block {k} path {','.join(bad)} has a NaN val loss")
        paths.append(ps)
        losses.append(ls)
    total = sum(len(ps[0]) for ps in paths)
    if total != space.num_layers:
        raise ConfigError(f"survivors: the blocks' paths hold {total} op-layers, space {space.name!r} has "
                          f"{space.num_layers}")
    return paths, losses


def _grid(arrays: Sequence[np.ndarray], start: np.ndarray | float) -> np.ndarray:
    """``start + a0[i] + a1[j] + ...`` over the grid, flattened row-major, summed block by block (left to right)."""
    out = np.asarray(start)
    for a in arrays:
        out = out[..., None] + a
    return out.reshape(-1)


def _merge(best: tuple[np.ndarray, np.ndarray], loss: np.ndarray, idx: np.ndarray, top_t: int
           ) -> tuple[np.ndarray, np.ndarray]:
    """The ``top_t`` smallest ``(loss, flat index)`` pairs of ``best`` and the new candidates."""
    if len(loss) > top_t:  # cut the chunk first: everything tied with the T-th smallest loss stays
        kth = np.partition(loss, top_t - 1)[top_t - 1]
        sel = loss <= kth
        loss, idx = loss[sel], idx[sel]
    loss, idx = np.concatenate([best[0], loss]), np.concatenate([best[1], idx])
    order = np.lexsort((idx, loss))[:top_t]
    return loss[order], idx[order]


def _top_additive(losses: list[np.ndarray], costs: list[np.ndarray], const: int, budgets: Sequence[Budget],
                  top_t: int) -> list[np.ndarray]:
    """Flat indices of the top-T combinations per budget, costs = const + per-block ints (exact in int64)."""
    sizes = [len(a) for a in losses]
    split = len(sizes)  # blocks[split:] are costed at once, blocks[:split] enumerated one prefix at a time
    while split > 0 and math.prod(sizes[split - 1:]) <= CHUNK:
        split -= 1
    split = min(split, len(sizes) - 1)
    inner = math.prod(sizes[split:])
    best = [(np.empty(0), np.empty(0, dtype=np.int64)) for _ in budgets]
    for outer, prefix in enumerate(np.ndindex(*sizes[:split])):
        start_loss = sum((losses[k][i] for k, i in enumerate(prefix)), np.float64(0.0))
        start_cost = const + sum(int(costs[k][i]) for k, i in enumerate(prefix))
        loss = _grid(losses[split:], start_loss)
        cost = _grid(costs[split:], np.int64(start_cost))
        base = outer * inner
        for b, budget in enumerate(budgets):
            fit = np.flatnonzero(cost <= budget.value)
            if len(fit):
                best[b] = _merge(best[b], loss[fit], fit + base, top_t)
    return [idx for _, idx in best]


def _top_by_constraint(space: LayerwiseSpace, hidden: int, paths: list[list[OpPath]], losses: list[np.ndarray],
                       constraint: Constraint, budgets: Sequence[Budget], top_t: int) -> list[np.ndarray]:
    """Walk combinations in (summed loss, index) order, costing batches with the constraint, until budgets fill."""
    sizes = [len(ps) for ps in paths]
    total = _grid(losses, np.float64(0.0))
    order = np.argsort(total, kind="stable")
    chosen: list[list[int]] = [[] for _ in budgets]
    for at in range(0, len(order), BATCH):
        if all(len(c) >= top_t for c in chosen):
            break
        flat = order[at:at + BATCH]
        archs = [_arch(hidden, paths, combo) for combo in zip(*np.unravel_index(flat, sizes))]
        cost = np.asarray(constraint.costs(archs), dtype=np.float64)
        for b, budget in enumerate(budgets):
            room = top_t - len(chosen[b])
            if room > 0:
                chosen[b] += [int(i) for i in flat[cost <= budget.value][:room]]
    return [np.asarray(c, dtype=np.int64) for c in chosen]


def _arch(hidden: int, paths: list[list[OpPath]], combo: Sequence[int]) -> LayerwiseArch:
    return LayerwiseArch(hidden, tuple(t for k, i in enumerate(combo) for t in paths[k][int(i)]))


def _block_costs(space: LayerwiseSpace, hidden: int, paths: list[list[OpPath]], constraint: Constraint
                 ) -> tuple[list[np.ndarray], int] | None:
    """Per-block integer costs and the constant that make ``constraint.cost`` additive, or None if it is not."""
    if constraint.kind == "params":
        def one(t: str) -> int:
            return space.op_of(t).params(hidden)
    elif constraint.kind == "flops":
        def one(t: str) -> int:
            return space.op_of(t).flops(hidden, constraint.seq_len)
    else:
        return None
    costs = [np.array([sum(one(t) for t in p) for p in ps], dtype=np.int64) for ps in paths]
    first = [0] * len(paths)
    const = int(constraint.cost(_arch(hidden, paths, first))) - int(sum(c[0] for c in costs))
    probes = [[len(ps) - 1 for ps in paths], [len(ps) // 2 for ps in paths]]
    for combo in probes:  # the decomposition must reproduce the constraint itself, or it is not used
        if constraint.cost(_arch(hidden, paths, combo)) != const + sum(int(c[i]) for c, i in zip(costs, combo)):
            return None
    return costs, const


def assemble(space: LayerwiseSpace, hidden: int, survivors: Sequence[Sequence[tuple[Sequence[str], float]]],
             constraint: Constraint, budgets: Sequence[Budget], top_t: int) -> dict[str, list[Assembled]]:
    """The ``top_t`` combinations (one survivor per block, block 0 first) by summed val loss, per budget label.

    ``survivors[k]``: block ``k``'s ``(path, val_loss)`` pairs. Only archs with
    ``constraint.fits(arch, budget)`` are returned, best first; ties keep the
    survivors' order (block 0's first path first). A budget nothing fits maps
    to an empty list (the caller reports it). Exact: every combination is
    considered (ConfigError when there are too many: lower m or B).
    """
    if not (isinstance(top_t, int) and not isinstance(top_t, bool) and top_t >= 1):
        raise ConfigError(f"top_t: expected a positive integer, got {top_t!r}")
    if hidden not in space.hidden:
        raise ConfigError(f"hidden: {hidden} is not in {space.hidden.text} (space {space.name!r})")
    labels = [b.label for b in budgets]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"budgets: {labels} lists a budget twice")
    paths, losses = _check_survivors(space, survivors)
    sizes = [len(ps) for ps in paths]
    n = math.prod(sizes)
    additive = _block_costs(space, hidden, paths, constraint)
    limit = MAX_COMBINATIONS if additive is not None else MAX_PREDICTED
    if n > limit:
        raise ConfigError(f"survivors: {' x '.join(map(str, sizes))} = {n} combinations, more than {limit} "
                          "(lower max_per_bin or bins)")
    if additive is not None:
        picked = _top_additive(losses, additive[0], additive[1], budgets, top_t)
    else:
        picked = _top_by_constraint(space, hidden, paths, losses, constraint, budgets, top_t)
    out: dict[str, list[Assembled]] = {}
    for budget, flat in zip(budgets, picked):
        rows = []
        for combo in zip(*np.unravel_index(flat, sizes)) if len(flat) else ():
            arch = _arch(hidden, paths, combo)
            cost = constraint.cost(arch)
            if cost > budget.value:
                raise AssertionError(f"{space.format(arch)}: cost {cost} over budget {budget.label}")
            summed = sum((losses[k][int(i)] for k, i in enumerate(combo)), np.float64(0.0))
            rows.append(Assembled(space.format(arch), tuple(paths[k][int(i)] for k, i in enumerate(combo)),
                                  float(summed), space.params(arch, "base"), float(cost), budget.label))
        out[budget.label] = rows
    return out


def rank_agreement(approx: Sequence[float], real: Sequence[float]) -> float:
    """Kendall's tau between approximated (summed block losses) and real losses of the same models; nan if constant."""
    return kendall_tau(approx, real)
