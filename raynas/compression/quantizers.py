"""Weight quantization: symmetric per-row integers, k-means weight sharing, and the hooks that train through them.

Every method ends in :class:`raynas.compression.encoding.Encoded`, so what the
fine-tuning loop trained, what :func:`apply_encoded` writes into an fp32 model and
what the packed format stores are one and the same matrix:

- ``int`` (post-training int8, QAT at 2/3/4/8 bits): one scale per output row,
  ``max|row| / q`` -- the grid ONNX Runtime's symmetric per-channel int8 uses, so a
  dequantized model requantizes there to the same codes. :class:`QAT` trains the
  fp32 latent weights through :func:`fake_quant_int` with a straight-through
  estimator; the forward value is bit-exactly the dequantized weight, so the
  outputs of the parametrized model are the outputs of its :meth:`QAT.encoded`.
- ``kmeans`` (Han et al. 2016, Deep Compression): 2^bits shared values per matrix,
  found by 1-D Lloyd iterations from a linear initialisation (the paper's finding:
  linear init keeps the rare large weights, which density / random init lose).
  :class:`KMeansSharing` then fixes each entry's code and trains only the codebook:
  a centroid's gradient is the sum of its entries' gradients.

Zeros of a pruned weight stay zeros. A mask costs one bit per entry and saves
``bits`` per zero, so a weight counts as pruned (and its encoding carries a mask)
when ``zeros * bits > entries`` (:func:`zero_mask`); below that, the zeros are
cheaper to store as codes. QAT keeps *every* zero during training (code 0 is exact
on the symmetric grid, so no mask is needed to store them).

Pure torch; no Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from raynas.compression.encoding import INT_BITS, KMEANS_BITS, Encoded, compressible_modules, int_range, to_device
from raynas.errors import ConfigError, require

QAT_BITS = (2, 3, 4, 8)


# ---- encoders -----------------------------------------------------------------------------------
def _row_scale(w: Tensor, bits: int) -> Tensor:
    """max|row| / q per output row (fp32); an all-zero row gets 1.0 so nothing divides by zero."""
    amax = w.detach().float().abs().reshape(w.shape[0], -1).amax(dim=1)
    scale = amax / int_range(bits)
    return torch.where(amax > 0, scale, torch.ones_like(scale))


def _broadcast(scale: Tensor, w: Tensor) -> Tensor:
    return scale.reshape(-1, *([1] * (w.dim() - 1)))


def quantize_int(w: Tensor, bits: int, mask: Tensor | None = None) -> Encoded:
    """Symmetric per-row ``bits``-bit codes of ``w`` (scale from the kept entries; pruned codes are 0)."""
    require(bits in INT_BITS, f"quantize.bits: int quantization supports {INT_BITS}, got {bits!r}")
    w = w.detach().float()
    if mask is not None:
        w = w * mask.to(w.dtype)
    scale = _row_scale(w, bits)
    q = int_range(bits)
    codes = torch.round(w / _broadcast(scale, w)).clamp_(-q, q).to(torch.int8)
    return Encoded("int", bits, codes, scale=scale, mask=None if mask is None else mask.bool())


def fake_quant_int(w: Tensor, bits: int) -> Tensor:
    """``w`` on :func:`quantize_int`'s grid in the forward, identity in the backward (straight-through).

    Written as ``deq + (w - w.detach())`` rather than ``w + (deq - w).detach()``: the
    same gradient, but the forward value is bit-exactly the dequantized weight
    (``w - w`` is exactly 0), so a QAT model computes what its saved codes compute.
    """
    scale = _broadcast(_row_scale(w, bits), w)
    q = int_range(bits)
    with torch.no_grad():
        deq = torch.round(w.float() / scale).clamp_(-q, q) * scale
    return deq.to(w.dtype) + (w - w.detach())


def fake_quant_activation(x: Tensor, bits: int = 8) -> Tensor:
    """Asymmetric per-tensor fake quantization with this batch's range (ONNX Runtime's DynamicQuantizeLinear).

    The range always includes 0 (so zero is exact), scale = (max - min) / (2^bits - 1),
    zero point = round(-min / scale); straight-through gradient. No host sync.
    """
    levels = 2 ** bits - 1
    with torch.no_grad():
        lo = x.detach().min().clamp(max=0).float()
        hi = x.detach().max().clamp(min=0).float()
        scale = (hi - lo) / levels
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.round(-lo / scale).clamp(0, levels)
        deq = (torch.round(x.float() / scale + zero).clamp(0, levels) - zero) * scale
    return deq.to(x.dtype) + (x - x.detach())


def kmeans_encode(w: Tensor, bits: int, mask: Tensor | None = None, iters: int = 100) -> Encoded:
    """2^bits shared values for ``w``: 1-D Lloyd on the kept entries from centroids spaced linearly min..max.

    The kept values are sorted once; every cluster of sorted centroids is then a
    contiguous run of them, found with ``searchsorted`` on the centroid midpoints,
    and its mean is a difference of prefix sums (float64). An iteration therefore
    costs O(2^bits log n), and a 30522 x 384 embedding takes seconds (mostly the
    sort). Empty clusters keep their centroid; the result is deterministic. Codes
    are the nearest centroid (``bucketize`` on the final midpoints).
    """
    require(bits in KMEANS_BITS, f"quantize.bits: k-means supports {KMEANS_BITS}, got {bits!r}")
    require(iters >= 0, f"quantize.iters: expected >= 0, got {iters!r}")
    w = w.detach().float()
    k = 2 ** bits
    values = w.flatten() if mask is None else w[mask.bool()]
    if values.numel() == 0:
        codebook = torch.zeros(k, device=w.device)
    else:
        values, _ = values.sort()
        prefix = torch.cat([values.new_zeros(1, dtype=torch.float64), values.double().cumsum(0)])
        n = torch.tensor([values.numel()], device=w.device)
        start = torch.zeros(1, dtype=torch.long, device=w.device)
        codebook = torch.linspace(float(values[0]), float(values[-1]), k, device=w.device)
        for _ in range(iters):
            edges = torch.cat([start, torch.searchsorted(values, (codebook[1:] + codebook[:-1]) / 2, right=True), n])
            counts = edges[1:] - edges[:-1]
            means = ((prefix[edges[1:]] - prefix[edges[:-1]]) / counts.clamp_min(1)).float()
            updated = torch.where(counts > 0, means, codebook)
            if torch.equal(updated, codebook):
                break
            codebook = updated
    codes = torch.bucketize(w, (codebook[1:] + codebook[:-1]) / 2).to(torch.uint8)
    if mask is not None:
        codes = codes.masked_fill_(~mask.bool(), 0)
    return Encoded("kmeans", bits, codes, codebook=codebook, mask=None if mask is None else mask.bool())


def zero_mask(w: Tensor, bits: int) -> Tensor | None:
    """``w != 0`` when ``w`` is pruned enough that a mask pays for itself at ``bits`` (zeros * bits > entries)."""
    kept = w.detach() != 0
    return kept if _pays(kept, bits) else None


def _pays(kept: Tensor, bits: int) -> bool:
    """Whether storing this mask (1 bit per entry) costs less than storing its zeros as ``bits``-bit codes."""
    return (kept.numel() - int(kept.sum())) * bits > kept.numel()


def encode_weight(weight: Tensor, scheme: str, bits: int, iters: int = 100) -> Encoded:
    """One weight, post-training: int codes or a k-means codebook; a pruned weight keeps its zeros (:func:`zero_mask`)."""
    mask = zero_mask(weight, bits)
    return quantize_int(weight, bits, mask) if scheme == "int" else kmeans_encode(weight, bits, mask, iters)


def encode_weights(model: nn.Module, scheme: str, bits: int | dict[str, int], embeddings: bool = True,
                   iters: int = 100) -> dict[str, Encoded]:
    """Post-training encodings of every compressible weight (``bits`` per module name for a plan; missing: fp32).

    Pruned weights keep their zeros (:func:`zero_mask`).
    """
    require(scheme in ("int", "kmeans"), f"quantize.scheme: expected int or kmeans, got {scheme!r}")
    modules = compressible_modules(model, embeddings=embeddings)
    plan = _plan(bits, modules)
    return {name: encode_weight(modules[name].weight, scheme, width, iters) for name, width in plan.items()}


def apply_encoded(model: nn.Module, encs: dict[str, Encoded]) -> None:
    """Write each module's dequantized weight in place: the fp32 model then computes what the saved one does."""
    modules = dict(model.named_modules())
    for name, enc in encs.items():
        module = modules.get(name)
        require(module is not None and isinstance(getattr(module, "weight", None), Tensor),
                f"encoded: the model has no module {name!r} with a weight")
        require(not parametrize.is_parametrized(module, "weight"),
                f"encoded: {name}.weight is parametrized; remove() the quantization hooks first")
        require(tuple(module.weight.shape) == enc.shape,
                f"encoded: {name} has shape {tuple(module.weight.shape)}, the encoding {enc.shape}")
        with torch.no_grad():
            module.weight.copy_(enc.dequantize().to(module.weight.device, module.weight.dtype))


