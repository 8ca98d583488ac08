"""NAS-BERT's layer-wise heterogeneous space: each op-layer picks one op.

Arch string: ``HIDDEN:op,op,...`` with one token per op-layer, e.g.
``512:mha256,ffn1024,conv3_128,id``. Tokens: ``mha<inner>`` (heads =
inner / head_dim), ``ffn<inner>``, ``conv<kernel>_<inner>``, ``id``. The JSON
form ``{"hidden": 512, "ops": [...]}`` is accepted too.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from typing import Any

from raynas.errors import ConfigError
from raynas.spaces.base import Choice, EmbeddingShape, Space, raise_errors, read_embeddings
from raynas.spaces.ops import FFN, MHA, Identity, OpSpec, SepConv

_TOKEN = re.compile(r"^(?:mha(\d+)|ffn(\d+)|conv(\d+)_(\d+)|id)$")


@dataclass(frozen=True)
class LayerwiseArch:
    hidden: int
    ops: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.hidden}:" + ",".join(self.ops)

    def to_json(self) -> str:
        return json.dumps({"hidden": self.hidden, "ops": list(self.ops)})


class LayerwiseSpace(Space[LayerwiseArch]):
    kind = "layerwise"

    def __init__(
        self,
        name: str,
        num_layers: int,
        hidden: Choice,
        head_dim: int,
        mha: tuple[int, ...],
        ffn: tuple[int, ...],
        conv_kernels: tuple[int, ...],
        conv_inner: tuple[int, ...],
        identity: bool,
        embeddings: EmbeddingShape | None = None,
    ) -> None:
        self.name, self.num_layers, self.hidden, self.head_dim = name, num_layers, hidden, head_dim
        self.mha, self.ffn = tuple(sorted(mha)), tuple(sorted(ffn))
        self.conv_kernels, self.conv_inner = tuple(sorted(conv_kernels)), tuple(sorted(conv_inner))
        self.identity = identity
        self.embeddings = embeddings or EmbeddingShape()
        errors = [f"ops.mha: inner size {m} is not a multiple of head_dim {head_dim}" for m in self.mha if m % head_dim]
        errors += [f"ops.conv.kernels: kernel {k} must be odd" for k in self.conv_kernels if k % 2 == 0]
        self.tokens: tuple[str, ...] = (
            *(f"mha{m}" for m in self.mha),
            *(f"ffn{f}" for f in self.ffn),
            *(f"conv{k}_{c}" for k in self.conv_kernels for c in self.conv_inner),
            *(("id",) if identity else ()),
        )
        if not self.tokens:
            errors.append("ops: the space has no op at all")
        raise_errors(f"space {name!r}", errors)
        self._token_set = frozenset(self.tokens)
        self._max_inner = max([*self.mha, *self.ffn, *self.conv_inner, 1])
        self._max_kernel = max([*self.conv_kernels, 1])

    # ---- construction -------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "space") -> LayerwiseSpace:
        errors: list[str] = []
        allowed = {"kind", "name", "num_layers", "hidden", "head_dim", "ops", "embeddings"}
        errors += [f"{k}: unknown key (expected one of {sorted(allowed)})" for k in sorted(set(raw) - allowed)]
        num_layers, head_dim = raw.get("num_layers"), raw.get("head_dim", 64)
        for key, value in (("num_layers", num_layers), ("head_dim", head_dim)):
            if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
                errors.append(f"{key}: expected a positive integer, got {value!r}")
        hidden = Choice.from_spec("hidden", raw.get("hidden"), errors)
        ops = raw.get("ops")
        lists: dict[str, tuple[int, ...]] = {}
        identity = False
        if not isinstance(ops, dict):
            errors.append(f"ops: expected a mapping with mha/ffn/conv/identity, got {ops!r}")
        else:
            errors += [f"ops.{k}: unknown op (expected mha, ffn, conv, identity)" for k in sorted(set(ops) - {"mha", "ffn", "conv", "identity"})]
            conv = ops.get("conv", {})
            if not isinstance(conv, dict) or set(conv) - {"kernels", "inner"}:
                errors.append(f"ops.conv: expected a mapping with kernels and inner, got {conv!r}")
                conv = {}
            for key, value in (("mha", ops.get("mha", [])), ("ffn", ops.get("ffn", [])),
                               ("conv.kernels", conv.get("kernels", [])), ("conv.inner", conv.get("inner", []))):
                if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
                    errors.append(f"ops.{key}: expected a list of positive integers, got {value!r}")
                else:
                    lists[key] = tuple(value)
            if bool(lists.get("conv.kernels")) != bool(lists.get("conv.inner")):
                errors.append("ops.conv: give both kernels and inner, or neither")
            identity = ops.get("identity", False)
            if not isinstance(identity, bool):
                errors.append(f"ops.identity: expected true or false, got {identity!r}")
        embeddings = read_embeddings(raw.get("embeddings"), errors)
        raise_errors(where, errors)
        return cls(
            str(raw.get("name", "layerwise")), num_layers, hidden, head_dim,  # type: ignore[arg-type]
            lists["mha"], lists["ffn"], lists["conv.kernels"], lists["conv.inner"], identity, embeddings,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "name": self.name, "num_layers": self.num_layers,
            "hidden": self.hidden.to_spec(), "head_dim": self.head_dim,
            "ops": {"mha": list(self.mha), "ffn": list(self.ffn),
                    "conv": {"kernels": list(self.conv_kernels), "inner": list(self.conv_inner)},
                    "identity": self.identity},
            "embeddings": self.embeddings.to_dict(),
        }

    # ---- arch strings and validation -------------------------------------------------
    def parse(self, arch: LayerwiseArch | str) -> LayerwiseArch:
        if isinstance(arch, LayerwiseArch):
            return arch
        if not isinstance(arch, str):
            raise ConfigError(f"arch: expected a string HIDDEN:op,op,..., got {type(arch).__name__}")
        text = arch.strip()
        if text.startswith("{"):
            try:
                raw = json.loads(text)
                return LayerwiseArch(int(raw["hidden"]), tuple(str(t) for t in raw["ops"]))
            except (ValueError, KeyError, TypeError) as exc:
                raise ConfigError(f"arch {arch!r}: expected JSON {{\"hidden\": int, \"ops\": [str, ...]}} ({exc})") from None
        head, sep, body = text.partition(":")
        if not sep or not head.isdigit() or not body:
            raise ConfigError(f"arch {arch!r}: expected HIDDEN:op,op,... e.g. 512:mha256,ffn1024,conv3_128,id")
        ops = tuple(t.strip() for t in body.split(","))
        for i, token in enumerate(ops):
            if not _TOKEN.match(token):
                raise ConfigError(f"arch {arch!r}: op-layer {i} token {token!r} is not mha<N>, ffn<N>, conv<K>_<N> or id")
        return LayerwiseArch(int(head), ops)

    def validate(self, arch: LayerwiseArch | str) -> LayerwiseArch:
        a = self.parse(arch)
        if a.hidden not in self.hidden:
            raise ConfigError(f"arch {a}: hidden={a.hidden} is not in {self.hidden.text} (space {self.name!r})")
        if len(a.ops) != self.num_layers:
            raise ConfigError(f"arch {a}: has {len(a.ops)} op-layers, space {self.name!r} has {self.num_layers}")
        for i, token in enumerate(a.ops):
            if token not in self._token_set:
                raise ConfigError(f"arch {a}: op-layer {i} op {token!r} is not in space {self.name!r} ({', '.join(self.tokens)})")
        return a

    # ---- sampling --------------------------------------------------------------------
    def sample(self, rng: random.Random) -> LayerwiseArch:
        return LayerwiseArch(self.hidden.sample(rng), tuple(rng.choice(self.tokens) for _ in range(self.num_layers)))

    def mutate(self, arch: LayerwiseArch | str, rng: random.Random, prob: float = 0.5) -> LayerwiseArch:
        a = self.validate(arch)
        hidden = self.hidden.sample(rng) if rng.random() < prob else a.hidden
        return LayerwiseArch(hidden, tuple(rng.choice(self.tokens) if rng.random() < prob else t for t in a.ops))

    def crossover(self, a: LayerwiseArch | str, b: LayerwiseArch | str, rng: random.Random) -> LayerwiseArch:
        pa, pb = self.validate(a), self.validate(b)
        return LayerwiseArch(rng.choice((pa, pb)).hidden, tuple(rng.choice(pair) for pair in zip(pa.ops, pb.ops)))

    def _by_params(self, hidden: int) -> list[str]:
        return sorted(self.tokens, key=lambda t: self.op_of(t).params(hidden))

    def smallest(self) -> LayerwiseArch:
        return LayerwiseArch(self.hidden.min, (self._by_params(self.hidden.min)[0],) * self.num_layers)

    def largest(self) -> LayerwiseArch:
        return LayerwiseArch(self.hidden.max, (self._by_params(self.hidden.max)[-1],) * self.num_layers)

    # ---- what the arch computes ---------------------------------------------------------
    def op_of(self, token: str) -> OpSpec:
        m = _TOKEN.match(token)
        if m is None:
            raise ConfigError(f"op token {token!r} is not mha<N>, ffn<N>, conv<K>_<N> or id")
        mha, ffn, kernel, inner = m.groups()
        if mha:
            return MHA(int(mha) // self.head_dim, self.head_dim)
        if ffn:
            return FFN(int(ffn))
        if kernel:
            return SepConv(int(kernel), int(inner))
        return Identity()

    @staticmethod
    def token_of(op: OpSpec) -> str:
        """The arch-string token of ``op``, the inverse of :meth:`op_of` (``MHA(12, 32)`` -> ``mha384``)."""
        if isinstance(op, MHA):
            return f"mha{op.inner}"
        if isinstance(op, FFN):
            return f"ffn{op.inner}"
        if isinstance(op, SepConv):
            return f"conv{op.kernel}_{op.inner}"
        return "id"

    def encode(self, arch: LayerwiseArch | str) -> list[float]:
        a = self.validate(arch)
        out = [a.hidden / self.hidden.max]
        for token in a.ops:
            op = self.op_of(token)
            kinds = [float(op.op == k) for k in ("mha", "ffn", "conv", "id")]
            inner = getattr(op, "inner", 0) / self._max_inner
            kernel = getattr(op, "kernel", 0) / self._max_kernel
            out += [*kinds, inner, kernel]
        return out

    def plan(self, arch: LayerwiseArch | str) -> tuple[int, tuple[OpSpec, ...]]:
        a = self.parse(arch)
        return a.hidden, tuple(self.op_of(t) for t in a.ops)

    def slots(self) -> list[dict[str, OpSpec]]:
        layer: dict[str, OpSpec] = {}
        if self.mha:
            layer["mha"] = MHA(self.mha[-1] // self.head_dim, self.head_dim)
        if self.ffn:
            layer["ffn"] = FFN(self.ffn[-1])
        for k in self.conv_kernels:
            layer[f"conv{k}"] = SepConv(k, self.conv_inner[-1])
        return [dict(layer) for _ in range(self.num_layers)]
