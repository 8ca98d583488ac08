"""The exported model family, registered with transformers' Auto classes on import.

Importing this package is what ``import raynas`` defers until transformers is imported
(see :mod:`raynas`): it registers the model classes and, last, the ``raynas`` quantization
method of packed folders (:mod:`raynas.compression.hf_quantizer`).
"""

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

import raynas.compression.hf_quantizer  # noqa: E402, F401  (last: registers quant_method "raynas")

__all__ = [
    "RaynasConfig", "RaynasForMaskedLM", "RaynasForQuestionAnswering",
    "RaynasForSequenceClassification", "RaynasModel", "RaynasPreTrainedModel",
]