def _plan(bits: int | dict[str, int], modules: dict[str, nn.Module]) -> dict[str, int]:
    if isinstance(bits, dict):
        unknown = [n for n in bits if n not in modules]
        require(not unknown, f"quantize.bits: the plan names modules that are not compressible here: {unknown[:3]}")
        return {n: int(bits[n]) for n in modules if n in bits}
    return {n: int(bits) for n in modules}


def _mean_bits(plan: dict[str, int], modules: dict[str, nn.Module]) -> float:
    entries = sum(modules[n].weight.numel() for n in plan)
    return sum(modules[n].weight.numel() * b for n, b in plan.items()) / max(1, entries)


# ---- quantization-aware training ------------------------------------------------------------
@dataclass
class QATSettings:
    """Quantization-aware training; every field JSON-able."""

    bits: int = 8  # weights, symmetric per row
    activation_bits: int | None = None  # 8: each Linear's input fake-quantized as ORT's dynamic int8 does
    embeddings: bool = True
    keep_zeros: bool = True  # zeros of an already-pruned weight stay zeros

    def check(self) -> None:
        require(self.bits in QAT_BITS, f"quantize.bits: QAT supports {QAT_BITS}, got {self.bits!r}")
        require(self.activation_bits is None or (isinstance(self.activation_bits, int) and 2 <= self.activation_bits <= 8),
                f"quantize.activation_bits: expected null or 2..8, got {self.activation_bits!r}")


