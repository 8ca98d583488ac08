"""The raynas encoder: BERT embeddings, a chain of op-layers, BERT heads.

Every op is written once as a function of its *layers* (``mha_op``, ``ffn_op``,
``conv_op``, ...): callables ``Tensor -> Tensor``. The plain modules below pass
their own ``nn.Linear`` / ``nn.Conv1d`` / ``nn.LayerNorm`` submodules, so the
exported model is made of standard modules that its forward *calls* (as
transformers' ``modeling_bert.py``): quantizers, hooks, LoRA adapters,
``torch.compile`` and exporters see and replace them. The elastic supernet
passes the same functions ``F.linear`` / ``F.layer_norm`` over slices of its
larger weights (:mod:`raynas.supernet.elastic`). Hence an extracted model
computes exactly what the supernet's active path computes.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    MaskedLMOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
)

from raynas.models.configuration_raynas import RaynasConfig
from raynas.spaces.ops import FFN, MHA, OpSpec, SepConv

Tensor = torch.Tensor
Layer = Callable[[Tensor], Tensor]  # an nn.Module (exported model) or a functional slice (supernet)


# ---- ops as functions of their layers --------------------------------------------------
def additive_mask(attention_mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``[B, T]`` 1/0 mask -> ``[B, 1, 1, T]`` additive mask for attention scores."""
    if attention_mask is None:
        return None
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def embed_op(
    input_ids: Tensor, token_type_ids: Tensor | None, position_ids: Tensor | None,
    word: Layer, position: Layer, token_type: Layer, norm: Layer, dropout: float, training: bool,
) -> Tensor:
    seq = input_ids.shape[1]
    if position_ids is None:
        position_ids = torch.arange(seq, device=input_ids.device)[None, :]
    if token_type_ids is None:
        token_type_ids = torch.zeros_like(input_ids)
    h = word(input_ids) + token_type(token_type_ids) + position(position_ids)
    return F.dropout(norm(h), dropout, training)


