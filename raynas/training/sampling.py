"""Which sub-models a worker trains on each batch, with RNG state that survives checkpoints.

Every sampler's ``sample(step)`` returns the archs to run for one batch on one
worker; the trainer runs them in order, accumulating gradients. The RNG state is
in ``state_dict()`` (plain JSON) so a resumed run draws exactly the archs an
uninterrupted run would have. Pure Python: the Ray / DeepSpeed adapters call it.
"""

from __future__ import annotations

import random
import weakref
from typing import TYPE_CHECKING, Any

from raynas.errors import ConfigError
from raynas.spaces import Space

if TYPE_CHECKING:
    from raynas.training.config import SamplerConfig

SIZE_CLASSES = ("small", "medium", "large")


def _rng_state(rng: random.Random) -> list[Any]:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _set_rng_state(rng: random.Random, state: list[Any]) -> None:
    version, internal, gauss = state
    rng.setstate((version, tuple(internal), gauss))


def _count(name: str, value: Any, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return value


class ArchSampler:
    """Shared state handling; subclasses define ``name``, ``_draw`` and, for options, ``from_config``.

    A new sampler is one subclass listed in :data:`SAMPLERS`: the config check
    (``sampler.name``) and the worker's construction both read the registry.
    """

    name = "base"
    #: sub-models after the first are distilled from the first one's outputs (sandwich rule)
    inplace_distillation = False
    #: a config may name it as ``sampler.name`` (False: used internally, e.g. for plain models)
    selectable = True

    @classmethod
    def from_config(cls, space: Space, seed: int, cfg: SamplerConfig, rank: int = 0,
                    world_size: int = 1) -> ArchSampler:
        """Built from the ``sampler.*`` options it uses; ``rank`` / ``world_size`` are 0 / 1 where every
        worker must draw the same archs (ZeRO-3)."""
        return cls(space, seed)

    def __init__(self, space: Space, seed: int, rng_seed: Any = None) -> None:
        self.space, self.seed = space, seed
        self.rng = random.Random(seed if rng_seed is None else rng_seed)
        self.step = -1  # last step sampled, kept for the checkpoint's sanity

    def sample(self, step: int) -> list[Any]:
        """The archs to run for batch ``step`` on this worker (consumes the RNG: call once per step)."""
        self.step = step
        return self._draw()

    def _draw(self) -> list[Any]:
        raise NotImplementedError

    @property
    def archs_per_step(self) -> int:
        """How many archs every ``sample`` returns (the gradient-accumulation count)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "seed": self.seed, "step": self.step, "rng": _rng_state(self.rng)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ConfigError(f"sampler state is for {state.get('name')!r}, this sampler is {self.name!r}")
        self.seed, self.step = state["seed"], state["step"]
        _set_rng_state(self.rng, state["rng"])


class UniformSampler(ArchSampler):
    """``per_batch`` archs drawn uniformly from the space (the single-path one-shot baseline).

    Same seed on every worker means the same archs on every worker: the
    gradient is then one sub-model's, averaged over the global batch.
    """

    name = "uniform"

    def __init__(self, space: Space, seed: int, per_batch: int = 1) -> None:
        super().__init__(space, seed)
        self.per_batch = _count("per_batch", per_batch, 1)

    @classmethod
    def from_config(cls, space: Space, seed: int, cfg: SamplerConfig, rank: int = 0,
                    world_size: int = 1) -> ArchSampler:
        return cls(space, seed, per_batch=cfg.per_worker)  # same archs on every rank: no rank needed

    def _draw(self) -> list[Any]:
        return [self.space.sample(self.rng) for _ in range(self.per_batch)]

    @property
    def archs_per_step(self) -> int:
        return self.per_batch


class SandwichSampler(ArchSampler):
    """Largest, smallest and ``n_random`` random archs per batch (BigNAS / OFA sandwich rule).

    The largest comes first so its logits exist when the others run: with
    ``inplace_distillation`` the trainer distils every later sub-model from them.
    """

    name = "sandwich"
    inplace_distillation = True

    def __init__(self, space: Space, seed: int, n_random: int = 2) -> None:
        super().__init__(space, seed)
        self.n_random = _count("n_random", n_random, 0)
        self.largest, self.smallest = space.largest(), space.smallest()

    @classmethod
    def from_config(cls, space: Space, seed: int, cfg: SamplerConfig, rank: int = 0,
                    world_size: int = 1) -> ArchSampler:
        return cls(space, seed, n_random=cfg.n_random)

    def _draw(self) -> list[Any]:
        return [self.largest, self.smallest, *(self.space.sample(self.rng) for _ in range(self.n_random))]

    @property
    def archs_per_step(self) -> int:
        return 2 + self.n_random


class BatchwiseSampler(ArchSampler):
    """AutoTinyBERT's batch-wise training (Algorithm 1): ``per_worker`` sub-models per batch per worker.

    The RNG is seeded from ``(seed, rank)`` so workers draw *different* archs for
    the same step, and the step's update covers ``per_worker x world_size``
    sub-models. The trainer accumulates gradients over the M sub-models of a
    worker and the data-parallel all-reduce averages them across workers; this
    sampler only decides the archs.
    """

    name = "batchwise"

    def __init__(self, space: Space, seed: int, per_worker: int = 3, rank: int = 0, world_size: int = 1) -> None:
        self.per_worker = _count("per_worker", per_worker, 1)
        self.world_size = _count("world_size", world_size, 1)
        self.rank = _count("rank", rank, 0)
        if rank >= world_size:
            raise ConfigError(f"rank: expected 0 <= rank < world_size={world_size}, got {rank}")
        # a string seed is hashed with SHA-512 by random.seed: stable across processes and Python runs
        super().__init__(space, seed, rng_seed=f"raynas-batchwise:{seed}:{rank}")

    @classmethod
    def from_config(cls, space: Space, seed: int, cfg: SamplerConfig, rank: int = 0,
                    world_size: int = 1) -> ArchSampler:
        return cls(space, seed, per_worker=cfg.per_worker, rank=rank, world_size=world_size)

    def _draw(self) -> list[Any]:
        return [self.space.sample(self.rng) for _ in range(self.per_worker)]

    @property
    def archs_per_step(self) -> int:
        return self.per_worker

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("rank", self.rank) != self.rank:
            raise ConfigError(f"sampler state is for rank {state['rank']}, this worker is rank {self.rank}")
        super().load_state_dict(state)


class FixedSampler(ArchSampler):
    """One fixed "arch" per batch: ``None`` for a plain (non-elastic) model, as ``raynas train`` trains."""

    name = "fixed"
    selectable = False

    def __init__(self, space: Space | None, seed: int, arch: Any = None) -> None:
        super().__init__(space, seed)  # type: ignore[arg-type]
        self.arch = arch

    def _draw(self) -> list[Any]:
        return [self.arch]

    @property
    def archs_per_step(self) -> int:
        return 1


SAMPLERS: dict[str, type[ArchSampler]] = {
    cls.name: cls for cls in (UniformSampler, SandwichSampler, BatchwiseSampler, FixedSampler)
}
#: what ``sampler.name`` may say
SAMPLER_NAMES = tuple(name for name, cls in SAMPLERS.items() if cls.selectable)


def build_sampler(name: str, space: Space, seed: int, **kw: Any) -> ArchSampler:
    """Sampler by name, as a config names it; ConfigError for unknown names, options or counts."""
    cls = SAMPLERS.get(name)
    if cls is None:
        raise ConfigError(f"sampler: unknown sampler {name!r} (expected one of {sorted(SAMPLERS)})")
    try:
        return cls(space, seed, **kw)
    except TypeError as e:  # an option this sampler does not take
        raise ConfigError(f"sampler {name!r}: {e}") from None


_EDGES: weakref.WeakKeyDictionary[Space, dict[int, list[int]]] = weakref.WeakKeyDictionary()


def _edges(space: Space, n: int) -> list[int]:
    """Quantile edges are a few thousand param counts: compute once per space, not per logged step."""
    try:
        per_space = _EDGES.setdefault(space, {})
    except TypeError:  # a space that cannot be weakly referenced: no cache
        return space.bin_edges(n, method="quantile")
    if n not in per_space:
        per_space[n] = space.bin_edges(n, method="quantile")
    return per_space[n]


def size_class(space: Space, arch: Any, n: int = 3) -> str:
    """``small`` / ``medium`` / ``large`` (by encoder-parameter tertile of the space), for per-size loss logs.

    Tertiles of uniformly sampled archs, not of [smallest, largest]: most random
    archs are mid-sized, and equal shares keep every class's curve populated.
    Other ``n`` give ``bin0`` .. ``bin{n-1}``.
    """
    i = space.bin_of(arch, _edges(space, n))
    return SIZE_CLASSES[i] if n == 3 else f"bin{i}"
