"""``RaynasConfig``: a BERT-style encoder whose config lists each op-layer.

One format for every arch raynas produces: AutoTinyBERT's homogeneous models,
NAS-BERT's heterogeneous chains and pruned models with per-layer head / FFN
sizes. Errors are raised at construction, naming the bad field.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

from raynas.errors import ConfigError
from raynas.spaces.ops import OpSpec, op_from_dict


class RaynasConfig(PreTrainedConfig):
    """Embeddings + ``layers`` (one op dict per op-layer) + BERT-style heads."""

    model_type = "raynas"

    vocab_size: int = 30522
    hidden_size: int = 768
    layers: list | None = None
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_dropout_prob: float | int = 0.1
    attention_probs_dropout_prob: float | int = 0.1
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int | None = 0
    classifier_dropout: float | int | None = None
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs: Any) -> None:
        if self.layers is None:  # BERT-base: 12 x (MHA 12x64, FFN 3072)
            self.layers = [{"op": "mha", "heads": 12, "head_dim": 64}, {"op": "ffn", "inner": 3072}] * 12
        if not isinstance(self.layers, (list, tuple)):
            raise ConfigError(f"layers: expected a list of op dicts, got {type(self.layers).__name__}")
        for key in ("vocab_size", "hidden_size", "max_position_embeddings", "type_vocab_size"):
            value = getattr(self, key)
            if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
                raise ConfigError(f"{key}: expected a positive integer, got {value!r}")
        self.layers = [op_from_dict(raw, f"layers[{i}]").to_dict() for i, raw in enumerate(self.layers)]
        super().__post_init__(**kwargs)

    @property
    def ops(self) -> tuple[OpSpec, ...]:
        """The op-layer chain as typed specs."""
        return tuple(op_from_dict(raw) for raw in self.layers)
