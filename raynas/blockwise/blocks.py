"""NAS-BERT's blocks: a teacher and a layer-wise supernet cut into K aligned pieces.

Block-wise training feeds student block k the teacher's hidden states at the
input of teacher block k and trains it to reproduce the teacher's output of that
block, so the K blocks train independently (in parallel, on different workers).
This module holds the pieces that make that exact:

* :class:`BlockPlan` says which op-layers each block owns on both sides.
* :class:`TeacherBlocks` runs a frozen BERT teacher one block at a time; chaining
  the blocks reproduces the teacher (tested against transformers' ``BertModel``).
* :class:`StudentBlock` owns deep copies of one block's supernet op-layers, so a
  worker holds (and ships back) only its block; it computes exactly what the
  supernet's layers compute for the same op specs, and :func:`gather_blocks`
  writes the trained copies back into the supernet under its own parameter names.

Pure torch: no Ray here.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from raynas.errors import ConfigError
from raynas.models.modeling_raynas import RaynasForMaskedLM, RaynasModel, additive_mask
from raynas.spaces.layerwise import LayerwiseSpace
from raynas.spaces.ops import OpSpec, encoder_params
from raynas.supernet.supernet import Supernet

Tensor = torch.Tensor
OpPath = tuple[str, ...]


def _teacher_errors(teacher_op_layers: int, num_blocks: int) -> list[str]:
    """Why the teacher cannot be cut into ``num_blocks`` blocks at BERT-layer boundaries (empty: it can)."""
    if teacher_op_layers % 2:
        return [f"blocks: the teacher has {teacher_op_layers} op-layers, not whole BERT layers (mha + ffn pairs)"]
    bert_layers = teacher_op_layers // 2
    if bert_layers % num_blocks:
        return [f"blocks: K={num_blocks} does not divide the teacher's {bert_layers} layers "
                f"({teacher_op_layers} op-layers); a block must hold whole BERT layers"]
    return []


@dataclass(frozen=True)
class BlockPlan:
    """Which teacher and supernet op-layers make up each of the K blocks.

    Teacher block k is BERT layers ``[k*L/K, (k+1)*L/K)`` (op-layers twice that,
    mha then ffn); student block k is supernet op-layers ``[k*P, (k+1)*P)``. Built
    valid or not at all, so every range below is well defined.
    """

    num_blocks: int
    teacher_op_layers: int
    student_op_layers: int

    def __post_init__(self) -> None:
        k, errors = self.num_blocks, []
        if not (isinstance(k, int) and not isinstance(k, bool) and k > 0):
            raise ConfigError(f"blocks: expected a positive integer number of blocks, got {k!r}")
        errors += _teacher_errors(self.teacher_op_layers, k)
        if self.student_op_layers % k:
            errors.append(f"blocks: K={k} does not divide the supernet's {self.student_op_layers} op-layers")
        if errors:
            raise ConfigError("; ".join(errors))

    def _check(self, k: int) -> None:
        if not 0 <= k < self.num_blocks:
            raise ConfigError(f"block {k}: expected 0 <= block < {self.num_blocks}")

    def teacher_range(self, k: int) -> range:
        """Teacher op-layer indices of block ``k``."""
        self._check(k)
        n = self.teacher_op_layers // self.num_blocks
        return range(k * n, (k + 1) * n)

    def student_range(self, k: int) -> range:
        """Supernet op-layer indices of block ``k``."""
        self._check(k)
        p = self.ops_per_block
        return range(k * p, (k + 1) * p)

    @property
    def ops_per_block(self) -> int:
        """Student op-layers per block (P): the length of a block's path."""
        return self.student_op_layers // self.num_blocks


def plan_blocks(teacher_op_layers: int, student_op_layers: int, num_blocks: int) -> BlockPlan:
    """The plan of ``num_blocks`` blocks; ConfigError naming ``blocks`` if the counts do not split evenly."""
    return BlockPlan(num_blocks, teacher_op_layers, student_op_layers)


