"""One compressed weight matrix, as every compression method hands it to the on-disk format.

Uniform quantization (post-training int8, QAT at 8 / 4 bits), k-means weight
sharing and gradual pruning all end in the same description of a matrix: integer
codes, how to turn them back into floats (per-row scales or a codebook), and an
optional mask of the entries that were pruned. The on-disk format
(:mod:`raynas.compression.packed_format`) stores exactly this, packed to ``bits``
per kept entry, and a load dequantizes it with :meth:`Encoded.dequantize` -- so a
method, its saved folder and the reloaded model agree by construction.

Pure torch; no Ray.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from raynas.errors import require

SCHEMES = ("int", "kmeans", "float")
INT_BITS = (2, 3, 4, 5, 6, 7, 8)
KMEANS_BITS = (1, 2, 3, 4, 5, 6, 7, 8)


def int_range(bits: int) -> int:
    """The largest code of a symmetric ``bits``-bit integer grid: codes lie in [-q, q], q = 2^(bits-1) - 1.

    Symmetric (no -2^(bits-1)) so that zero is exact and a row's scale is max|w| / q,
    which is also what ONNX Runtime's symmetric per-channel int8 computes: a model
    dequantized from these codes requantizes to the same codes there.
    """
    return 2 ** (bits - 1) - 1


@dataclass
class Encoded:
    """A weight of ``shape`` as codes + a way back to floats (+ an optional pruning mask).

    - ``scheme == "int"``: ``codes`` int in [-q, q] (:func:`int_range`), ``scale`` fp32 of
      shape ``[shape[0]]`` (one per output row); value = code * scale[row].
    - ``scheme == "kmeans"``: ``codes`` int in [0, 2^bits), ``codebook`` fp32 ``[2^bits]``;
      value = codebook[code].
    - ``scheme == "float"``: ``codes`` is the fp32 weight itself (a pruned matrix kept in fp32).
    - ``mask`` (bool, ``shape``; True = kept) zeroes pruned entries; codes there are ignored
      and the packed format does not store them.
    """

    scheme: str
    bits: int
    codes: Tensor
    scale: Tensor | None = None
    codebook: Tensor | None = None
    mask: Tensor | None = None

    def __post_init__(self) -> None:
        require(self.scheme in SCHEMES, f"scheme: expected one of {', '.join(SCHEMES)}, got {self.scheme!r}")
        if self.scheme == "int":
            require(self.bits in INT_BITS, f"bits: int quantization supports {INT_BITS}, got {self.bits!r}")
            require(self.scale is not None and self.scale.shape == self.codes.shape[:1],
                    "int scheme: scale must hold one value per row")
        elif self.scheme == "kmeans":
            require(self.bits in KMEANS_BITS, f"bits: k-means supports {KMEANS_BITS}, got {self.bits!r}")
            require(self.codebook is not None and self.codebook.numel() == 2 ** self.bits,
                    "kmeans scheme: codebook must hold 2^bits centroids")
        else:
            require(self.bits == 32, "float scheme: bits must be 32")
        require(self.mask is None or self.mask.shape == self.codes.shape, "mask: must have the weight's shape")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    def dequantize(self) -> Tensor:
        """The fp32 weight this encoding stands for (pruned entries exactly 0)."""
        if self.scheme == "int":
            assert self.scale is not None
            scale = self.scale.float().reshape(-1, *([1] * (self.codes.dim() - 1)))
            value = self.codes.float() * scale
        elif self.scheme == "kmeans":
            assert self.codebook is not None
            value = self.codebook.float()[self.codes.long()]
        else:
            value = self.codes.float()
        return value if self.mask is None else value * self.mask.to(value.dtype)

    def kept(self) -> int:
        """How many entries are stored (all, or the mask's True entries)."""
        return self.codes.numel() if self.mask is None else int(self.mask.sum())


def payload_bits(enc: Encoded) -> int:
    """The bits this matrix takes in the packed format: codes, scales / codebook, mask (1 bit per entry).

    The analytic size; the file on disk adds safetensors' header and per-tensor
    byte alignment, which the reports measure separately as bytes on disk.
    """
    bits = enc.kept() * enc.bits
    if enc.scale is not None:
        bits += 32 * enc.scale.numel()
    if enc.codebook is not None:
        bits += 32 * enc.codebook.numel()
    if enc.mask is not None:
        bits += enc.mask.numel()
    return bits


def to_device(enc: Encoded, device: torch.device | str) -> Encoded:
    """The same encoding with every tensor on ``device``."""
    move = (lambda t: None if t is None else t.to(device))  # noqa: E731
    return Encoded(enc.scheme, enc.bits, enc.codes.to(device), move(enc.scale), move(enc.codebook), move(enc.mask))


def compressible_modules(model: torch.nn.Module, embeddings: bool = True) -> dict[str, torch.nn.Module]:
    """The modules whose ``weight`` the compression methods encode, by their name in ``model``.

    Every ``nn.Linear`` of the base encoder (attention, FFN, pooler) and, with
    ``embeddings``, the word and position embeddings (half of a MiniLM's bytes: a
    size claim that left them in fp32 could not go below 1/2). The task head
    (classifier, qa_outputs, MLM decoder), LayerNorms, biases and the token-type
    embedding stay fp32: they are small, and the head is where a few bits cost most.
    """
    base = getattr(model, "base_model", model)
    prefix = next((n + "." for n, m in model.named_modules() if m is base and n), "")
    found: dict[str, torch.nn.Module] = {}
    for name, module in base.named_modules():
        if isinstance(module, torch.nn.Linear):
            found[prefix + name] = module
        elif embeddings and isinstance(module, torch.nn.Embedding) and name.split(".")[-1] in (
                "word_embeddings", "position_embeddings"):
            found[prefix + name] = module
    return found
