"""Write extracted models as transformers folders: plain ``bert`` when it can be.

An arch whose op chain is ``L x (MHA(h, d/h), FFN(f))`` is exactly a
``BertConfig``; it is saved as model type ``bert`` and loads in any process with
transformers alone. Anything else is saved as model type ``raynas``, which loads
with ``AutoModel.from_pretrained`` once ``import raynas`` has registered it.
Folders are written under a temporary name and renamed, so a crash never leaves
a half-written model where a finished one is expected.

Task models convert too (sequence classification, question answering): their
heads are plain ``nn.Linear`` layers named as in BERT, so one key map and one
config mapping (:data:`_HEAD_KEYS`, :func:`_task_fields`) serve every class, and
:data:`_CLASSES` pairs each raynas class with its BERT twin.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import BertConfig, BertForMaskedLM, BertForQuestionAnswering, BertForSequenceClassification

from raynas.atomic_io import atomic_dir
from raynas.errors import ConfigError
from raynas.model_card import provenance_of, write_card
from raynas.models.configuration_raynas import RaynasConfig
from raynas.models.modeling_raynas import (
    RaynasForMaskedLM,
    RaynasForQuestionAnswering,
    RaynasForSequenceClassification,
)
from raynas.spaces.ops import FFN, MHA

_MHA_KEYS = {"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
             "dense": "attention.output.dense", "LayerNorm": "attention.output.LayerNorm"}
_FFN_KEYS = {"intermediate": "intermediate.dense", "output": "output.dense", "LayerNorm": "output.LayerNorm"}
# every head's names (a model has only its own; the rest never match): MLM, sequence classification, QA
_HEAD_KEYS = {"cls.dense": "cls.predictions.transform.dense", "cls.LayerNorm": "cls.predictions.transform.LayerNorm",
              "cls.decoder": "cls.predictions.decoder", "cls.bias": "cls.predictions.bias",
              "classifier": "classifier", "qa_outputs": "qa_outputs"}

TaskModel = RaynasForMaskedLM | RaynasForSequenceClassification | RaynasForQuestionAnswering
# (raynas class, bert class); from_bert takes the first bert class the model is an instance of, and any
# other bert model (a bare BertModel) as masked LM with a fresh head, as before task heads were supported
_CLASSES: tuple[tuple[type[TaskModel], type], ...] = (
    (RaynasForSequenceClassification, BertForSequenceClassification),
    (RaynasForQuestionAnswering, BertForQuestionAnswering),
    (RaynasForMaskedLM, BertForMaskedLM),
)


@dataclass(frozen=True)
class Exported:
    """Where the model went, ``"bert"`` or ``"raynas"`` (which loader it needs), and its parameter count."""

    path: Path
    model_type: str
    params: int


def _task_fields(config: Any) -> dict[str, Any]:
    """The head settings a config carries across formats: label count and names, loss kind, head dropout.

    Without them a converted classifier would reload with two ``LABEL_i`` labels
    (wrong head shape) or another loss; the names are the same in both configs.
    """
    return {"id2label": dict(config.id2label), "label2id": dict(config.label2id),
            "problem_type": config.problem_type, "classifier_dropout": getattr(config, "classifier_dropout", None)}


def bert_config_for(config: RaynasConfig) -> BertConfig | None:
    """The equivalent ``BertConfig``, or None when the op chain is not a BERT stack."""
    ops = [op for op in config.ops if op.op != "id"]
    if not ops or len(ops) % 2:
        return None
    mhas, ffns = ops[0::2], ops[1::2]
    if not all(isinstance(m, MHA) for m in mhas) or not all(isinstance(f, FFN) for f in ffns):
        return None
    if len(set(mhas)) != 1 or len(set(ffns)) != 1 or mhas[0].inner != config.hidden_size or ffns[0].inner == 0:
        return None  # bert has one head count and FFN size for all layers, q = hidden, and no empty blocks
    return BertConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=len(mhas),
        num_attention_heads=mhas[0].heads, intermediate_size=ffns[0].inner, hidden_act="gelu",
        hidden_dropout_prob=config.hidden_dropout_prob, attention_probs_dropout_prob=config.attention_probs_dropout_prob,
        max_position_embeddings=config.max_position_embeddings, type_vocab_size=config.type_vocab_size,
        initializer_range=config.initializer_range, layer_norm_eps=config.layer_norm_eps,
        pad_token_id=config.pad_token_id, **_task_fields(config),
    )


def bert_key_map(config: RaynasConfig) -> dict[str, str]:
    """raynas parameter-name prefix -> bert prefix, for a BERT-expressible config."""
    mapping = {"raynas.embeddings": "bert.embeddings", "raynas.pooler": "bert.pooler", **_HEAD_KEYS}
    bert_layer = 0
    for i, op in enumerate(config.ops):
        if op.op == "id":
            continue
        table = _MHA_KEYS if op.op == "mha" else _FFN_KEYS
        for ours, theirs in table.items():
            mapping[f"raynas.layers.{i}.{ours}"] = f"bert.encoder.layer.{bert_layer}.{theirs}"
        bert_layer += op.op == "ffn"
    return mapping


def raynas_config_from_bert(config: BertConfig) -> RaynasConfig:
    """The raynas config of a stock BERT (absolute positions, GELU) encoder."""
    act = getattr(config, "hidden_act", "gelu")
    pos = getattr(config, "position_embedding_type", "absolute")
    if act != "gelu" or pos != "absolute":
        raise ConfigError(f"teacher: hidden_act={act!r}, position_embedding_type={pos!r}; raynas needs 'gelu', 'absolute'")
    head_dim, rest = divmod(config.hidden_size, config.num_attention_heads)
    if rest:
        raise ConfigError(f"teacher: hidden_size {config.hidden_size} is not divisible by {config.num_attention_heads} heads")
    layers = [MHA(config.num_attention_heads, head_dim).to_dict(), FFN(config.intermediate_size).to_dict()]
    return RaynasConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, layers=layers * config.num_hidden_layers,
        max_position_embeddings=config.max_position_embeddings, type_vocab_size=config.type_vocab_size,
        hidden_dropout_prob=config.hidden_dropout_prob, attention_probs_dropout_prob=config.attention_probs_dropout_prob,
        layer_norm_eps=config.layer_norm_eps, initializer_range=config.initializer_range, pad_token_id=config.pad_token_id,
        **_task_fields(config),
    )


def raynas_config_of(config: Any) -> RaynasConfig | None:
    """``config`` as a RaynasConfig (a bert config converted), or None when raynas cannot express it."""
    if isinstance(config, RaynasConfig):
        return config
    if getattr(config, "model_type", None) != "bert":
        return None
    try:
        return raynas_config_from_bert(config)
    except ConfigError:
        return None


def from_bert(model: Any) -> TaskModel:
    """The equivalent raynas model, computing the same outputs.

    ``BertForSequenceClassification`` / ``BertForQuestionAnswering`` become their
    raynas twins (head and labels included); ``BertModel`` / ``BertForMaskedLM``
    become ``RaynasForMaskedLM`` (with pooler if it had one; a bare encoder gets
    a fresh MLM head).
    """
    if getattr(model.config, "model_type", None) != "bert":
        raise ConfigError(f"teacher: model type {getattr(model.config, 'model_type', None)!r} is not 'bert'")
    config = raynas_config_from_bert(model.config)
    bare = model.base_model is model  # a BertModel: its keys lack the "bert." prefix
    state = {(f"bert.{k}" if bare else k): v for k, v in model.state_dict().items()}
    state.pop("cls.predictions.decoder.bias", None)
    reverse = {theirs: ours for ours, theirs in bert_key_map(config).items()}
    cls = next((ours for ours, theirs in _CLASSES if isinstance(model, theirs)), RaynasForMaskedLM)
    if cls is RaynasForMaskedLM:
        ours = RaynasForMaskedLM(config, add_pooling_layer=any(k.startswith("bert.pooler.") for k in state))
    else:
        ours = cls(config)
    renamed = _rename(state, reverse)
    missing, unexpected = ours.load_state_dict(renamed, strict=False)
    missing = [k for k in missing if not k.startswith("cls.")]  # an encoder-only teacher keeps a fresh MLM head
    if missing or unexpected:
        raise RuntimeError(f"bert -> raynas mismatch: missing {missing}, unexpected {unexpected}")
    ours.tie_weights()
    return ours.eval()


def _rename(state: dict[str, torch.Tensor], mapping: dict[str, str]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        for cut in range(len(parts), 0, -1):
            prefix = ".".join(parts[:cut])
            if prefix in mapping:
                out[".".join([mapping[prefix], *parts[cut:]])] = value
                break
        else:
            raise RuntimeError(f"no bert name for parameter {key}")
    return out


def to_bert(model: TaskModel) -> tuple[Any, dict[str, torch.Tensor]] | None:
    """The same model as its BERT class plus its full state dict, or None when no ``BertConfig`` expresses it.

    ``RaynasForMaskedLM`` -> ``BertForMaskedLM`` (the state keeps the pooler, which
    ``BertForMaskedLM`` lacks, so that ``AutoModel`` finds it in the export);
    ``RaynasForSequenceClassification`` / ``RaynasForQuestionAnswering`` -> their BERT twins.
    """
    bert_config = bert_config_for(model.config)
    if bert_config is None:
        return None
    bert_cls = next((theirs for ours, theirs in _CLASSES if isinstance(model, ours)), None)
    if bert_cls is None:
        raise ConfigError(f"export: {type(model).__name__} has no bert counterpart; "
                          f"expected one of {', '.join(ours.__name__ for ours, _ in _CLASSES)}")
    state = _rename(model.state_dict(), bert_key_map(model.config))
    if "cls.predictions.bias" in state:
        state["cls.predictions.decoder.bias"] = state["cls.predictions.bias"]  # tied in BertForMaskedLM
    bert = bert_cls(bert_config)
    missing, unexpected = bert.load_state_dict(state, strict=False)
    unexpected = [k for k in unexpected if not k.startswith("bert.pooler.")]
    if missing or unexpected:
        raise RuntimeError(f"bert conversion mismatch: missing {missing}, unexpected {unexpected}")
    return bert.eval(), state


def export_model(
    model: TaskModel, out_dir: str | os.PathLike, tokenizer: Any = None, overwrite: bool = False,
    bert_if_possible: bool = True, provenance: dict[str, Any] | None = None, latency: dict[str, Any] | None = None,
) -> Exported:
    """Save ``model`` (safetensors), ``tokenizer`` and a model card to ``out_dir``, atomically.

    As plain ``bert`` when ``bert_if_possible`` and the config is BERT-expressible
    (loads without raynas), else as ``raynas`` (loads after ``import raynas``).
    ``provenance`` (default: what the model's config carries) goes into config.json
    and the card (:mod:`raynas.model_card`), so the folder says where it came from.
    """
    with atomic_dir(out_dir, overwrite) as tmp:
        converted = to_bert(model) if bert_if_possible else None
        if converted is not None:
            bert, state = converted
            bert.save_pretrained(tmp, state_dict=state)
            model_type = "bert"
        else:
            model.save_pretrained(tmp)
            model_type = "raynas"
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_card(tmp, out_dir, model, provenance if provenance is not None else provenance_of(model), model_type,
                   latency=latency)
    out = Path(out_dir)
    return Exported(out, model_type, sum(p.numel() for p in model.parameters()))
