"""Bin-wise progressive shrinking of each block's paths (NAS-BERT, block-wise search).

A block of ``P`` op-layers has ``|ops|^P`` paths (26^6 in the paper), so a run
starts from a sampled *pool*: the block's parameter range is cut into ``B``
equal-width bins and each bin gets up to ``candidates_per_bin`` distinct paths.
Bins exist so that small paths are compared with small paths: ranked together,
the largest paths would win every stage and the small end of the Pareto front
would be gone before the approximation step could use it.

Each stage (after ``steps_per_stage`` of block training) scores every surviving
path by its validation loss on held-out teacher pairs and keeps the best
``max(m, ceil(n * keep_fraction))`` of each bin; a block is finished when every
bin holds at most ``m`` paths. The state is plain data saved by raynas itself
(Ray Tune does not checkpoint scheduler state), atomically, as JSON.

Pure python + pyarrow (the stage table's schema): no torch, no Ray.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import random
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pyarrow as pa

from raynas.atomic_io import atomic_file
from raynas.config_loading import FieldErrors
from raynas.errors import ConfigError
from raynas.spaces.layerwise import LayerwiseSpace
from raynas.spaces.ops import encoder_params

OpPath = tuple[str, ...]
STATE_VERSION = 1
#: draws per wanted candidate before a bin is left short (a tiny space may hold fewer distinct paths)
DRAWS_PER_CANDIDATE = 30

TIMESTAMP = pa.timestamp("us", tz="UTC")
STAGES_SCHEMA = pa.schema([
    ("block", pa.int32()), ("bin", pa.int32()),
    ("path", pa.string()),  # the block's op tokens joined by ","
    ("params", pa.int64()),  # encoder op-layer params of the path at the run's hidden size
    ("val_loss", pa.float64()),  # block validation loss (MSE to the teacher's block output), lower is better
    ("stage", pa.int32()),  # 0-based index of the shrinking stage that scored it
    ("kept", pa.bool_()),  # survived this stage
    ("started_at", TIMESTAMP), ("finished_at", TIMESTAMP),  # the stage's scoring (filled by the orchestration)
])


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class ShrinkConfig:
    """How each block's pool is sampled and shrunk (B, pool size, keep fraction, m) and how often it is scored."""

    bins: int = 4  # B: equal-width params intervals per block
    candidates_per_bin: int = 16  # initial pool per bin (paths are 26^6 in the paper: a sampled pool)
    keep_fraction: float = 0.5  # survivors per stage: max(max_per_bin, ceil(n*keep_fraction)), always < n
    max_per_bin: int = 2  # m: a block is finished when every bin holds <= m
    steps_per_stage: int = 50  # block training steps before each scoring (used by the orchestration)
    warmup_steps: int = 0  # extra steps before the first scoring

    def __post_init__(self) -> None:
        problems = shrink_config_errors(self)
        if problems:
            raise FieldErrors(problems)


def shrink_config_errors(cfg: ShrinkConfig) -> list[str]:
    """Every bad field of ``cfg``, one message each, naming the field."""
    errors: list[str] = []
    for name, low in (("bins", 1), ("candidates_per_bin", 1), ("max_per_bin", 1), ("steps_per_stage", 1),
                      ("warmup_steps", 0)):
        value = getattr(cfg, name)
        if not _is_int(value) or value < low:
            errors.append(f"{name}: expected an integer >= {low}, got {value!r}")
    keep = cfg.keep_fraction
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < keep < 1.0:
        errors.append(f"keep_fraction: expected a number in (0, 1), got {keep!r}")
    m, c = cfg.max_per_bin, cfg.candidates_per_bin
    if _is_int(m) and _is_int(c) and m >= 1 and c >= 1 and c < m:
        errors.append(f"candidates_per_bin: {c} is below max_per_bin {m} (nothing would ever be shrunk)")
    return errors


