"""Elastic modules: hold the largest weights, run a bottom-left slice of them.

Each module's parameter names match the plain module in
:mod:`raynas.models.modeling_raynas`, and ``active_params(d, spec)`` returns the
slices under those names. ``forward`` feeds those slices to the same op
function the plain module uses, and extraction copies the same slices, so an
extracted model cannot drift from the supernet's active path.
"""

from __future__ import annotations

from functools import lru_cache, partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from raynas.models.modeling_raynas import Layer, conv_op, embed_op, ffn_op, mha_op, mlm_op
from raynas.spaces.base import EmbeddingShape
from raynas.spaces.ops import FFN, MHA, OpSpec, SepConv

Tensor = torch.Tensor
Params = dict[str, Tensor]


def _linear(p: Params, name: str) -> Layer:
    """The functional twin of the plain model's ``nn.Linear`` named ``name``, over its active slice."""
    return partial(F.linear, weight=p[f"{name}.weight"], bias=p.get(f"{name}.bias"))


def _norm(p: Params, eps: float, name: str = "LayerNorm") -> Layer:
    w = p[f"{name}.weight"]
    return partial(F.layer_norm, normalized_shape=(w.shape[0],), weight=w, bias=p[f"{name}.bias"], eps=eps)


class _Corner(torch.autograd.Function):
    """``w[:s0, :s1, ...]`` whose backward writes the full-size gradient in one pass.

    The forward returns the very view plain slicing returns, so outputs are
    bit-identical. Autograd's own backward runs one SliceBackward per sliced
    dim, each allocating a zero-filled buffer and copying into it: for a 2-D
    ``w[:r, :c]`` that is an extra ``r x max`` buffer, and every element of the
    full gradient written twice. Here the gradient lands in its corner once and
    only the rest is zeroed; measured with ``raynas bench supernet``.
    """

    @staticmethod
    def forward(ctx: Any, w: Tensor, *sizes: int) -> Tensor:
        ctx.shape = w.shape
        return w[tuple(slice(0, s) for s in sizes)]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        full = grad.new_empty(ctx.shape)
        sizes = grad.shape
        full[tuple(slice(0, s) for s in sizes)] = grad
        for k, (s, n) in enumerate(zip(sizes, ctx.shape, strict=True)):
            if s < n:  # rows [:s0, ..., :s(k-1), sk:]: the complement, in disjoint blocks
                full[(*(slice(0, t) for t in sizes[:k]), slice(s, None))].zero_()
        return (full, *([None] * len(sizes)))


def _corner(w: Tensor, *sizes: int) -> Tensor:
    """``w[:sizes[0], :sizes[1], ...]`` (leading dims; the rest whole), cheap to differentiate.

    :class:`_Corner` only where two or more dims are cut and autograd is on;
    otherwise (extraction, :func:`write_views`) the plain slice.
    """
    cut = [s < n for s, n in zip(sizes, w.shape, strict=False)]
    if sum(cut) > 1 and torch.is_grad_enabled() and w.requires_grad:
        return _Corner.apply(w, *sizes)
    return w[tuple(slice(0, s) for s in sizes)]  # one SliceBackward at most: autograd's own is as cheap


def _ln(ln: nn.LayerNorm, d: int) -> Params:
    return {"LayerNorm.weight": _corner(ln.weight, d), "LayerNorm.bias": _corner(ln.bias, d)}


def write_views(views: Params, state: Params) -> None:
    """Copy ``state`` into slices that are views of the full parameters."""
    for name, view in views.items():
        if name in state:
            view.copy_(state[name])