class _FakeQuant(nn.Module):
    """weight = fake_quant_int(latent * mask); the latent fp32 weight is what AdamW trains."""

    def __init__(self, bits: int, mask: Tensor | None) -> None:
        super().__init__()
        self.bits = bits
        self.mask: Tensor | None
        self.register_buffer("mask", mask)

    def forward(self, latent: Tensor) -> Tensor:
        if self.mask is not None:
            latent = latent * self.mask.to(latent.dtype)
        return fake_quant_int(latent, self.bits)


class _Hooks:
    """What QAT and k-means sharing share: the modules, the step, removal, the TrainingHooks no-ops."""

    def __init__(self) -> None:
        self.modules: dict[str, nn.Module] = {}
        self.step = 0
        self._final: dict[str, Encoded] | None = None
        self._mean_bits = float("nan")

    def loss(self, step: int) -> Tensor | None:
        return None

    def after_step(self, step: int) -> None:
        self.step = step

    def evaluating(self, on: bool) -> None:
        pass

    def status(self) -> dict[str, float]:
        return {"weight_bits": self._mean_bits}

    def state_dict(self) -> dict[str, Any]:
        """The step only: codes, codebooks, masks and latent weights are in the model's own state dict."""
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]

    def _register(self, name: str, module: nn.Module, parametrization: nn.Module) -> None:
        if parametrize.is_parametrized(module, "weight"):
            raise ConfigError(f"quantize: {name}.weight already has a parametrization")
        parametrize.register_parametrization(module, "weight", parametrization)
        self.modules[name] = module

    def encoded(self) -> dict[str, Encoded]:
        raise NotImplementedError

    def remove(self) -> dict[str, Encoded]:
        """Remove the parametrizations, leaving the dequantized weights in place; returns the final encodings."""
        if self._final is None:
            self._final = self.encoded()
            for module in self.modules.values():
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
                module.weight.requires_grad_(True)
        return self._final