def _as_raynas(model: Any) -> RaynasModel:
    """The raynas encoder of a HF BERT (converted exactly by ``from_bert``) or of a raynas model."""
    if isinstance(model, RaynasForMaskedLM):
        return model.raynas
    if isinstance(model, RaynasModel):
        return model
    if getattr(getattr(model, "config", None), "model_type", None) == "bert":
        from raynas.export import from_bert  # transformers' BERT classes are only needed here

        return from_bert(model).raynas
    raise ConfigError(f"teacher: expected a BertModel / BertForMaskedLM or a raynas model, got {type(model).__name__}")


class TeacherBlocks(nn.Module):
    """A BERT teacher as K independent blocks. Built from a HF BertModel/BertForMaskedLM (via from_bert)
    or a RaynasForMaskedLM/RaynasModel.

    Frozen and always in eval mode (``train()`` is a no-op): the teacher's hidden
    states are targets, and dropout in them would make the pairs noise. Only the
    embeddings and op-layers are kept; pooler and MLM head are dropped. A raynas
    model's modules are shared, not copied (a teacher is large), and get frozen too.
    """

    def __init__(self, model: Any, num_blocks: int) -> None:
        super().__init__()
        raynas = _as_raynas(model)
        self.embeddings = raynas.embeddings
        self.layers = raynas.layers
        self.num_blocks = num_blocks
        self.hidden_size = int(raynas.config.hidden_size)
        self.num_op_layers = len(self.layers)
        errors = _teacher_errors(self.num_op_layers, num_blocks) if num_blocks > 0 else [
            f"blocks: expected a positive integer number of blocks, got {num_blocks!r}"]
        if errors:
            raise ConfigError("; ".join(errors))
        self._per_block = self.num_op_layers // num_blocks
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> TeacherBlocks:
        """Stay in eval mode: a parent's ``.train()`` must not switch the teacher's dropout on."""
        return super().train(False)

    def _range(self, k: int) -> range:
        if not 0 <= k < self.num_blocks:
            raise ConfigError(f"block {k}: expected 0 <= block < {self.num_blocks}")
        return range(k * self._per_block, (k + 1) * self._per_block)

    def embed(self, input_ids: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        """h_0: the embedding output, the input of teacher block 0."""
        return self.embeddings(input_ids, token_type_ids)

    def _run(self, k: int, h: Tensor, mask: Tensor | None, attention_mask: Tensor | None) -> Tensor:
        for i in self._range(k):
            h = self.layers[i](h, mask, attention_mask)
        return h

    def block(self, k: int, h: Tensor, attention_mask: Tensor | None) -> Tensor:
        """Teacher block ``k`` alone on its input ``h`` ([B, T, D]); ``attention_mask`` [B, T] of 1/0."""
        return self._run(k, h, additive_mask(attention_mask, h.dtype), attention_mask)

    @torch.no_grad()
    def boundaries(self, input_ids: Tensor, attention_mask: Tensor | None,
                   token_type_ids: Tensor | None = None) -> list[Tensor]:
        """``[h_0, ..., h_K]``: h_k is the input of block k and the output of block k-1."""
        h = self.embed(input_ids, token_type_ids)
        mask = additive_mask(attention_mask, h.dtype)
        out = [h]
        for k in range(self.num_blocks):
            h = self._run(k, h, mask, attention_mask)
            out.append(h)
        return out


class StudentBlock(nn.Module):
    """Block k of a layer-wise supernet: its own copies of op-layers student_range(k) (ElasticOpLayer,
    deep-copied from the supernet so a block's state is small and independent) plus, when the student
    hidden d differs from the teacher's D, learned projections in_proj: Linear(D, d), out_proj: Linear(d, D)
    (None when d == D). Input and output are in the TEACHER's dim.

    The copies are the supernet's own elastic modules, called as the supernet calls
    them, so a path run here computes what the supernet computes for the same specs;
    :meth:`layer_state` names the weights as the supernet does, for :func:`gather_blocks`.
    The projections are block-local: they exist only to compare with the teacher.
    """

    def __init__(self, supernet: Supernet, plan: BlockPlan, k: int, hidden: int, teacher_dim: int) -> None:
        super().__init__()
        space = supernet.space
        if not isinstance(space, LayerwiseSpace):
            raise ConfigError(f"blockwise training needs a layer-wise space, the supernet's is {space.kind!r}")
        if plan.student_op_layers != len(supernet.layers):
            raise ConfigError(f"blocks: the plan has {plan.student_op_layers} student op-layers, "
                              f"the supernet {len(supernet.layers)}")
        if hidden not in space.hidden:
            raise ConfigError(f"hidden: {hidden} is not in {space.hidden.text} (space {space.name!r})")
        if not teacher_dim > 0:
            raise ConfigError(f"teacher hidden size must be positive, got {teacher_dim}")
        self.space, self.block_index, self.hidden, self.teacher_dim = space, k, hidden, teacher_dim
        rng = plan.student_range(k)
        self.start, self.num_ops = rng.start, len(rng)
        self.layers = nn.ModuleList(copy.deepcopy(supernet.layers[i]) for i in rng)
        ref = next(supernet.layers.parameters())
        self.in_proj: nn.Linear | None = None
        self.out_proj: nn.Linear | None = None
        if hidden != teacher_dim:
            self.in_proj = nn.Linear(teacher_dim, hidden).to(ref.device, ref.dtype)
            self.out_proj = nn.Linear(hidden, teacher_dim).to(ref.device, ref.dtype)
        self.train(supernet.training)
        self._specs: dict[OpPath, tuple[OpSpec, ...]] = {}

    def specs(self, path: Sequence[str]) -> tuple[OpSpec, ...]:
        """The op specs of ``path``; ConfigError naming the path if it is not a path of this block."""
        key = tuple(path)
        specs = self._specs.get(key)
        if specs is not None:
            return specs
        if isinstance(path, str) or len(key) != self.num_ops:
            raise ConfigError(f"path {path!r} of block {self.block_index}: expected {self.num_ops} op tokens")
        bad = [t for t in key if not isinstance(t, str) or t not in self.space.tokens]
        if bad:
            raise ConfigError(f"path {key!r} of block {self.block_index}: op(s) {bad} are not in space "
                              f"{self.space.name!r} ({', '.join(self.space.tokens)})")
        specs = tuple(self.space.op_of(t) for t in key)
        self._specs[key] = specs
        return specs

    def forward(self, h: Tensor, attention_mask: Tensor | None, path: Sequence[str]) -> Tensor:
        """Run ``path`` on teacher-dim states ``h`` [B, T, D]; returns [B, T, D]."""
        specs = self.specs(path)
        x = self.in_proj(h) if self.in_proj is not None else h
        mask = additive_mask(attention_mask, x.dtype)
        for layer, spec in zip(self.layers, specs):
            x = layer(x, mask, attention_mask, spec)
        return self.out_proj(x) if self.out_proj is not None else x

    def path_params(self, path: Sequence[str]) -> int:
        """Encoder params of ``path`` at this block's hidden size (projections not counted: they are not exported)."""
        return encoder_params(self.hidden, self.specs(path))

    def layer_state(self) -> dict[str, Tensor]:
        """CPU copies of the op-layer weights, keyed as in ``supernet.state_dict()`` (``layers.{global_i}....``)."""
        out: dict[str, Tensor] = {}
        for j, layer in enumerate(self.layers):
            for name, value in layer.state_dict().items():
                out[f"layers.{self.start + j}.{name}"] = value.detach().to("cpu", copy=True)
        return out


@torch.no_grad()
def gather_blocks(supernet: Supernet, layer_states: Iterable[dict[str, Tensor]]) -> Supernet:
    """Copy every block's :meth:`StudentBlock.layer_state` into ``supernet`` in place; returns it.

    Strict: a key the supernet lacks, a shape that differs, or a key given by two
    blocks is a ConfigError (blocks from another space or plan), and nothing is written.
    """
    target = supernet.state_dict(keep_vars=True)
    merged: dict[str, Tensor] = {}
    for b, state in enumerate(layer_states):
        for key, value in state.items():
            if key not in target:
                raise ConfigError(f"gather_blocks: block state {b} has {key!r}, which the supernet does not have")
            if tuple(value.shape) != tuple(target[key].shape):
                raise ConfigError(f"gather_blocks: {key!r} has shape {tuple(value.shape)} in block state {b}, "
                                  f"{tuple(target[key].shape)} in the supernet")
            if key in merged:
                raise ConfigError(f"gather_blocks: {key!r} is given by two block states")
            merged[key] = value
    for key, value in merged.items():
        target[key].copy_(value)
    return supernet
