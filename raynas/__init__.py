"""raynas: neural-architecture search and compression for BERT-family models.

Importing raynas registers the ``raynas`` model type with transformers' Auto
classes, so exported models load with ``AutoModel.from_pretrained(path)``.
"""

from __future__ import annotations

import raynas._quiet  # noqa: F401  (first: before transformers is imported)
import raynas.compression.hf_quantizer  # noqa: F401  (registers quant_method "raynas": packed folders load)
from raynas.errors import ConfigError
from raynas.models import (
    RaynasConfig,
    RaynasForMaskedLM,
    RaynasForQuestionAnswering,
    RaynasForSequenceClassification,
    RaynasModel,
)
from raynas.spaces import load_space

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "RaynasConfig", "RaynasForMaskedLM", "RaynasForQuestionAnswering",
    "RaynasForSequenceClassification", "RaynasModel", "load_space",
]
