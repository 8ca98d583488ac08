"""The elastic supernet for any space: ``set_active(arch)``, ``forward(..., arch=)``, ``extract(arch)``.

AutoTinyBERT's SuperPLM and NAS-BERT's layer-wise supernet are the same class:
the space says which elastic op each op-layer holds (``space.slots()``) and
which of them an arch runs (``space.plan(arch)``). Pure torch: no Ray here.

Search evaluates thousands of archs against one trained supernet, from several
callers at once: ``forward(..., arch=a)`` runs ``a`` without touching the
active arch (no shared state is written), and :meth:`Supernet.to_state` /
:meth:`Supernet.from_state` carry the supernet as plain tensors, so a driver
can put it in Ray's object store once instead of every task re-reading disk.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import CrossEntropyLoss

from raynas.errors import ConfigError
from raynas.models.configuration_raynas import RaynasConfig
from raynas.models.modeling_raynas import RaynasForMaskedLM, additive_mask
from raynas.spaces import Space, space_from_dict
from raynas.spaces.ops import OpSpec
from raynas.supernet.elastic import ElasticEmbeddings, ElasticMLMHead, ElasticOpLayer, ElasticPooler, write_views

Tensor = torch.Tensor


@dataclass
class SupernetConfig:
    """Everything besides the space that fixes a supernet (and its extracted models)."""

    space: dict[str, Any]
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int | None = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SupernetState:
    """A supernet as plain data: ``SupernetConfig`` fields, CPU tensors by parameter name, the active arch."""

    config: dict[str, Any]
    tensors: dict[str, Tensor]
    active_arch: str


@dataclass
class SupernetOutput:
    last_hidden_state: Tensor
    pooler_output: Tensor
    logits: Tensor | None  # None with return_logits=False
    loss: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = field(default=None)
    attentions: tuple[Tensor, ...] | None = None  # one [B, heads, T, T] per MHA op-layer (output_attentions)


class Supernet(nn.Module):
    def __init__(self, config: SupernetConfig) -> None:
        super().__init__()
        self.config = config
        self.space: Space = space_from_dict(config.space)
        d_max, shape = self.space.max_hidden, self.space.embeddings
        eps = config.layer_norm_eps
        self.embeddings = ElasticEmbeddings(shape, d_max, eps, config.hidden_dropout_prob, config.pad_token_id)
        self.layers = nn.ModuleList(
            ElasticOpLayer(slots, d_max, eps, config.attention_probs_dropout_prob, config.hidden_dropout_prob)
            for slots in self.space.slots()
        )
        self.pooler = ElasticPooler(d_max)
        self.cls = ElasticMLMHead(d_max, shape.vocab_size, eps)
        self.apply(self._init_weights)
        if config.pad_token_id is not None:  # as BERT: the padding row starts at zero
            with torch.no_grad():
                self.embeddings.word_embeddings.weight[config.pad_token_id].zero_()
        self.set_active(self.space.largest())

    @classmethod
    def from_space(cls, space: Space, **kwargs: Any) -> Supernet:
        return cls(SupernetConfig(space=space.to_dict(), **kwargs))

    # ---- in-memory state -------------------------------------------------------------------
    def to_state(self) -> SupernetState:
        """Config + CPU tensors + the active arch: everything :meth:`from_state` needs, picklable, no files."""
        tensors = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        return SupernetState(self.config.to_dict(), tensors, self.space.format(self.active_arch))

    @classmethod
    def from_state(cls, state: SupernetState, device: torch.device | str | None = None) -> Supernet:
        """The supernet ``state`` describes (see :meth:`to_state`), in eval mode, on ``device`` (default CPU).

        Built on the meta device and then given the state's tensors, so no random
        initialisation is spent on weights that are overwritten at once.
        """
        with torch.device("meta"):
            net = cls(SupernetConfig(**state.config))
        net.load_state_dict(state.tensors, strict=True, assign=True)
        net.set_active(state.active_arch)
        return net.to(device or "cpu").eval()

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    # ---- the active arch ------------------------------------------------------------
    def set_active(self, arch: Any) -> Any:
        """Run ``arch`` from now on; returns the parsed arch. ConfigError if not in the space."""
        arch = self.space.validate(arch)
        hidden, ops = self._plan_valid(arch)
        self.active_arch, self.active_hidden, self.active_ops = arch, hidden, ops
        return arch

    def sample_active(self, rng: random.Random) -> Any:
        return self.set_active(self.space.sample(rng))

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        labels: Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        *,
        arch: Any = None,
        return_logits: bool = True,
    ) -> SupernetOutput:
        """Run ``arch`` (default: the active arch) on a batch.

        ``arch`` given: that arch runs and the active arch is left as it was, so
        several callers can evaluate archs on one shared instance concurrently.
        ``output_attentions``: ``attentions`` gets one ``[B, heads, T, T]`` probability
        tensor (before dropout) per MHA op-layer of the arch, in order, as the
        extracted model's. ``return_logits=False`` skips the MLM head (a
        vocabulary-wide matmul) when no loss reads it; ``labels`` then must be None.
        """
        if labels is not None and not return_logits:
            raise ValueError("labels need the MLM logits: pass return_logits=True")
        d, ops = self._plan(arch)
        h = self.embeddings(d, input_ids, token_type_ids, position_ids)
        mask = additive_mask(attention_mask, h.dtype)
        states, attentions = [h], []
        for layer, spec in zip(self.layers, ops):
            if output_attentions:
                h, probs = layer(h, mask, attention_mask, spec, output_attentions=True)
                if probs is not None:
                    attentions.append(probs)
            else:
                h = layer(h, mask, attention_mask, spec)
            states.append(h)
        logits = self.cls(h, self.embeddings.word_embeddings.weight[:, :d]) if return_logits else None
        loss = None
        if labels is not None:
            loss = CrossEntropyLoss()(logits.view(-1, logits.shape[-1]), labels.view(-1))
        return SupernetOutput(h, self.pooler(h), logits, loss, tuple(states) if output_hidden_states else None,
                              tuple(attentions) if output_attentions else None)

    # ---- extraction -----------------------------------------------------------------------
    def model_config(self, arch: Any = None) -> RaynasConfig:
        hidden, ops = self._plan(arch)
        c, e = self.config, self.space.embeddings
        return RaynasConfig(
            vocab_size=e.vocab_size, hidden_size=hidden, layers=[op.to_dict() for op in ops],
            max_position_embeddings=e.max_position_embeddings, type_vocab_size=e.type_vocab_size,
            hidden_dropout_prob=c.hidden_dropout_prob, attention_probs_dropout_prob=c.attention_probs_dropout_prob,
            layer_norm_eps=c.layer_norm_eps, initializer_range=c.initializer_range, pad_token_id=c.pad_token_id,
        )

    def _plan(self, arch: Any) -> tuple[int, tuple[OpSpec, ...]]:
        """``(hidden, ops)`` of ``arch`` (default: the active arch); ConfigError if not in the space."""
        if arch is None:
            return self.active_hidden, self.active_ops
        return self._plan_valid(self.space.validate(arch))

    def _plan_valid(self, arch: Any) -> tuple[int, tuple[OpSpec, ...]]:
        """``(hidden, ops)`` of an already validated ``arch``; ConfigError if it is deeper than the supernet."""
        hidden, ops = self.space.plan(arch)
        if len(ops) > len(self.layers):
            raise ConfigError(f"arch {arch} has {len(ops)} op-layers, the supernet {len(self.layers)}")
        return hidden, ops

    @torch.no_grad()
    def extract(self, arch: Any = None) -> RaynasForMaskedLM:
        """Standalone masked-LM model (with pooler) holding copies of ``arch``'s weights.

        ``arch`` defaults to the active one. The result computes what the
        supernet computes with ``arch`` active.
        """
        hidden, ops = self._plan(arch)
        model = RaynasForMaskedLM(self.model_config(arch), add_pooling_layer=True)
        state: dict[str, Tensor] = {}
        for name, value in self.embeddings.active_params(hidden).items():
            state[f"raynas.embeddings.{name}"] = value
        for i, (layer, spec) in enumerate(zip(self.layers, ops)):
            for name, value in layer.active_params(hidden, spec).items():
                state[f"raynas.layers.{i}.{name}"] = value
        for name, value in self.pooler.active_params(hidden).items():
            state[f"raynas.pooler.{name}"] = value
        for name, value in self.cls.active_params(hidden).items():
            state[f"cls.{name}"] = value
        state["cls.decoder.weight"] = state["raynas.embeddings.word_embeddings.weight"]
        missing, unexpected = model.load_state_dict({k: v.contiguous().clone() for k, v in state.items()}, strict=False)
        if missing or unexpected:  # a bug, never a user error
            raise RuntimeError(f"extraction mismatch: missing {missing}, unexpected {unexpected}")
        model.tie_weights()
        return model.eval() if not self.training else model

    @torch.no_grad()
    def inject(self, model: RaynasForMaskedLM, arch: Any = None) -> None:
        """Write a standalone model's weights into ``arch``'s slices: the inverse of :meth:`extract`.

        Used to seed the supernet from a teacher (its largest arch) and to write
        further-trained sub-models back. Weights the model lacks (e.g. an MLM
        head of an encoder-only teacher) keep their current values.
        """
        hidden, ops = self._plan(arch)
        if model.config.hidden_size != hidden or tuple(model.config.ops) != tuple(ops):
            raise ConfigError(f"inject: model has hidden={model.config.hidden_size} and {len(model.config.ops)} "
                              f"op-layers, which is not arch {self.space.format(arch) if arch else self.active_arch}")
        state = model.state_dict()

        def sub(prefix: str) -> dict[str, Tensor]:
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

        write_views(self.embeddings.active_params(hidden), sub("raynas.embeddings."))
        for i, (layer, spec) in enumerate(zip(self.layers, ops)):
            layer.write_active(hidden, spec, sub(f"raynas.layers.{i}."))
        write_views(self.pooler.active_params(hidden), sub("raynas.pooler."))
        head = sub("cls.")
        head.pop("decoder.weight", None)  # tied to the word embeddings
        write_views(self.cls.active_params(hidden), head)
