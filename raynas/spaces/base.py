"""What every search space offers, plus the small pieces both spaces build on.

A space turns an arch into a *plan*: the model width and the chain of op-layers
(see :mod:`raynas.spaces.ops`). Parameter counts, FLOPs and bins are derived from
the plan here, once, so the two spaces cannot disagree with the exported model.
"""

from __future__ import annotations

import bisect
import random
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any, Generic, Sequence, TypeVar

from raynas.errors import ConfigError
from raynas.spaces.ops import OpSpec, encoder_flops, encoder_params

A = TypeVar("A")
HEADS = ("encoder", "base", "mlm", "cls", "qa")


@dataclass(frozen=True)
class EmbeddingShape:
    """Table sizes that do not vary with the arch but count towards its parameters."""

    vocab_size: int = 30522
    max_position_embeddings: int = 512
    type_vocab_size: int = 2

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class Choice:
    """The admissible values of one integer dimension."""

    name: str
    values: tuple[int, ...]
    text: str

    @classmethod
    def from_spec(cls, name: str, spec: Any, errors: list[str]) -> Choice | None:
        """Read ``{min, max, step}`` or ``{values: [...]}``; append problems to ``errors``."""
        if not isinstance(spec, dict):
            errors.append(f"{name}: expected a mapping with min/max[/step] or values, got {spec!r}")
            return None
        extra = sorted(set(spec) - {"min", "max", "step", "values"})
        if extra:
            errors.append(f"{name}: unknown key(s) {extra} (expected min/max/step or values)")
            return None
        if "values" in spec:
            vals = spec["values"]
            if set(spec) != {"values"} or not isinstance(vals, list) or not vals or not all(_pos_int(v) for v in vals):
                errors.append(f"{name}.values: expected a non-empty list of positive integers alone, got {vals!r}")
                return None
            values = tuple(sorted(set(vals)))
            return cls(name, values, "one of " + ",".join(map(str, values)))
        lo, hi, step = spec.get("min"), spec.get("max"), spec.get("step", 1)
        bad = [k for k, v in (("min", lo), ("max", hi), ("step", step)) if not _pos_int(v)]
        if bad:
            errors.extend(f"{name}.{k}: expected a positive integer, got {spec.get(k)!r}" for k in bad)
            return None
        if lo > hi or (hi - lo) % step:
            errors.append(f"{name}: max={hi} must be min={lo} plus a whole number of steps of {step}")
            return None
        return cls(name, tuple(range(lo, hi + 1, step)), f"{lo}..{hi}" + (f" step {step}" if step != 1 else ""))

    @property
    def min(self) -> int:
        return self.values[0]

    @property
    def max(self) -> int:
        return self.values[-1]

    def __contains__(self, value: object) -> bool:
        i = bisect.bisect_left(self.values, value)  # type: ignore[arg-type]
        return i < len(self.values) and self.values[i] == value

    def sample(self, rng: random.Random) -> int:
        return rng.choice(self.values)

    def to_spec(self) -> dict[str, Any]:
        return {"values": list(self.values)}


def _pos_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def read_embeddings(raw: Any, errors: list[str]) -> EmbeddingShape:
    if raw is None:
        return EmbeddingShape()
    if not isinstance(raw, dict):
        errors.append(f"embeddings: expected a mapping, got {raw!r}")
        return EmbeddingShape()
    fields = EmbeddingShape.__dataclass_fields__
    for key in sorted(set(raw) - set(fields)):
        errors.append(f"embeddings.{key}: unknown key (expected one of {sorted(fields)})")
    for key, value in raw.items():
        if key in fields and not _pos_int(value):
            errors.append(f"embeddings.{key}: expected a positive integer, got {value!r}")
    return EmbeddingShape(**{k: v for k, v in raw.items() if k in fields and _pos_int(v)})


def raise_errors(where: str, errors: list[str]) -> None:
    """One error that names every bad field, as a config reader should."""
    if errors:
        raise ConfigError(f"{where}: " + ("; ".join(errors) if len(errors) < 2 else "\n  - " + "\n  - ".join(errors)))


