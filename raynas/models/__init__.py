"""The exported model family, registered with transformers' Auto classes on import."""

from __future__ import annotations

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
)

from raynas.models.configuration_raynas import RaynasConfig
from raynas.models.modeling_raynas import (
    RaynasForMaskedLM,
    RaynasForQuestionAnswering,
    RaynasForSequenceClassification,
    RaynasModel,
    RaynasPreTrainedModel,
)

AutoConfig.register("raynas", RaynasConfig, exist_ok=True)
AutoModel.register(RaynasConfig, RaynasModel, exist_ok=True)
AutoModelForMaskedLM.register(RaynasConfig, RaynasForMaskedLM, exist_ok=True)
AutoModelForSequenceClassification.register(RaynasConfig, RaynasForSequenceClassification, exist_ok=True)
AutoModelForQuestionAnswering.register(RaynasConfig, RaynasForQuestionAnswering, exist_ok=True)

__all__ = [
    "RaynasConfig", "RaynasForMaskedLM", "RaynasForQuestionAnswering",
    "RaynasForSequenceClassification", "RaynasModel", "RaynasPreTrainedModel",
]
