"""Loading a packed raynas folder with stock transformers: the ``"raynas"`` quantization method.

A compressed folder (:mod:`raynas.compression.packed_format`) should be usable by
anyone with transformers, not only by raynas code that knows the format: after
``import raynas``, ``AutoModelForSequenceClassification.from_pretrained(folder)``
(or AutoModel / ...ForQuestionAnswering, for the bert and the raynas model type)
returns an ordinary fp32 model whose weights are the dequantized codes.

transformers' quantizer hooks do the work. ``config.json``'s
``quantization_config.quant_method == "raynas"`` selects :class:`RaynasQuantizer`;
before the weights load, every listed module becomes a :class:`PackedLinear` /
:class:`PackedEmbedding` whose buffers carry exactly the stored names
(``weight_codes``, ``weight_scale`` / ``weight_codebook``, ``weight_mask``), so
transformers' own loader fills them by name (including its base-model prefix
handling); after loading, each is swapped for a plain ``nn.Linear`` / ``nn.Embedding``
holding :meth:`Encoded.dequantize` and the quantization config is removed. The
loaded model is then indistinguishable from an fp32 one (saving it writes fp32).

Registration runs on ``import raynas`` and must stay cheap: this module imports only
transformers' quantizer registry (already imported by transformers' modeling code)
and does no torch work at import.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from raynas.compression import packed_format as pf
from raynas.errors import ConfigError


@register_quantization_config(pf.QUANT_METHOD)
class RaynasQuantConfig(QuantizationConfigMixin):
    """``config.json``'s ``quantization_config`` of a packed folder; validated on construction (ConfigError)."""

    def __init__(self, quant_method: str = pf.QUANT_METHOD, format: int = pf.FORMAT,  # noqa: A002
                 weights: dict[str, dict[str, Any]] | None = None, **kwargs: Any) -> None:
        self.quant_method = quant_method
        self.format = format
        self.weights = pf.check_quantization_config(
            {"quant_method": quant_method, "format": format, "weights": weights})

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": self.quant_method, "format": self.format, "weights": copy.deepcopy(self.weights)}


class _Packed(nn.Module):
    """Holds one matrix's stored tensors as buffers named like the file's; dequantizes on demand."""

    def __init__(self, spec: dict[str, Any], shapes: dict[str, tuple[list[int], torch.dtype]]) -> None:
        super().__init__()
        self.spec = spec
        for suffix in pf.stored_suffixes(spec):
            shape, dtype = shapes[suffix]
            self.register_buffer(suffix, torch.empty(shape, dtype=dtype, device="meta"))

    def dequantized_weight(self) -> torch.Tensor:
        tensors = {s: getattr(self, s) for s in pf.stored_suffixes(self.spec)}
        return pf.unpack_encoded(self.spec, tensors).dequantize()


class PackedLinear(_Packed):
    """An ``nn.Linear`` while its packed weight loads; :meth:`unpacked` gives the plain fp32 layer."""

    def __init__(self, linear: nn.Linear, spec: dict[str, Any], shapes: dict) -> None:
        super().__init__(spec, shapes)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.dequantized_weight().to(x.dtype), self.bias)

    def unpacked(self, dtype: torch.dtype | None = None) -> nn.Linear:
        weight = self.dequantized_weight().to(_float(dtype))
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        out.weight = nn.Parameter(weight)
        if self.bias is not None:
            out.bias = self.bias
        return out


class PackedEmbedding(_Packed):
    """An ``nn.Embedding`` while its packed weight loads; :meth:`unpacked` gives the plain fp32 embedding."""

    def __init__(self, embedding: nn.Embedding, spec: dict[str, Any], shapes: dict) -> None:
        super().__init__(spec, shapes)
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.options = {"padding_idx": embedding.padding_idx, "max_norm": embedding.max_norm,
                        "norm_type": embedding.norm_type, "scale_grad_by_freq": embedding.scale_grad_by_freq,
                        "sparse": embedding.sparse}
        # A tie anchor, not stored: an MLM decoder tied to these embeddings is tied to this (meta) parameter
        # while loading, and re-tied to the unpacked weight afterwards. Hidden from the state dict, so
        # transformers neither expects it in the file nor reports it missing.
        self.weight = nn.Parameter(torch.empty(self.num_embeddings, self.embedding_dim, device="meta"),
                                   requires_grad=False)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.pop(prefix + "weight", None)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.dequantized_weight(), self.options["padding_idx"])

    def unpacked(self, dtype: torch.dtype | None = None) -> nn.Embedding:
        weight = self.dequantized_weight().to(_float(dtype))
        return nn.Embedding.from_pretrained(weight, freeze=False, **self.options)