class Space(ABC, Generic[A]):
    """Sample / mutate / crossover / validate / encode / count, over archs of type ``A``."""

    kind: str
    name: str
    embeddings: EmbeddingShape

    # ---- what each space defines -------------------------------------------------
    @abstractmethod
    def parse(self, arch: A | str) -> A:
        """Arch object from its string form (or pass one through); ConfigError if malformed."""

    @abstractmethod
    def validate(self, arch: A | str) -> A:
        """Parse and check against the space; ConfigError names the offending field and value."""

    @abstractmethod
    def sample(self, rng: random.Random) -> A: ...

    @abstractmethod
    def mutate(self, arch: A, rng: random.Random, prob: float = 0.5) -> A: ...

    @abstractmethod
    def crossover(self, a: A, b: A, rng: random.Random) -> A: ...

    @abstractmethod
    def encode(self, arch: A | str) -> list[float]:
        """Fixed-length numeric vector (values in [0, 1]) for predictors."""

    @abstractmethod
    def plan(self, arch: A | str) -> tuple[int, tuple[OpSpec, ...]]:
        """``(hidden, ops)``: the op-layer chain this arch runs."""

    @abstractmethod
    def slots(self) -> list[dict[str, OpSpec]]:
        """Per op-layer, the largest op of each slot: what a supernet must hold."""

    @abstractmethod
    def smallest(self) -> A: ...

    @abstractmethod
    def largest(self) -> A: ...

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """The YAML mapping this space was (or could be) read from."""

    # ---- derived, shared -----------------------------------------------------------
    @property
    def max_hidden(self) -> int:
        return self.plan(self.largest())[0]

    def contains(self, arch: A | str) -> bool:
        try:
            self.validate(arch)
        except ConfigError:
            return False
        return True

    def format(self, arch: A | str) -> str:
        return str(self.parse(arch))

    def params(self, arch: A | str, head: str = "base", num_labels: int = 2) -> int:
        """Exact parameter count of the exported model.

        ``encoder``: op-layers only; ``base``: ``AutoModel`` (embeddings + layers +
        pooler); ``mlm``: ``AutoModelForMaskedLM`` (no pooler, decoder tied to the
        word embeddings, so only its bias counts); ``cls``: sequence classification
        with ``num_labels``; ``qa``: question answering (no pooler).
        """
        if head not in HEADS:
            raise ConfigError(f"head: unknown head {head!r} (expected one of {list(HEADS)})")
        d, ops = self.plan(self.validate(arch))
        enc = encoder_params(d, ops)
        if head == "encoder":
            return enc
        e = self.embeddings
        emb = d * (e.vocab_size + e.max_position_embeddings + e.type_vocab_size) + 2 * d
        pooler = d * d + d
        extra = {
            "base": pooler,
            "mlm": (d * d + d) + 2 * d + e.vocab_size,
            "cls": pooler + d * num_labels + num_labels,
            "qa": 2 * d + 2,
        }[head]
        return emb + enc + extra

    def flops(self, arch: A | str, seq_len: int = 128) -> int:
        """Encoder matmul/conv FLOPs for one sequence (see :func:`encoder_flops`)."""
        d, ops = self.plan(self.validate(arch))
        return encoder_flops(d, ops, seq_len)

    def bin_edges(
        self, n_bins: int, method: str = "uniform", samples: int = 2000, seed: int = 0, head: str = "encoder"
    ) -> list[int]:
        """``n_bins + 1`` increasing parameter-count edges covering the whole space.

        ``uniform`` splits [smallest, largest] evenly; ``quantile`` puts equal
        shares of uniformly sampled archs in each bin (useful where most random
        archs cluster around the mean size, as in layer-wise spaces).
        """
        if not _pos_int(n_bins):
            raise ConfigError(f"n_bins: expected a positive integer, got {n_bins!r}")
        lo, hi = self.params(self.smallest(), head), self.params(self.largest(), head)
        if method == "uniform":
            inner = [lo + (hi - lo) * i // n_bins for i in range(1, n_bins)]
        elif method == "quantile":
            rng = random.Random(seed)
            counts = sorted(self.params(self.sample(rng), head) for _ in range(samples))
            inner = [counts[len(counts) * i // n_bins] for i in range(1, n_bins)]
        else:
            raise ConfigError(f"method: unknown binning {method!r} (expected 'uniform' or 'quantile')")
        return [lo, *inner, hi + 1]

    def bin_of(self, arch: A | str, edges: Sequence[int], head: str = "encoder") -> int:
        """Index of the bin (``edges[i] <= params < edges[i+1]``) holding ``arch``."""
        p = self.params(arch, head)
        i = bisect.bisect_right(list(edges), p) - 1
        if not 0 <= i < len(edges) - 1:
            raise ConfigError(f"arch {self.format(arch)} has {p} params, outside the bin edges {edges[0]}..{edges[-1]}")
        return i
