"""AutoTinyBERT's space: L identical BERT layers, arch ``L-d_m-d_f-h-d_qkv``.

Two MHA extraction strategies (paper Fig. 3) decide how ``(h, d_qkv)`` index the
supernet's heads: ``heads`` keeps the head dim and takes the first ``h`` heads
(``d_qkv = head_dim * h``, used with MLM); ``dims`` keeps the heads and takes the
first ``d_qkv / h`` dims of each (used with KD so attention maps can be matched).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from raynas.errors import ConfigError
from raynas.spaces.base import Choice, EmbeddingShape, Space, raise_errors, read_embeddings
from raynas.spaces.ops import FFN, MHA, OpSpec

STRATEGIES = ("heads", "dims")
DIMS = ("layers", "hidden", "ffn", "heads", "qkv")


@dataclass(frozen=True)
class TinyArch:
    layers: int
    hidden: int
    ffn: int
    heads: int
    qkv: int

    def __str__(self) -> str:
        return f"{self.layers}-{self.hidden}-{self.ffn}-{self.heads}-{self.qkv}"


class HomogeneousSpace(Space[TinyArch]):
    kind = "homogeneous"

    def __init__(
        self,
        name: str,
        strategy: str,
        head_dim: int,
        dims: dict[str, Choice],
        embeddings: EmbeddingShape | None = None,
    ) -> None:
        self.name, self.strategy, self.head_dim = name, strategy, head_dim
        self.dims = dims
        self.embeddings = embeddings or EmbeddingShape()
        errors: list[str] = []
        if strategy not in STRATEGIES:
            errors.append(f"strategy: {strategy!r} is not one of {list(STRATEGIES)}")
        elif strategy == "dims":
            for h in dims["heads"].values:
                if not self._qkv_choices(h):
                    errors.append(f"qkv: no value in {dims['qkv'].text} is divisible by heads={h} within head_dim {head_dim}")
        raise_errors(f"space {name!r}", errors)

    # ---- construction -------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "space") -> HomogeneousSpace:
        errors: list[str] = []
        allowed = {"kind", "name", "strategy", "head_dim", "embeddings", *DIMS}
        errors += [f"{k}: unknown key (expected one of {sorted(allowed)})" for k in sorted(set(raw) - allowed)]
        strategy = raw.get("strategy", "heads")
        head_dim = raw.get("head_dim", 64)
        if not (isinstance(head_dim, int) and head_dim > 0):
            errors.append(f"head_dim: expected a positive integer, got {head_dim!r}")
        needed = DIMS if strategy == "dims" else DIMS[:4]
        dims: dict[str, Choice] = {}
        for key in needed:
            if key not in raw:
                errors.append(f"{key}: missing (give min/max[/step] or values)")
                continue
            choice = Choice.from_spec(key, raw[key], errors)
            if choice is not None:
                dims[key] = choice
        if strategy == "heads" and "qkv" in raw:
            errors.append("qkv: not allowed with strategy 'heads' (qkv = head_dim * heads there)")
        if strategy == "heads" and isinstance(head_dim, int) and "heads" in dims:
            dims["qkv"] = Choice("qkv", tuple(head_dim * h for h in dims["heads"].values), f"{head_dim} * heads")
        embeddings = read_embeddings(raw.get("embeddings"), errors)
        raise_errors(where, errors)
        return cls(str(raw.get("name", "homogeneous")), strategy, head_dim, dims, embeddings)

    @classmethod
    def around(
        cls, layers: int, hidden: int, ffn: int, heads: int, head_dim: int, embeddings: EmbeddingShape,
        strategy: str = "heads", step: int = 4, name: str = "teacher",
    ) -> HomogeneousSpace:
        """A space whose largest arch is the given model (e.g. a teacher), with Table B.1's shape.

        Widths go down to about a sixth of the maximum (paper: 128 of 768) in
        ``step`` increments; ``dims`` keeps all heads and varies d_qkv in steps of ``heads``.
        """
        def span(top: int, unit: int) -> dict[str, int]:
            low = max(unit, top - unit * ((top - max(top // 6, unit)) // unit))
            return {"min": low, "max": top, "step": unit}

        raw: dict[str, Any] = {
            "name": name, "strategy": strategy, "head_dim": head_dim, "layers": {"min": 1, "max": layers},
            "hidden": span(hidden, step), "ffn": span(ffn, step), "embeddings": embeddings.to_dict(),
        }
        if strategy == "dims":
            raw["heads"] = {"values": [heads]}
            raw["qkv"] = span(heads * head_dim, heads)
        else:
            raw["heads"] = {"min": 1, "max": heads}
        return cls.from_dict(raw, where=f"space around {layers}-{hidden}-{ffn}-{heads}-{heads * head_dim}")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "name": self.name, "strategy": self.strategy, "head_dim": self.head_dim}
        for key in DIMS if self.strategy == "dims" else DIMS[:4]:
            out[key] = self.dims[key].to_spec()
        out["embeddings"] = self.embeddings.to_dict()
        return out

    # ---- arch strings and validation -------------------------------------------------
    def parse(self, arch: TinyArch | str) -> TinyArch:
        if isinstance(arch, TinyArch):
            return arch
        if not isinstance(arch, str):
            raise ConfigError(f"arch: expected a string L-d_m-d_f-h-d_qkv, got {type(arch).__name__}")
        parts = arch.strip().split("-")
        if len(parts) != 5 or not all(p.isdigit() for p in parts):
            raise ConfigError(f"arch {arch!r}: expected L-d_m-d_f-h-d_qkv as 5 positive integers, e.g. "
                              f"{self.example()} (valid in space {self.name})")
        return TinyArch(*(int(p) for p in parts))

    def validate(self, arch: TinyArch | str) -> TinyArch:
        a = self.parse(arch)
        for key in DIMS:
            value = getattr(a, key)
            if value not in self.dims[key]:
                raise ConfigError(f"arch {a}: {key}={value} is not in {self.dims[key].text} (space {self.name!r})")
        if self.strategy == "heads" and a.qkv != self.head_dim * a.heads:
            raise ConfigError(f"arch {a}: qkv={a.qkv} must be head_dim*heads={self.head_dim * a.heads} (strategy 'heads')")
        if a.qkv % a.heads:
            raise ConfigError(f"arch {a}: qkv={a.qkv} is not divisible by heads={a.heads}")
        if a.qkv // a.heads > self.head_dim:
            raise ConfigError(f"arch {a}: qkv={a.qkv} gives {a.qkv // a.heads} dims per head, over head_dim={self.head_dim}")
        return a

    # ---- sampling --------------------------------------------------------------------
    def _qkv_choices(self, heads: int) -> tuple[int, ...]:
        if self.strategy == "heads":
            return (self.head_dim * heads,)
        return tuple(q for q in self.dims["qkv"].values if q % heads == 0 and q // heads <= self.head_dim)

    def _fix_qkv(self, a: dict[str, int], rng: random.Random) -> TinyArch:
        choices = self._qkv_choices(a["heads"])
        if a["qkv"] not in choices:
            a["qkv"] = rng.choice(choices)
        return TinyArch(**a)

    def sample(self, rng: random.Random) -> TinyArch:
        a = {key: self.dims[key].sample(rng) for key in DIMS[:4]}
        a["qkv"] = rng.choice(self._qkv_choices(a["heads"]))
        return TinyArch(**a)

    def mutate(self, arch: TinyArch | str, rng: random.Random, prob: float = 0.5) -> TinyArch:
        a = self.validate(arch)
        out = {key: (self.dims[key].sample(rng) if rng.random() < prob else getattr(a, key)) for key in DIMS}
        return self._fix_qkv(out, rng)

    def crossover(self, a: TinyArch | str, b: TinyArch | str, rng: random.Random) -> TinyArch:
        pa, pb = self.validate(a), self.validate(b)
        out = {key: getattr(rng.choice((pa, pb)), key) for key in DIMS}
        return self._fix_qkv(out, rng)

    def example(self) -> TinyArch:
        """A mid-sized arch of this space (what an error message can suggest): seeded, always valid."""
        return self.sample(random.Random(0))

    def smallest(self) -> TinyArch:
        h = self.dims["heads"].min
        return TinyArch(self.dims["layers"].min, self.dims["hidden"].min, self.dims["ffn"].min, h, min(self._qkv_choices(h)))

    def largest(self) -> TinyArch:
        h = self.dims["heads"].max
        return TinyArch(self.dims["layers"].max, self.dims["hidden"].max, self.dims["ffn"].max, h, max(self._qkv_choices(h)))

    # ---- what the arch computes ---------------------------------------------------------
    def encode(self, arch: TinyArch | str) -> list[float]:
        a = self.validate(arch)
        return [getattr(a, key) / self.dims[key].max for key in DIMS]

    def plan(self, arch: TinyArch | str) -> tuple[int, tuple[OpSpec, ...]]:
        a = self.parse(arch)
        return a.hidden, (MHA(a.heads, a.qkv // a.heads), FFN(a.ffn)) * a.layers

    def slots(self) -> list[dict[str, OpSpec]]:
        mha = MHA(self.dims["heads"].max, self.head_dim)
        ffn = FFN(self.dims["ffn"].max)
        return [{"mha": mha}, {"ffn": ffn}] * self.dims["layers"].max