class QAT(_Hooks):
    """:class:`raynas.evaluation.finetune_state.TrainingHooks` for quantization-aware training (module doc)."""

    def __init__(self, settings: QATSettings) -> None:
        settings.check()
        super().__init__()
        self.settings = settings
        self._handles: list[Any] = []

    def prepare(self, model: nn.Module, total_steps: int, device: torch.device) -> nn.Module:
        s = self.settings
        modules = compressible_modules(model, embeddings=s.embeddings)
        for name, module in modules.items():
            weight = module.weight
            keep = (weight.detach() != 0) if s.keep_zeros else None
            self._register(name, module, _FakeQuant(s.bits, None if keep is None or bool(keep.all()) else keep))
            if s.activation_bits is not None and isinstance(module, nn.Linear):
                bits = s.activation_bits
                self._handles.append(module.register_forward_pre_hook(
                    lambda _m, args, bits=bits: (fake_quant_activation(args[0], bits), *args[1:])))
        self._mean_bits = _mean_bits({n: s.bits for n in modules}, modules)
        return model

    def encoded(self) -> dict[str, Encoded]:
        """The int codes of the latent weights: they dequantize to exactly the weights the model computes with."""
        if self._final is not None:
            return self._final
        out = {}
        for name, module in self.modules.items():
            p = module.parametrizations.weight
            latent, mask = p.original.detach(), p[0].mask
            if mask is not None:
                latent = latent * mask.to(latent.dtype)
            # code 0 is exact: the zeros need a stored mask only where it is the smaller way to store them
            stored = mask if mask is not None and _pays(mask, self.settings.bits) else None
            out[name] = quantize_int(latent, self.settings.bits, stored)
        return out

    def remove(self) -> dict[str, Encoded]:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return super().remove()


# ---- k-means weight sharing -----------------------------------------------------------------
@dataclass
class KMeansSettings:
    """k-means weight sharing; ``bits`` one width or a per-module plan (missing modules stay fp32)."""

    bits: int | dict[str, int] = 4
    iters: int = 100
    embeddings: bool = True
    train_codebook: bool = True
    keep_zeros: bool = True  # a pruned weight's zeros stay zeros (masked; see the module doc)

    def check(self) -> None:
        widths = list(self.bits.values()) if isinstance(self.bits, dict) else [self.bits]
        require(all(isinstance(b, int) and b in KMEANS_BITS for b in widths),
                f"quantize.bits: k-means supports {KMEANS_BITS}, got {self.bits!r}")
        require(isinstance(self.iters, int) and self.iters >= 1, f"quantize.iters: expected >= 1, got {self.iters!r}")


class _SharedWeight(nn.Module):
    """weight = codebook[codes] (* mask): the codebook is trained, the codes (a buffer) are fixed."""

    def __init__(self, enc: Encoded, train_codebook: bool) -> None:
        super().__init__()
        assert enc.codebook is not None
        self.bits = enc.bits
        self.codebook = nn.Parameter(enc.codebook.clone(), requires_grad=train_codebook)
        self.codes: Tensor
        self.mask: Tensor | None
        self.register_buffer("codes", enc.codes.to(torch.uint8))
        self.register_buffer("mask", enc.mask)

    def forward(self, original: Tensor) -> Tensor:
        weight = self.codebook[self.codes.long()]
        return weight if self.mask is None else weight * self.mask.to(weight.dtype)

    def encoded(self) -> Encoded:
        return Encoded("kmeans", self.bits, self.codes.clone(), codebook=self.codebook.detach().float().clone(),
                       mask=None if self.mask is None else self.mask.clone())


class KMeansSharing(_Hooks):
    """:class:`raynas.evaluation.finetune_state.TrainingHooks` for k-means weight sharing (module doc)."""

    def __init__(self, settings: KMeansSettings) -> None:
        settings.check()
        super().__init__()
        self.settings = settings

    def prepare(self, model: nn.Module, total_steps: int, device: torch.device) -> nn.Module:
        s = self.settings
        modules = compressible_modules(model, embeddings=s.embeddings)
        plan = _plan(s.bits, modules)
        for name, bits in plan.items():
            module = modules[name]
            weight = module.weight
            mask = zero_mask(weight, bits) if s.keep_zeros else None
            # on the training device: the sort that dominates is fast there (the model is moved after prepare)
            enc = to_device(kmeans_encode(weight.to(device), bits, None if mask is None else mask.to(device), s.iters),
                            weight.device)
            self._register(name, module, _SharedWeight(enc, s.train_codebook))
            module.parametrizations.weight.original.requires_grad_(False)
        self._mean_bits = _mean_bits(plan, modules)
        return model

    def encoded(self) -> dict[str, Encoded]:
        """The fixed codes with the current (trained) codebooks."""
        if self._final is not None:
            return self._final
        return {name: module.parametrizations.weight[0].encoded() for name, module in self.modules.items()}