def _header_shapes(checkpoint_files: list[str] | None) -> dict[str, tuple[list[int], torch.dtype]]:
    """Shape and dtype of every stored tensor, read from the safetensors headers (no data is read)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[list[int], torch.dtype]] = {}
    for path in checkpoint_files or []:
        if str(path).endswith(".safetensors"):
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    piece = f.get_slice(key)
                    dtype = {"U8": torch.uint8, "F32": torch.float32, "F16": torch.float16,
                             "BF16": torch.bfloat16}.get(piece.get_dtype(), torch.float32)
                    shapes[key] = (list(piece.get_shape()), dtype)
    return shapes


def resolve_name(model: nn.Module, name: str, modules: dict[str, nn.Module]) -> str | None:
    """``name`` (a module name in the saved model) as a module name of ``model``, or None when absent.

    A base model loaded from a task folder lacks the ``bert.`` / ``raynas.`` prefix; a task
    model loaded from a base-model folder adds it (transformers renames the stored keys the same way).
    """
    prefix = getattr(model, "base_model_prefix", "") or ""
    candidates = [name]
    if prefix:
        candidates += [name.removeprefix(prefix + ".")] if name.startswith(prefix + ".") else [f"{prefix}.{name}"]
    return next((c for c in candidates if c in modules), None)


@register_quantizer(pf.QUANT_METHOD)
class RaynasQuantizer(HfQuantizer):
    """Swaps listed modules for packed ones before loading and for plain fp32 ones after (see module docstring)."""

    requires_calibration = True  # a folder is always pre-quantized (saved by save_compressed)
    quantization_config: RaynasQuantConfig

    dtype: torch.dtype | None = None

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        self.dtype = dtype  # the unpacked weights take the dtype the rest of the model loads in
        return dtype

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        shapes = _header_shapes(kwargs.get("checkpoint_files"))
        modules = dict(model.named_modules())
        for saved, spec in self.quantization_config.weights.items():
            name = resolve_name(model, saved, modules)
            if name is None:  # e.g. the pooler of a classification folder, loaded as a QA model (no pooler)
                continue
            missing = [s for s in pf.stored_suffixes(spec) if f"{saved}.{s}" not in shapes]
            if missing:
                raise ConfigError(f"{pf.WEIGHTS_FILE}: {saved} lacks {', '.join(missing)} (not a complete packed file)")
            stored = {s: shapes[f"{saved}.{s}"] for s in pf.stored_suffixes(spec)}
            module = modules[name]
            if isinstance(module, nn.Linear):
                packed: nn.Module = PackedLinear(module, spec, stored)
            elif isinstance(module, nn.Embedding):
                packed = PackedEmbedding(module, spec, stored)
            else:
                raise ConfigError(f"quantization_config.weights.{saved}: {type(module).__name__} is not a "
                                     "Linear or Embedding in this model")
            model.set_submodule(name, packed)
        return model

    def postprocess_model(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        for name, module in list(model.named_modules()):
            if isinstance(module, _Packed):
                model.set_submodule(name, module.unpacked(self.dtype))
        self.remove_quantization_config(model)
        if hasattr(model, "tie_weights"):
            model.tie_weights()
        return model

    def is_serializable(self) -> bool:
        return False

    @property
    def is_trainable(self) -> bool:
        return False


def _float(dtype: Any) -> torch.dtype:
    """The dtype an unpacked weight takes: the model's floating dtype, fp32 when none was resolved."""
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32