def keep_count(n: int, cfg: ShrinkConfig) -> int:
    """Paths a bin of ``n`` keeps after one stage: ``max(m, ceil(n*keep))``, but at most ``n - 1`` while ``n > m``.

    The ``n - 1`` cap guarantees progress (``ceil(3 * 0.9) == 3`` would otherwise never shrink).
    """
    m = cfg.max_per_bin
    if n <= m:
        return n
    return min(n - 1, max(m, math.ceil(n * cfg.keep_fraction - 1e-9)))


def stages_to_finish(n: int, cfg: ShrinkConfig) -> int:
    """Stages a bin of ``n`` paths needs to reach ``<= m`` (``ceil(log(n/m) / log(1/keep))`` for keep 1/2)."""
    stages = 0
    while n > cfg.max_per_bin:
        n, stages = keep_count(n, cfg), stages + 1
    return stages


# ---- the initial pool -----------------------------------------------------------------------
class _IntervalSampler:
    """Random paths of ``length`` tokens whose params fall in ``[lo, hi)``; exhaustive, so ``None`` means none exist.

    Depth-first over the positions in a random order, trying tokens in a random
    order, pruned by what the remaining positions can still add (all-smallest ..
    all-largest). Dead ends ``(remaining, sum)`` are remembered across draws, so
    proving a bin empty costs at most the reachable partial sums, once.
    """

    def __init__(self, cost: Mapping[str, int], length: int, lo: int, hi: int) -> None:
        self.tokens = list(cost)
        self.cost, self.length, self.lo, self.hi = dict(cost), length, lo, hi
        self.vmin, self.vmax = min(cost.values()), max(cost.values())
        self.dead: set[tuple[int, int]] = set()

    def _reachable(self, remaining: int, total: int) -> bool:
        return total + remaining * self.vmin < self.hi and total + remaining * self.vmax >= self.lo

    def draw(self, rng: random.Random) -> OpPath | None:
        if not self._reachable(self.length, 0):
            return None
        chosen: list[str] = []
        if not self._search(self.length, 0, rng, chosen):
            return None
        order = list(range(self.length))
        rng.shuffle(order)  # the sum ignores order: place the tokens at random positions
        out = [""] * self.length
        for pos, token in zip(order, chosen):
            out[pos] = token
        return tuple(out)

    def _search(self, remaining: int, total: int, rng: random.Random, chosen: list[str]) -> bool:
        if remaining == 0:
            return self.lo <= total < self.hi
        if (remaining, total) in self.dead:
            return False
        tokens = self.tokens[:]
        rng.shuffle(tokens)
        for token in tokens:
            nxt = total + self.cost[token]
            if (remaining - 1, nxt) in self.dead or not self._reachable(remaining - 1, nxt):
                continue
            chosen.append(token)
            if self._search(remaining - 1, nxt, rng, chosen):
                return True
            chosen.pop()
        self.dead.add((remaining, total))
        return False


def path_params(space: LayerwiseSpace, hidden: int, path: Sequence[str]) -> int:
    """Encoder op-layer params of ``path`` at width ``hidden`` (what a block's bins are cut by)."""
    return encoder_params(hidden, [space.op_of(t) for t in path])