@lru_cache(maxsize=256)
def _head_index(heads: int, head_dim: int, max_head_dim: int) -> Tensor:
    """Rows of the first ``head_dim`` dims of each of the first ``heads`` heads."""
    return (torch.arange(heads)[:, None] * max_head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


class ElasticEmbeddings(nn.Module):
    def __init__(self, shape: EmbeddingShape, d_max: int, eps: float, dropout: float, pad: int | None) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(shape.vocab_size, d_max)
        self.position_embeddings = nn.Embedding(shape.max_position_embeddings, d_max)
        self.token_type_embeddings = nn.Embedding(shape.type_vocab_size, d_max)
        self.LayerNorm = nn.LayerNorm(d_max, eps=eps)
        self.eps, self.p, self.pad = eps, dropout, pad

    def active_params(self, d: int) -> Params:
        return {
            "word_embeddings.weight": _corner(self.word_embeddings.weight, self.word_embeddings.num_embeddings, d),
            "position_embeddings.weight": _corner(
                self.position_embeddings.weight, self.position_embeddings.num_embeddings, d),
            "token_type_embeddings.weight": _corner(
                self.token_type_embeddings.weight, self.token_type_embeddings.num_embeddings, d),
            **_ln(self.LayerNorm, d),
        }

    def forward(self, d: int, input_ids: Tensor, token_type_ids: Tensor | None, position_ids: Tensor | None) -> Tensor:
        p = self.active_params(d)
        return embed_op(
            input_ids, token_type_ids, position_ids,
            partial(F.embedding, weight=p["word_embeddings.weight"], padding_idx=self.pad),
            partial(F.embedding, weight=p["position_embeddings.weight"]),
            partial(F.embedding, weight=p["token_type_embeddings.weight"]),
            _norm(p, self.eps), self.p, self.training,
        )


class ElasticMHA(nn.Module):
    """Heads are laid out ``[head0 dims | head1 dims | ...]`` at ``max.head_dim`` each.

    ``MHA(h, max.head_dim)`` takes the first ``h`` heads (a contiguous slice);
    ``MHA(h, hd < max.head_dim)`` takes the first ``hd`` dims of each of the first
    ``h`` heads (an index gather), covering both AutoTinyBERT strategies.
    """

    def __init__(self, d_max: int, largest: MHA, eps: float, attn_dropout: float, dropout: float) -> None:
        super().__init__()
        q = largest.inner
        self.largest = largest
        self.query, self.key, self.value = nn.Linear(d_max, q), nn.Linear(d_max, q), nn.Linear(d_max, q)
        self.dense = nn.Linear(q, d_max)
        self.LayerNorm = nn.LayerNorm(d_max, eps=eps)
        self.eps, self.p_attn, self.p = eps, attn_dropout, dropout

    def active_params(self, d: int, spec: MHA) -> Params:
        out: Params = {}
        if spec.head_dim == self.largest.head_dim:
            rows = spec.inner
            for name in ("query", "key", "value"):
                lin = getattr(self, name)
                out[f"{name}.weight"], out[f"{name}.bias"] = _corner(lin.weight, rows, d), _corner(lin.bias, rows)
            out["dense.weight"] = _corner(self.dense.weight, d, rows)
        else:
            idx = _head_index(spec.heads, spec.head_dim, self.largest.head_dim).to(self.dense.weight.device)
            for name in ("query", "key", "value"):
                lin = getattr(self, name)
                out[f"{name}.weight"] = lin.weight[:, :d].index_select(0, idx)
                out[f"{name}.bias"] = lin.bias.index_select(0, idx)
            out["dense.weight"] = self.dense.weight[:d].index_select(1, idx)
        out["dense.bias"] = _corner(self.dense.bias, d)
        out.update(_ln(self.LayerNorm, d))
        return out

    def write_active(self, d: int, spec: MHA, state: Params) -> None:
        if spec.head_dim == self.largest.head_dim:
            write_views(self.active_params(d, spec), state)
            return
        idx = _head_index(spec.heads, spec.head_dim, self.largest.head_dim).to(self.dense.weight.device)
        for name in ("query", "key", "value"):
            lin = getattr(self, name)
            lin.weight[idx, :d] = state[f"{name}.weight"]
            lin.bias[idx] = state[f"{name}.bias"]
        self.dense.weight[:d, idx] = state["dense.weight"]
        write_views({k: v for k, v in self.active_params(d, spec).items() if not k.startswith(("query", "key", "value", "dense.weight"))}, state)

    def forward(
        self, x: Tensor, mask: Tensor | None, keep: Tensor | None, spec: MHA, output_attentions: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """The block output; ``(output, probs [B, spec.heads, T, T])`` when ``output_attentions``."""
        p = self.active_params(x.shape[-1], spec)
        return mha_op(
            x, mask, _linear(p, "query"), _linear(p, "key"), _linear(p, "value"), _linear(p, "dense"),
            _norm(p, self.eps), spec.heads, spec.head_dim, self.p_attn, self.p, self.training,
            return_probs=output_attentions,
        )


class ElasticFFN(nn.Module):
    def __init__(self, d_max: int, largest: FFN, eps: float, dropout: float) -> None:
        super().__init__()
        self.intermediate, self.output = nn.Linear(d_max, largest.inner), nn.Linear(largest.inner, d_max)
        self.LayerNorm = nn.LayerNorm(d_max, eps=eps)
        self.eps, self.p = eps, dropout

    def active_params(self, d: int, spec: FFN) -> Params:
        f = spec.inner
        return {
            "intermediate.weight": _corner(self.intermediate.weight, f, d),
            "intermediate.bias": _corner(self.intermediate.bias, f),
            "output.weight": _corner(self.output.weight, d, f), "output.bias": _corner(self.output.bias, d),
            **_ln(self.LayerNorm, d),
        }

    def forward(self, x: Tensor, mask: Tensor | None, keep: Tensor | None, spec: FFN) -> Tensor:
        p = self.active_params(x.shape[-1], spec)
        return ffn_op(x, _linear(p, "intermediate"), _linear(p, "output"), _norm(p, self.eps), self.p, self.training)


class ElasticSepConv(nn.Module):
    """One kernel size; channel counts share the first ``inner`` channels."""

    def __init__(self, d_max: int, largest: SepConv, eps: float, dropout: float) -> None:
        super().__init__()
        c = largest.inner
        self.kernel = largest.kernel
        self.in_proj = nn.Linear(d_max, c)
        self.conv = nn.Conv1d(c, c, largest.kernel, padding=largest.kernel // 2, groups=c)
        self.out_proj = nn.Linear(c, d_max)
        self.LayerNorm = nn.LayerNorm(d_max, eps=eps)
        self.eps, self.p = eps, dropout

    def active_params(self, d: int, spec: SepConv) -> Params:
        c = spec.inner
        return {
            "in_proj.weight": _corner(self.in_proj.weight, c, d), "in_proj.bias": _corner(self.in_proj.bias, c),
            "conv.weight": _corner(self.conv.weight, c), "conv.bias": _corner(self.conv.bias, c),
            "out_proj.weight": _corner(self.out_proj.weight, d, c), "out_proj.bias": _corner(self.out_proj.bias, d),
            **_ln(self.LayerNorm, d),
        }

    def forward(self, x: Tensor, mask: Tensor | None, keep: Tensor | None, spec: SepConv) -> Tensor:
        p = self.active_params(x.shape[-1], spec)
        conv = partial(F.conv1d, weight=p["conv.weight"], bias=p["conv.bias"], padding=spec.kernel // 2,
                       groups=spec.inner)
        return conv_op(x, keep, _linear(p, "in_proj"), conv, _linear(p, "out_proj"), _norm(p, self.eps), self.p,
                       self.training)


class ElasticOpLayer(nn.Module):
    """One op-layer of a supernet: one elastic module per slot (``mha``, ``ffn``, ``conv3``...)."""

    def __init__(self, slots: dict[str, OpSpec], d_max: int, eps: float, attn_dropout: float, dropout: float) -> None:
        super().__init__()
        ops: dict[str, nn.Module] = {}
        for slot, largest in slots.items():
            if isinstance(largest, MHA):
                ops[slot] = ElasticMHA(d_max, largest, eps, attn_dropout, dropout)
            elif isinstance(largest, FFN):
                ops[slot] = ElasticFFN(d_max, largest, eps, dropout)
            elif isinstance(largest, SepConv):
                ops[slot] = ElasticSepConv(d_max, largest, eps, dropout)
        self.ops = nn.ModuleDict(ops)

    def forward(
        self, x: Tensor, mask: Tensor | None, keep: Tensor | None, spec: OpSpec, output_attentions: bool = False
    ) -> Tensor | tuple[Tensor, Tensor | None]:
        """The op's output; with ``output_attentions``, ``(output, probs)``, ``probs`` None unless ``spec`` is MHA."""
        if spec.op == "id":
            return (x, None) if output_attentions else x
        if output_attentions and isinstance(spec, MHA):
            return self.ops[spec.slot](x, mask, keep, spec, output_attentions=True)
        out = self.ops[spec.slot](x, mask, keep, spec)
        return (out, None) if output_attentions else out

    def active_params(self, d: int, spec: OpSpec) -> Params:
        return {} if spec.op == "id" else self.ops[spec.slot].active_params(d, spec)

    def write_active(self, d: int, spec: OpSpec, state: Params) -> None:
        if spec.op == "id":
            return
        op = self.ops[spec.slot]
        if isinstance(op, ElasticMHA):
            op.write_active(d, spec, state)
        else:
            write_views(op.active_params(d, spec), state)


class ElasticPooler(nn.Module):
    def __init__(self, d_max: int) -> None:
        super().__init__()
        self.dense = nn.Linear(d_max, d_max)

    def active_params(self, d: int) -> Params:
        return {"dense.weight": _corner(self.dense.weight, d, d), "dense.bias": _corner(self.dense.bias, d)}

    def forward(self, h: Tensor) -> Tensor:
        p = self.active_params(h.shape[-1])
        return torch.tanh(_linear(p, "dense")(h[:, 0]))


class ElasticMLMHead(nn.Module):
    """Transform + decoder tied to the (sliced) word embeddings + full-vocab bias."""

    def __init__(self, d_max: int, vocab_size: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(d_max, d_max)
        self.LayerNorm = nn.LayerNorm(d_max, eps=eps)
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        self.eps = eps

    def active_params(self, d: int) -> Params:
        return {"dense.weight": _corner(self.dense.weight, d, d), "dense.bias": _corner(self.dense.bias, d),
                **_ln(self.LayerNorm, d),
                "bias": self.bias}

    def forward(self, h: Tensor, decoder: Tensor) -> Tensor:
        p = self.active_params(h.shape[-1])
        return mlm_op(h, _linear(p, "dense"), _norm(p, self.eps), partial(F.linear, weight=decoder), p["bias"])
