"""What a budget limits: an arch's predicted latency, its parameter count or its FLOPs.

Search filters every candidate by its *cost* before it costs an evaluation
(AutoTinyBERT: ``lat(.)`` rejects candidates over the latency constraint), so a
:class:`Constraint` turns archs into one number in one unit and budget strings
into the largest admissible number:

- ``"4x"``: a speedup, ``reference / 4``. For latency the reference is the
  predictor's ``reference_ms`` (the teacher or the space's largest arch, timed in
  the same run as the predictor's data); for params / FLOPs it is the space's
  largest arch.
- ``"12ms"`` (latency only), ``"20M"`` / ``"1.5G"`` (params or FLOPs, suffixes
  K, M, G, T), or a plain number in the constraint's unit.

A budget below the smallest arch's cost can hold no arch: it is refused up front
with a message that says so, instead of a search that finds nothing. Pure
python (the predictor is whatever object has ``predict`` and ``reference_ms``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

from raynas.errors import ConfigError
from raynas.spaces import Space

KINDS = ("latency", "params", "flops")
UNITS = {"latency": "ms", "params": "params", "flops": "flops"}
#: the column of an evaluated-arch row that holds the cost in each unit (see raynas.search.results)
COST_COLUMN = {"ms": "predicted_latency_ms", "params": "params", "flops": "flops"}
SUFFIXES = {"k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_SPEEDUP = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)x$", re.IGNORECASE)
_MS = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)\s*ms$", re.IGNORECASE)
_COUNT = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)\s*([kmgt])$", re.IGNORECASE)
_PLAIN = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?$", re.IGNORECASE)


class Predictor(Protocol):
    """What a constraint needs of :class:`raynas.search.predictor.LatencyPredictor`."""

    reference_ms: float | None

    def predict(self, archs: Sequence[Any]) -> list[float]: ...


@dataclass(frozen=True)
class Budget:
    """One budget: its label as given, the largest admissible cost, that cost's unit, and the speedup it asks for."""

    label: str
    value: float
    unit: str
    speedup: float | None = None  # the N of "Nx"; None for absolute budgets

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "value": self.value, "unit": self.unit, "speedup": self.speedup}


def human(value: float, unit: str) -> str:
    """``12.3 ms``, ``4.2M params``: costs in messages."""
    if unit == "ms":
        return f"{value:.3g} ms"
    for suffix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix} {unit}"
    return f"{value:.3g} {unit}"