def mha_op(
    x: Tensor, mask: Tensor | None, query: Layer, key: Layer, value: Layer, dense: Layer, norm: Layer,
    heads: int, head_dim: int, attn_dropout: float, dropout: float, training: bool,
    return_probs: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Post-LN self-attention block. ``mask``: additive, broadcastable to ``[B, heads, T, T]``.

    ``return_probs=False`` runs SDPA and returns the block output. ``return_probs=True``
    computes the attention explicitly (as BERT's eager path) and returns
    ``(output, probs)``, ``probs`` ``[B, heads, T, T]`` before attention dropout,
    differentiable, for attention-map distillation.
    """
    b, t, _ = x.shape
    p_drop = attn_dropout if training else 0.0

    def split(proj: Layer) -> Tensor:
        return proj(x).view(b, t, heads, head_dim).transpose(1, 2)

    if return_probs:
        qh, kh, vh = split(query), split(key), split(value)
        scores = torch.matmul(qh, kh.transpose(-1, -2)).float() * head_dim**-0.5
        if mask is not None:
            scores = scores + mask.float()
        probs = torch.softmax(scores, dim=-1).to(vh.dtype)
        ctx = torch.matmul(F.dropout(probs, p_drop, training), vh)
    else:
        ctx = F.scaled_dot_product_attention(split(query), split(key), split(value), attn_mask=mask, dropout_p=p_drop)
    ctx = ctx.transpose(1, 2).reshape(b, t, heads * head_dim)
    out = norm(x + F.dropout(dense(ctx), dropout, training))
    return (out, probs) if return_probs else out


def ffn_op(x: Tensor, intermediate: Layer, output: Layer, norm: Layer, dropout: float, training: bool) -> Tensor:
    return norm(x + F.dropout(output(F.gelu(intermediate(x))), dropout, training))


def conv_op(
    x: Tensor, keep: Tensor | None, in_proj: Layer, conv: Layer, out_proj: Layer, norm: Layer,
    dropout: float, training: bool,
) -> Tensor:
    """``conv``: a depth-wise ``Conv1d`` over ``[B, C, T]`` that keeps the length (padding ``kernel // 2``)."""
    h = in_proj(x)
    if keep is not None:  # padding must not leak into real tokens through the kernel
        h = h * keep[:, :, None].to(h.dtype)
    h = conv(h.transpose(1, 2))
    return norm(x + F.dropout(out_proj(F.gelu(h.transpose(1, 2))), dropout, training))


def mlm_op(h: Tensor, dense: Layer, norm: Layer, decoder: Layer, bias: Tensor) -> Tensor:
    return decoder(norm(F.gelu(dense(h)))) + bias


# ---- plain modules ------------------------------------------------------------------------
class RaynasEmbeddings(nn.Module):
    def __init__(self, config: RaynasConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, d, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, d)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, d)
        self.LayerNorm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.p = config.hidden_dropout_prob

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None = None, position_ids: Tensor | None = None) -> Tensor:
        return embed_op(input_ids, token_type_ids, position_ids, self.word_embeddings, self.position_embeddings,
                        self.token_type_embeddings, self.LayerNorm, self.p, self.training)


class RaynasAttention(nn.Module):

    def __init__(self, config: RaynasConfig, spec: MHA) -> None:
        super().__init__()
        d, q = config.hidden_size, spec.inner
        self.spec = spec
        self.query, self.key, self.value = nn.Linear(d, q), nn.Linear(d, q), nn.Linear(d, q)
        self.dense = nn.Linear(q, d)
        self.LayerNorm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.p_attn, self.p = config.attention_probs_dropout_prob, config.hidden_dropout_prob

    def forward(
        self, x: Tensor, mask: Tensor | None, keep: Tensor | None, output_attentions: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """The block output; ``(output, probs [B, heads, T, T])`` when ``output_attentions``."""
        return mha_op(x, mask, self.query, self.key, self.value, self.dense, self.LayerNorm,
                      self.spec.heads, self.spec.head_dim, self.p_attn, self.p, self.training,
                      return_probs=output_attentions)


class RaynasFeedForward(nn.Module):

    def __init__(self, config: RaynasConfig, spec: FFN) -> None:
        super().__init__()
        d = config.hidden_size
        self.intermediate, self.output = nn.Linear(d, spec.inner), nn.Linear(spec.inner, d)
        self.LayerNorm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.p = config.hidden_dropout_prob

    def forward(self, x: Tensor, mask: Tensor | None, keep: Tensor | None) -> Tensor:
        return ffn_op(x, self.intermediate, self.output, self.LayerNorm, self.p, self.training)


class RaynasSepConv(nn.Module):
    def __init__(self, config: RaynasConfig, spec: SepConv) -> None:
        super().__init__()
        d, c = config.hidden_size, spec.inner
        self.spec = spec
        self.in_proj = nn.Linear(d, c)
        self.conv = nn.Conv1d(c, c, spec.kernel, padding=spec.kernel // 2, groups=c)
        self.out_proj = nn.Linear(c, d)
        self.LayerNorm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.p = config.hidden_dropout_prob

    def forward(self, x: Tensor, mask: Tensor | None, keep: Tensor | None) -> Tensor:
        return conv_op(x, keep, self.in_proj, self.conv, self.out_proj, self.LayerNorm, self.p, self.training)


class RaynasEmptyBlock(nn.Module):
    """An MHA block with 0 heads or an FFN block with 0 neurons (every one pruned): ``LayerNorm(x + bias)``.

    What the gated model computed there: the output projection's bias and the
    residual LayerNorm remain, so the block is not the identity. It holds no
    zero-size ``nn.Linear`` (``quantize_dynamic`` fails on those, and a LoRA
    config targeting ``query`` / ``intermediate`` would wrap empty layers).
    ``bias`` is the pruned block's ``dense.bias`` / ``output.bias``.
    """

    def __init__(self, config: RaynasConfig, spec: MHA | FFN) -> None:
        super().__init__()
        self.spec = spec
        self.bias = nn.Parameter(torch.zeros(config.hidden_size))
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.p = config.hidden_dropout_prob

    def forward(
        self, x: Tensor, mask: Tensor | None, keep: Tensor | None, output_attentions: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """``output_attentions`` (an MHA block): ``(output, probs [B, 0, T, T])``."""
        out = self.LayerNorm(x + F.dropout(self.bias.expand_as(x), self.p, self.training))
        if output_attentions:
            return out, x.new_zeros(x.shape[0], 0, x.shape[1], x.shape[1])
        return out


class RaynasIdentity(nn.Module):
    def forward(self, x: Tensor, mask: Tensor | None, keep: Tensor | None) -> Tensor:
        return x


def build_op(config: RaynasConfig, spec: OpSpec) -> nn.Module:
    if isinstance(spec, (MHA, FFN)) and spec.inner == 0:
        return RaynasEmptyBlock(config, spec)
    if isinstance(spec, MHA):
        return RaynasAttention(config, spec)
    if isinstance(spec, FFN):
        return RaynasFeedForward(config, spec)
    if isinstance(spec, SepConv):
        return RaynasSepConv(config, spec)
    return RaynasIdentity()


class RaynasPooler(nn.Module):
    def __init__(self, config: RaynasConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, h: Tensor) -> Tensor:
        return torch.tanh(self.dense(h[:, 0]))


class RaynasMLMHead(nn.Module):
    def __init__(self, config: RaynasConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.dense = nn.Linear(d, d)
        self.LayerNorm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(d, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, h: Tensor) -> Tensor:
        return mlm_op(h, self.dense, self.LayerNorm, self.decoder, self.bias)


# ---- transformers models --------------------------------------------------------------------
class RaynasPreTrainedModel(PreTrainedModel):
    config: RaynasConfig
    config_class = RaynasConfig
    base_model_prefix = "raynas"

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, RaynasMLMHead):
            init.zeros_(module.bias)


class RaynasModel(RaynasPreTrainedModel):
    def __init__(self, config: RaynasConfig, add_pooling_layer: bool = True) -> None:
        super().__init__(config)
        self.embeddings = RaynasEmbeddings(config)
        self.layers = nn.ModuleList(build_op(config, spec) for spec in config.ops)
        self.pooler = RaynasPooler(config) if add_pooling_layer else None
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        output_hidden_states: bool = False,
        return_dict: bool = True,
        output_attentions: bool = False,
        **kwargs: object,
    ) -> BaseModelOutputWithPooling:
        """``output_attentions=True``: ``attentions`` holds one ``[B, heads, T, T]`` tensor of
        attention probabilities (before dropout) per MHA op-layer, in layer order; other ops
        (FFN, conv, identity) contribute nothing, so its length is the number of MHA layers,
        not ``len(config.layers)``. Computed explicitly instead of by SDPA (same result).
        """
        h = self.embeddings(input_ids, token_type_ids, position_ids)
        mask = additive_mask(attention_mask, h.dtype)
        states, attentions = [h], []
        for layer in self.layers:
            if output_attentions and isinstance(getattr(layer, "spec", None), MHA):
                h, probs = layer(h, mask, attention_mask, output_attentions=True)
                attentions.append(probs)
            else:
                h = layer(h, mask, attention_mask)
            states.append(h)
        pooled = self.pooler(h) if self.pooler is not None else None
        return BaseModelOutputWithPooling(
            last_hidden_state=h, pooler_output=pooled, hidden_states=tuple(states) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
        )


class RaynasForMaskedLM(RaynasPreTrainedModel):
    """Like ``BertForMaskedLM``: no pooler by default, pooler weights in a checkpoint ignored.

    Extraction builds it with ``add_pooling_layer=True`` so that an export also
    carries the supernet's pooler for ``AutoModel`` / sequence classification.
    ``output_attentions``: as :meth:`RaynasModel.forward` (one tensor per MHA op-layer).
    """

    _tied_weights_keys = {"cls.decoder.weight": "raynas.embeddings.word_embeddings.weight"}
    _keys_to_ignore_on_load_unexpected = [r"pooler"]

    def __init__(self, config: RaynasConfig, add_pooling_layer: bool = False) -> None:
        super().__init__(config)
        self.raynas = RaynasModel(config, add_pooling_layer=add_pooling_layer)
        self.cls = RaynasMLMHead(config)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.cls.decoder

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.cls.decoder = value

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None,
                position_ids: Tensor | None = None, labels: Tensor | None = None, output_hidden_states: bool = False,
                return_dict: bool = True, output_attentions: bool = False, **kwargs: object) -> MaskedLMOutput:
        out = self.raynas(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states,
                          output_attentions=output_attentions)
        logits = self.cls(out.last_hidden_state)
        loss = None
        if labels is not None:
            loss = CrossEntropyLoss()(logits.view(-1, self.config.vocab_size), labels.view(-1))
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions)


class RaynasForSequenceClassification(RaynasPreTrainedModel):
    def __init__(self, config: RaynasConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.raynas = RaynasModel(config)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None,
                position_ids: Tensor | None = None, labels: Tensor | None = None, output_hidden_states: bool = False,
                return_dict: bool = True, output_attentions: bool = False, **kwargs: object) -> SequenceClassifierOutput:
        out = self.raynas(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states,
                          output_attentions=output_attentions)
        logits = self.classifier(self.dropout(out.pooler_output))
        loss = None
        if labels is not None:
            if self.config.problem_type is None:
                if self.num_labels == 1:
                    self.config.problem_type = "regression"
                elif labels.dtype in (torch.long, torch.int):
                    self.config.problem_type = "single_label_classification"
                else:
                    self.config.problem_type = "multi_label_classification"
            if self.config.problem_type == "regression":
                loss = MSELoss()(logits.squeeze(), labels.squeeze().to(logits.dtype))
            elif self.config.problem_type == "single_label_classification":
                loss = CrossEntropyLoss()(logits.view(-1, self.num_labels), labels.view(-1))
            else:
                loss = BCEWithLogitsLoss()(logits, labels.to(logits.dtype))
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions)


class RaynasForQuestionAnswering(RaynasPreTrainedModel):
    def __init__(self, config: RaynasConfig) -> None:
        super().__init__(config)
        self.raynas = RaynasModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None,
                position_ids: Tensor | None = None, start_positions: Tensor | None = None,
                end_positions: Tensor | None = None, output_hidden_states: bool = False,
                return_dict: bool = True, output_attentions: bool = False, **kwargs: object) -> QuestionAnsweringModelOutput:
        out = self.raynas(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states,
                          output_attentions=output_attentions)
        start, end = self.qa_outputs(out.last_hidden_state).split(1, dim=-1)
        start, end = start.squeeze(-1).contiguous(), end.squeeze(-1).contiguous()
        loss = None
        if start_positions is not None and end_positions is not None:
            ignored = start.size(1)
            loss_fct = CrossEntropyLoss(ignore_index=ignored)
            loss = (loss_fct(start, start_positions.clamp(0, ignored)) + loss_fct(end, end_positions.clamp(0, ignored))) / 2
        return QuestionAnsweringModelOutput(loss=loss, start_logits=start, end_logits=end,
                                            hidden_states=out.hidden_states, attentions=out.attentions)