def initial_pool(space: LayerwiseSpace, hidden: int, ops_per_block: int, cfg: ShrinkConfig, seed: int,
                 block: int) -> tuple[list[list[OpPath]], list[int]]:
    """Block ``block``'s starting bins of distinct paths and their params edges (``len(edges) == len(bins) + 1``).

    Bins are ``B`` equal-width intervals ``[edges[i], edges[i+1])`` between the
    block's smallest and largest path params (the last edge is largest + 1).
    Every bin is sampled *inside its own interval* (a constrained random draw,
    see :class:`_IntervalSampler`), so the small and large bins fill as well as
    the middle ones, where unconstrained random paths would pile up. The
    globally smallest and largest paths always lead bins 0 and B-1. A bin with
    fewer distinct paths than ``candidates_per_bin`` keeps what exists; an
    interval that no path of the block falls in is merged into the bin below
    it (so ``len(bins) < cfg.bins`` says some were empty; every bin is non-empty).
    Deterministic in ``(seed, block)``.
    """
    if hidden not in space.hidden:
        raise ConfigError(f"hidden: {hidden} is not in {space.hidden.text} (space {space.name!r})")
    if not _is_int(ops_per_block) or ops_per_block < 1:
        raise ConfigError(f"ops_per_block: expected a positive integer, got {ops_per_block!r}")
    cost = {t: space.op_of(t).params(hidden) for t in space.tokens}
    order = sorted(space.tokens, key=lambda t: cost[t])  # stable: ties keep the space's token order
    smallest, largest = (order[0],) * ops_per_block, (order[-1],) * ops_per_block
    lo, hi = path_params(space, hidden, smallest), path_params(space, hidden, largest)
    n_bins = cfg.bins
    edges = [lo, *(lo + (hi - lo) * i // n_bins for i in range(1, n_bins)), hi + 1]
    rng = random.Random(f"raynas.blockwise.initial_pool:{seed}:{block}")
    found: list[list[OpPath]] = []
    for i in range(n_bins):
        paths: dict[OpPath, None] = {}
        if i == 0:
            paths[smallest] = None
        if i == n_bins - 1:
            paths[largest] = None
        sampler = _IntervalSampler(cost, ops_per_block, edges[i], edges[i + 1])
        for _ in range(cfg.candidates_per_bin * DRAWS_PER_CANDIDATE):
            if len(paths) >= cfg.candidates_per_bin:
                break
            path = sampler.draw(rng)
            if path is None:
                break
            paths[path] = None
        found.append(list(paths))
    keep = [i for i, paths in enumerate(found) if paths]  # bin 0 and bin B-1 never are empty
    return [found[i] for i in keep], [edges[i] for i in keep] + [edges[-1]]


# ---- one block's shrinking -------------------------------------------------------------------
def _rank_key(loss: float, path: OpPath) -> tuple[bool, float, str]:
    """Lower loss first; a NaN (diverged) path ranks last; ties broken by the path string."""
    nan = math.isnan(loss)
    return nan, 0.0 if nan else loss, ",".join(path)


@dataclass
class BlockShrink:
    """One block's shrinking state: its bins of surviving paths (best first after a stage) and its stage count."""

    block: int
    edges: list[int]
    bins: list[list[OpPath]]
    stage: int = 0
    finished: bool = False

    @classmethod
    def start(cls, space: LayerwiseSpace, hidden: int, ops_per_block: int, cfg: ShrinkConfig, seed: int,
              block: int) -> BlockShrink:
        """A block at stage 0 with its :func:`initial_pool` (finished already if no bin holds more than m)."""
        bins, edges = initial_pool(space, hidden, ops_per_block, cfg, seed, block)
        return cls(block, edges, bins, 0, all(len(b) <= cfg.max_per_bin for b in bins))

    def survivors(self) -> list[OpPath]:
        """Every surviving path, bin by bin."""
        return [p for paths in self.bins for p in paths]

    def apply(self, scores: Mapping[OpPath, float], params: Callable[[OpPath], int],
              cfg: ShrinkConfig) -> list[dict[str, Any]]:
        """Run one stage on ``scores`` (validation loss per path; every survivor must have one, extras ignored).

        Returns one row per survivor (``STAGES_SCHEMA`` columns but the
        timestamps), ``kept`` telling whether it survived this stage.
        """
        if self.finished:
            raise ValueError(f"block {self.block}: already finished after stage {self.stage}")
        missing = [p for p in self.survivors() if p not in scores]
        if missing:
            raise KeyError(f"block {self.block}: no val loss for {len(missing)} surviving path(s), "
                           f"e.g. {','.join(missing[0])}")
        rows: list[dict[str, Any]] = []
        new_bins: list[list[OpPath]] = []
        for i, paths in enumerate(self.bins):
            ranked = sorted(paths, key=lambda p: _rank_key(float(scores[p]), p))
            kept = ranked[:keep_count(len(paths), cfg)]
            if not 1 <= len(kept) <= len(paths):
                raise AssertionError(f"block {self.block} bin {i}: {len(paths)} -> {len(kept)} paths")
            new_bins.append(kept)
            rows += [{"block": self.block, "bin": i, "path": ",".join(p), "params": int(params(p)),
                      "val_loss": float(scores[p]), "stage": self.stage, "kept": j < len(kept)}
                     for j, p in enumerate(ranked)]
        self.bins = new_bins
        self.stage += 1
        self.finished = all(len(b) <= cfg.max_per_bin for b in self.bins)
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {"block": self.block, "edges": list(self.edges), "bins": [[list(p) for p in b] for b in self.bins],
                "stage": self.stage, "finished": self.finished}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> BlockShrink:
        bins = [[tuple(str(t) for t in p) for p in b] for b in raw["bins"]]
        edges = [int(e) for e in raw["edges"]]
        if not bins or any(not b for b in bins) or len(edges) != len(bins) + 1:
            raise ValueError(f"block {raw.get('block')}: {len(bins)} bins (an empty one?) and {len(edges)} edges")
        return cls(int(raw["block"]), edges, bins, int(raw["stage"]), bool(raw["finished"]))


# ---- every block ---------------------------------------------------------------------------------
@dataclass
class ShrinkState:
    """All blocks' shrinking state plus the config that made it (``ShrinkConfig`` fields, ``seed``, ``hidden``)."""

    blocks: dict[int, BlockShrink]
    config: dict[str, Any]

    @classmethod
    def start(cls, space: LayerwiseSpace, hidden: int, ops_per_block: int, num_blocks: int, cfg: ShrinkConfig,
              seed: int) -> ShrinkState:
        blocks = {k: BlockShrink.start(space, hidden, ops_per_block, cfg, seed, k) for k in range(num_blocks)}
        return cls(blocks, {**asdict(cfg), "seed": seed, "hidden": hidden})

    @property
    def finished(self) -> bool:
        return all(b.finished for b in self.blocks.values())

    def shrink_config(self) -> ShrinkConfig:
        """The :class:`ShrinkConfig` this state was started with."""
        names = {f.name for f in fields(ShrinkConfig)}
        return ShrinkConfig(**{k: v for k, v in self.config.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "config": dict(self.config),
                "blocks": {str(k): b.to_dict() for k, b in sorted(self.blocks.items())}}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ShrinkState:
        """Inverse of :meth:`to_dict` (JSON's string keys and lists back to ints and tuples); ConfigError if malformed."""
        try:
            if raw.get("version") != STATE_VERSION:
                raise ValueError(f"version {raw.get('version')!r}, expected {STATE_VERSION}")
            blocks = {int(k): BlockShrink.from_dict(b) for k, b in raw["blocks"].items()}
            for k, b in blocks.items():
                if b.block != k:
                    raise ValueError(f"block {k} holds the state of block {b.block}")
            config = dict(raw["config"])
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"not a shrinking state: {exc!r}") from None
        return cls(blocks, config)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the state as JSON atomically (a crash leaves the previous file)."""
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ShrinkState:
        p = Path(path)
        try:
            raw = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{p}: cannot read the shrinking state ({exc})") from None
        try:
            return cls.from_dict(raw)
        except ConfigError as exc:
            raise ConfigError(f"{p}: {exc}") from None


def bin_of(edges: Sequence[int], params: int) -> int:
    """Index ``i`` with ``edges[i] <= params < edges[i+1]`` (ValueError outside the edges)."""
    i = bisect.bisect_right(list(edges), params) - 1
    if not 0 <= i < len(edges) - 1:
        raise ValueError(f"{params} params are outside the bin edges {edges[0]}..{edges[-1]}")
    return i