class Constraint:
    """Costs of archs of ``space`` under one ``kind`` (latency | params | flops), and budgets in that unit.

    ``predictor``: needed for ``latency``; with another kind it still fills the
    predicted latency of rows when given. ``seq_len``: the sequence length FLOPs
    are counted at. Costs are cached per arch string (search asks about the same
    archs again when it checks them against several budgets).
    """

    def __init__(self, space: Space, kind: str = "latency", predictor: Predictor | None = None,
                 seq_len: int = 128) -> None:
        if kind not in KINDS:
            raise ConfigError(f"constraint: unknown kind {kind!r} (expected one of {list(KINDS)})")
        if kind == "latency" and predictor is None:
            raise ConfigError("constraint latency: needs a latency predictor (--predictor DIR)")
        name = getattr(predictor, "space_name", None)
        if predictor is not None and name is not None and name != space.name:
            raise ConfigError(f"predictor: fitted on space {name!r}, but the supernet's space is {space.name!r}")
        fitted = getattr(predictor, "space", None)
        if isinstance(fitted, Space) and fitted.to_dict() != space.to_dict():
            raise ConfigError(f"predictor: fitted on a space {space.name!r} with other dimensions than the "
                              "supernet's (measure and fit it for this supernet's space)")
        self.space, self.kind, self.unit = space, kind, UNITS[kind]
        self.predictor, self.seq_len = predictor, seq_len
        self._latency: dict[str, float] = {}

    # ---- per-arch numbers ------------------------------------------------------------
    def latency_ms(self, archs: Sequence[Any]) -> list[float] | None:
        """Predicted milliseconds per arch (None without a predictor); one predictor call for the uncached ones."""
        if self.predictor is None:
            return None
        names = [self.space.format(a) for a in archs]
        todo = sorted({n for n in names if n not in self._latency})
        if todo:
            for n, ms in zip(todo, self.predictor.predict(todo), strict=True):
                self._latency[n] = float(ms)
        return [self._latency[n] for n in names]

    def costs(self, archs: Sequence[Any]) -> list[float]:
        """The constrained number of each arch, in :attr:`unit`."""
        if self.kind == "latency":
            out = self.latency_ms(archs)
            assert out is not None  # a latency constraint always has a predictor
            return out
        if self.kind == "params":
            return [float(self.space.params(a, "base")) for a in archs]
        return [float(self.space.flops(a, self.seq_len)) for a in archs]

    def cost(self, arch: Any) -> float:
        return self.costs([arch])[0]

    def describe(self, archs: Sequence[Any]) -> list[dict[str, Any]]:
        """Per arch: ``params`` (base model), ``flops``, ``predicted_latency_ms`` (None without a predictor)."""
        lat = self.latency_ms(archs)
        return [{"params": self.space.params(a, "base"), "flops": self.space.flops(a, self.seq_len),
                 "predicted_latency_ms": None if lat is None else lat[i]} for i, a in enumerate(archs)]

    # ---- budgets ------------------------------------------------------------------------
    @property
    def reference(self) -> float | None:
        """The cost an ``Nx`` budget divides: the predictor's reference latency, or the largest arch's count."""
        if self.kind == "latency":
            ref = getattr(self.predictor, "reference_ms", None)
            return float(ref) if ref else None
        return self.cost(self.space.largest())

    def speedup(self, cost: float | None) -> float | None:
        """``reference / cost`` (how many times cheaper than the reference), None where either is unknown."""
        ref = self.reference
        return None if ref is None or not cost else ref / cost

    def latency_speedup(self, latency_ms: float | None) -> float | None:
        """Predicted speedup over the predictor's reference, whatever the constraint's kind."""
        ref = getattr(self.predictor, "reference_ms", None)
        return None if not ref or not latency_ms else float(ref) / latency_ms

    def parse_budget(self, text: Any) -> Budget:
        """A :class:`Budget` from ``"4x"``, ``"12ms"``, ``"20M"``, ``"1.5G"`` or a plain number (no range check)."""
        label = str(text).strip()
        if isinstance(text, bool) or not label:
            raise ConfigError(f"budget {text!r}: expected e.g. 4x, 12ms, 20M or a number")
        compact = label.replace(" ", "")
        if m := _SPEEDUP.match(compact):
            n = float(m.group(1))
            if n <= 0:
                raise ConfigError(f"budget {label}: a speedup must be > 0")
            ref = self.reference
            if ref is None:
                raise ConfigError(f"budget {label}: a speedup needs the predictor's reference latency "
                                  "(this predictor has no reference_ms; give the budget in ms)")
            return Budget(label, ref / n, self.unit, n)
        if m := _MS.match(compact):
            if self.kind != "latency":
                raise ConfigError(f"budget {label}: milliseconds, but the constraint is {self.kind}")
            return Budget(label, float(m.group(1)), "ms")
        if m := _COUNT.match(compact):
            if self.kind == "latency":
                raise ConfigError(f"budget {label}: a count ({m.group(2).upper()}), but the constraint is latency "
                                  "(give e.g. 12ms or 4x)")
            return Budget(label, float(m.group(1)) * SUFFIXES[m.group(2).lower()], self.unit)
        if _PLAIN.match(compact):
            value = float(compact)
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"budget {label}: must be a positive number")
            return Budget(label, value, self.unit)
        raise ConfigError(f"budget {label!r}: not understood (expected e.g. 4x, 12ms for latency, "
                          "20M / 1.5G for params or flops, or a plain number)")

    def budgets(self, texts: Sequence[Any]) -> list[Budget]:
        """Parse every budget and check each admits at least the space's smallest arch; labels must be distinct."""
        if not texts:
            raise ConfigError("budgets: give at least one budget (e.g. [2x, 4x])")
        out = [self.parse_budget(t) for t in texts]
        labels = [b.label for b in out]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ConfigError(f"budgets: {', '.join(dup)} given twice")
        smallest = self.space.smallest()
        floor = self.cost(smallest)
        verb = "predicted " if self.kind == "latency" else ""
        for b in out:
            if floor > b.value:
                what = "faster than" if b.unit == "ms" else "below"
                raise ConfigError(f"budget {b.label}: {what} the smallest arch of the space "
                                  f"({self.space.format(smallest)}: {verb}{human(floor, b.unit)} > "
                                  f"{human(b.value, b.unit)})")
        return out

    def fits(self, arch: Any, budget: Budget) -> bool:
        return self.cost(arch) <= budget.value
