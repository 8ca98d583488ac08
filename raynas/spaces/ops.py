"""The op-layer vocabulary shared by every space, supernet and exported model.

A model is embeddings, then a chain of op-layers, then heads. Each op-layer is
one of four ops and always maps ``hidden -> hidden`` (residual + post-LayerNorm),
so ops compose freely: a BERT layer is an ``mha`` op followed by an ``ffn`` op.
Keeping this vocabulary in one place is what lets the analytic counts, the
elastic supernet and the exported model agree exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

from raynas.errors import ConfigError, require


@dataclass(frozen=True)
class MHA:
    """Multi-head self-attention with ``heads`` heads of ``head_dim`` each."""

    heads: int
    head_dim: int

    op = "mha"

    @property
    def inner(self) -> int:
        return self.heads * self.head_dim

    @property
    def slot(self) -> str:
        return "mha"

    def params(self, d: int) -> int:
        q = self.inner
        return 3 * (d * q + q) + (q * d + d) + 2 * d

    def flops(self, d: int, n: int) -> int:
        q = self.inner
        return 2 * n * d * q * 3 + 2 * n * n * q * 2 + 2 * n * q * d

    def to_dict(self) -> dict[str, Any]:
        return {"op": "mha", "heads": self.heads, "head_dim": self.head_dim}

    def __str__(self) -> str:
        return f"mha{self.heads}x{self.head_dim}"


@dataclass(frozen=True)
class FFN:
    """Position-wise feed-forward block ``d -> inner -> d`` with GELU."""

    inner: int

    op = "ffn"

    @property
    def slot(self) -> str:
        return "ffn"

    def params(self, d: int) -> int:
        return (d * self.inner + self.inner) + (self.inner * d + d) + 2 * d

    def flops(self, d: int, n: int) -> int:
        return 4 * n * d * self.inner

    def to_dict(self) -> dict[str, Any]:
        return {"op": "ffn", "inner": self.inner}

    def __str__(self) -> str:
        return f"ffn{self.inner}"


@dataclass(frozen=True)
class SepConv:
    """Separable convolution: project to ``inner``, depth-wise conv, GELU, project back.

    Each kernel size is its own slot in a supernet (its own weights); sizes of the
    same kernel share bottom-left slices.
    """

    kernel: int
    inner: int

    op = "conv"

    @property
    def slot(self) -> str:
        return f"conv{self.kernel}"

    def params(self, d: int) -> int:
        c = self.inner
        return (d * c + c) + (c * self.kernel + c) + (c * d + d) + 2 * d

    def flops(self, d: int, n: int) -> int:
        return 4 * n * d * self.inner + 2 * n * self.inner * self.kernel

    def to_dict(self) -> dict[str, Any]:
        return {"op": "conv", "kernel": self.kernel, "inner": self.inner}

    def __str__(self) -> str:
        return f"conv{self.kernel}_{self.inner}"


@dataclass(frozen=True)
class Identity:
    """Skip: the op-layer passes its input through unchanged."""

    op = "id"

    @property
    def slot(self) -> str:
        return "id"

    def params(self, d: int) -> int:
        return 0

    def flops(self, d: int, n: int) -> int:
        return 0

    def to_dict(self) -> dict[str, Any]:
        return {"op": "id"}

    def __str__(self) -> str:
        return "id"


OpSpec = Union[MHA, FFN, SepConv, Identity]

_FIELDS = {"mha": ("heads", "head_dim"), "ffn": ("inner",), "conv": ("kernel", "inner"), "id": ()}
# A pruned model may keep an MHA block with no heads or an FFN block with no neurons: it still adds the
# output bias and applies the residual LayerNorm, which is not the identity (see modeling_raynas.mha_op).
_LEAST = {("mha", "heads"): 0, ("ffn", "inner"): 0}


def op_from_dict(raw: Any, where: str = "op") -> OpSpec:
    """Build an op from its config dict, naming ``where`` in any error."""
    require(isinstance(raw, dict), f"{where}: expected a mapping like {{'op': 'ffn', 'inner': 512}}, got {raw!r}")
    kind = raw.get("op")
    if kind not in _FIELDS:
        raise ConfigError(f"{where}.op: unknown op {kind!r} (expected one of {sorted(_FIELDS)})")
    fields = _FIELDS[kind]
    extra = sorted(set(raw) - {"op", *fields})
    require(not extra, f"{where}: unknown field(s) {extra} for op {kind!r}")
    values = {}
    for name in fields:
        value, least = raw.get(name), _LEAST.get((kind, name), 1)
        require(
            isinstance(value, int) and not isinstance(value, bool) and value >= least,
            f"{where}.{name}: expected {'a positive' if least else 'a non-negative'} integer, got {value!r}",
        )
        values[name] = value
    if kind == "mha":
        return MHA(**values)
    if kind == "ffn":
        return FFN(**values)
    if kind == "conv":
        require(values["kernel"] % 2 == 1, f"{where}.kernel: must be odd to keep the sequence length, got {values['kernel']}")
        return SepConv(**values)
    return Identity()


def encoder_params(hidden: int, ops: list[OpSpec] | tuple[OpSpec, ...]) -> int:
    """Parameters of the op-layer chain alone."""
    return sum(op.params(hidden) for op in ops)


def encoder_flops(hidden: int, ops: list[OpSpec] | tuple[OpSpec, ...], seq_len: int) -> int:
    """Matmul + convolution FLOPs (2 per multiply-add) of the chain for one sequence.

    Softmax, LayerNorm, GELU and additions are not counted, the same convention as
    ``torch.utils.flop_counter`` (which the tests check this against).
    """
    return sum(op.flops(hidden, seq_len) for op in ops)
