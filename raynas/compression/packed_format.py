"""The on-disk format of a compressed model: a transformers folder whose encoded weights are bit-packed.

A compressed model is only smaller if its file is: int4 codes stored as int8, or
k-means 3-bit indices stored in a byte each, would claim a compression the
folder does not have. So every encoded matrix (:class:`~raynas.compression.encoding.Encoded`)
is stored as ``bits`` bits per *kept* entry, densely packed little-endian (3-bit
codes take 3 bits, not 4), plus its per-row scales or codebook and, when pruned,
a 1-bit-per-entry mask; every other tensor of the state dict (biases, LayerNorms,
token-type embeddings, the task head) is stored unchanged in fp32. The size of
``model.safetensors`` is then the analytic :func:`~raynas.compression.encoding.payload_bits`
plus safetensors' header and the fp32 rest -- :func:`bytes_on_disk` is what reports quote.

The folder stays an ordinary transformers folder: ``config.json`` carries
``quantization_config = {"quant_method": "raynas", "format": 1, "weights": {...}}``
and :mod:`raynas.compression.hf_quantizer` (registered by ``import raynas``) makes
``AutoModel*.from_pretrained(folder)`` rebuild the fp32 model from it. Saving and
loading share :func:`pack_encoded` / :func:`unpack_encoded`, so a reloaded weight
is exactly :meth:`Encoded.dequantize` of what was saved.

Pure torch + safetensors; no Ray.
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.utils.parametrize
from torch import Tensor

from raynas.atomic_io import atomic_dir
from raynas.compression.encoding import INT_BITS, KMEANS_BITS, SCHEMES, Encoded, int_range
from raynas.errors import ConfigError, require

FORMAT = 1
QUANT_METHOD = "raynas"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "compression.json"
# What one encoded module ``N`` stores, as ``N.<suffix>``: the names the packed modules' buffers carry at load.
SUFFIXES = ("weight_codes", "weight_scale", "weight_codebook", "weight_mask")
SPEC_KEYS = ("scheme", "bits", "shape", "masked")


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack integer ``codes`` in [0, 2^bits) into a uint8 tensor, ``bits`` bits each, little-endian.

    Code ``i``'s bit ``j`` is bit ``(i * bits + j) % 8`` of byte ``(i * bits + j) // 8``;
    the last byte is zero-padded. ``ceil(codes.numel() * bits / 8)`` bytes for any bits in 1..8.
    """
    require(isinstance(bits, int) and 1 <= bits <= 8, f"bits: pack_bits supports 1..8, got {bits!r}")
    flat = codes.detach().reshape(-1).to("cpu")
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    if flat.numel():
        lo, hi = int(flat.min()), int(flat.max())
        require(lo >= 0 and hi < 2 ** bits, f"codes: values must lie in [0, {2 ** bits}) for {bits} bits, got [{lo}, {hi}]")
    flat = flat.to(torch.uint8)
    if bits == 8:
        return flat.clone()
    n_bytes = math.ceil(flat.numel() * bits / 8)
    stream = torch.zeros(n_bytes * 8, dtype=torch.uint8)
    shifts = torch.arange(bits, dtype=torch.uint8)
    stream[: flat.numel() * bits] = ((flat.unsqueeze(1) >> shifts) & 1).reshape(-1)
    stream = stream.view(n_bytes, 8)
    packed = torch.zeros(n_bytes, dtype=torch.uint8)
    for k in range(8):
        packed |= stream[:, k] << k
    return packed


def unpack_bits(packed: Tensor, bits: int, count: int) -> Tensor:
    """The first ``count`` ``bits``-bit codes of ``packed`` (see :func:`pack_bits`), as int64."""
    require(isinstance(bits, int) and 1 <= bits <= 8, f"bits: unpack_bits supports 1..8, got {bits!r}")
    packed = packed.detach().reshape(-1).to(torch.uint8)
    require(packed.numel() * 8 >= count * bits,
            f"packed: {packed.numel()} bytes cannot hold {count} codes of {bits} bits")
    if bits == 8:
        return packed[:count].long()
    stream = ((packed.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1).reshape(-1)
    stream = stream[: count * bits].view(count, bits)
    codes = torch.zeros(count, dtype=torch.uint8, device=packed.device)
    for j in range(bits):
        codes |= stream[:, j] << j
    return codes.long()


def pack_encoded(enc: Encoded) -> dict[str, Tensor]:
    """The tensors one encoded matrix is stored as, keyed by suffix (``weight_codes``, ``weight_scale``, ...).

    Int codes are stored offset by q (code + q in [0, 2q]); only the mask's kept
    entries are stored (row-major order); ``float`` keeps the kept entries in fp32.
    """
    codes = enc.codes.detach().cpu()
    mask = None if enc.mask is None else enc.mask.detach().cpu().bool()
    kept = codes.reshape(-1) if mask is None else codes[mask]
    out: dict[str, Tensor] = {}
    if enc.scheme == "float":
        out["weight_codes"] = kept.float().contiguous()
    else:
        if enc.scheme == "int":
            q = int_range(enc.bits)
            kept = kept.long()
            if kept.numel():
                require(int(kept.min()) >= -q and int(kept.max()) <= q,
                        f"codes: int{enc.bits} codes must lie in [-{q}, {q}]")
            kept = kept + q
            out["weight_scale"] = enc.scale.detach().cpu().float().contiguous()
        else:
            out["weight_codebook"] = enc.codebook.detach().cpu().float().contiguous()
        out["weight_codes"] = pack_bits(kept, enc.bits)
    if mask is not None:
        out["weight_mask"] = pack_bits(mask, 1)
    return out


def unpack_encoded(spec: dict[str, Any], tensors: dict[str, Tensor]) -> Encoded:
    """Rebuild the :class:`Encoded` stored as ``tensors`` (by suffix) under ``spec`` (a ``weights`` entry)."""
    scheme, bits, shape, masked = (spec[k] for k in SPEC_KEYS)
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    device = tensors["weight_codes"].device
    mask = unpack_bits(tensors["weight_mask"], 1, numel).bool().view(shape) if masked else None
    kept = numel if mask is None else int(mask.sum())
    if scheme == "float":
        values = tensors["weight_codes"].float().reshape(-1)
        require(values.numel() == kept, f"weight_codes: expected {kept} fp32 entries, got {values.numel()}")
    else:
        values = unpack_bits(tensors["weight_codes"], bits, kept)
        if scheme == "int":
            values = values - int_range(bits)
    if mask is None:
        codes = values.view(shape)
    else:
        codes = torch.zeros(shape, dtype=values.dtype, device=device)
        codes[mask] = values
    scale = tensors["weight_scale"].float() if scheme == "int" else None
    codebook = tensors["weight_codebook"].float() if scheme == "kmeans" else None
    return Encoded(scheme, bits, codes, scale=scale, codebook=codebook, mask=mask)


def stored_suffixes(spec: dict[str, Any]) -> list[str]:
    """The suffixes stored for one ``weights`` entry (what a packed module's buffers are named)."""
    names = ["weight_codes"]
    if spec["scheme"] == "int":
        names.append("weight_scale")
    elif spec["scheme"] == "kmeans":
        names.append("weight_codebook")
    if spec["masked"]:
        names.append("weight_mask")
    return names


def check_quantization_config(qc: Any) -> dict[str, dict[str, Any]]:
    """Validate a ``quantization_config`` dict; return its ``weights``. One-line ConfigError naming the field."""
    require(isinstance(qc, dict), "quantization_config: expected a mapping")
    require(qc.get("quant_method") == QUANT_METHOD,
            f"quantization_config.quant_method: expected {QUANT_METHOD!r}, got {qc.get('quant_method')!r}")
    require(qc.get("format") == FORMAT,
            f"quantization_config.format: this raynas reads format {FORMAT}, got {qc.get('format')!r}")
    weights = qc.get("weights")
    require(isinstance(weights, dict) and weights, "quantization_config.weights: expected a non-empty mapping")
    for name, spec in weights.items():
        field = f"quantization_config.weights.{name}"
        require(isinstance(spec, dict) and all(k in spec for k in SPEC_KEYS),
                f"{field}: expected keys {', '.join(SPEC_KEYS)}")
        shape = spec["shape"]
        require(isinstance(shape, list) and len(shape) == 2 and all(isinstance(s, int) and s > 0 for s in shape),
                f"{field}.shape: expected [rows, columns] of positive ints, got {shape!r}")
        require(isinstance(spec["masked"], bool), f"{field}.masked: expected true/false")
        allowed = {"int": INT_BITS, "kmeans": KMEANS_BITS, "float": (32,)}
        require(spec["scheme"] in allowed,
                f"{field}.scheme: expected one of {', '.join(SCHEMES)}, got {spec['scheme']!r}")
        require(type(spec["bits"]) is int and spec["bits"] in allowed[spec["scheme"]],
                f"{field}.bits: {spec['scheme']} supports {allowed[spec['scheme']]}, got {spec['bits']!r}")
    return weights


def quantization_config(encoded: dict[str, Encoded]) -> dict[str, Any]:
    """The ``quantization_config`` entry of ``config.json`` describing ``encoded``."""
    return {
        "quant_method": QUANT_METHOD,
        "format": FORMAT,
        "weights": {name: {"scheme": enc.scheme, "bits": enc.bits, "shape": list(enc.shape),
                           "masked": enc.mask is not None} for name, enc in encoded.items()},
    }


def _tied_keys(model: torch.nn.Module, state: dict[str, Tensor]) -> set[str]:
    """State-dict keys that are tied copies of another key (saved once, re-tied by transformers on load)."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return {target for target, source in tied.items()
            if target in state and source in state and state[target].data_ptr() == state[source].data_ptr()}


def save_compressed(
    model: torch.nn.Module,
    encoded: dict[str, Encoded],
    folder: str | os.PathLike,
    tokenizer: Any = None,
    card: dict | None = None,
) -> Path:
    """Write ``model`` with ``encoded`` weights bit-packed to ``folder`` (atomically, replacing it); return it.

    ``encoded`` is keyed by module name in ``model`` (:func:`compressible_modules`);
    those modules' ``weight`` is replaced by the packed tensors, everything else of the
    state dict is saved unchanged. ``card`` (method, settings, metrics) goes to
    ``compression.json`` beside the model; the model card (README.md) and
    ``config.json``'s provenance add the encoding and the file size to what the
    model's config carried (:mod:`raynas.model_card`).
    """
    from safetensors.torch import save_file

    require(bool(encoded), "encoded: nothing to save (no encoded modules)")
    modules = dict(model.named_modules())
    for name, enc in encoded.items():
        module = modules.get(name)
        require(module is not None and isinstance(getattr(module, "weight", None), Tensor),
                f"encoded: {name!r} is not a module with a weight in this model")
        require(tuple(module.weight.shape) == enc.shape,
                f"encoded: {name!r} has shape {list(enc.shape)}, the model's weight {list(module.weight.shape)}")
    require(not any(torch.nn.utils.parametrize.is_parametrized(m) for m in model.modules()),
            "model: remove the parametrizations (QAT / KMeansSharing .remove()) before saving")
    state = model.state_dict()
    state = {k: v for k, v in state.items() if k not in _tied_keys(model, state)}
    tensors: dict[str, Tensor] = {}
    for key, value in state.items():
        module_name, _, param = key.rpartition(".")
        if param == "weight" and module_name in encoded:
            continue
        tensors[key] = value.detach().cpu().contiguous()
    for name, enc in encoded.items():
        try:
            packed = pack_encoded(enc)
        except ConfigError as exc:
            raise ConfigError(f"encoded.{name}: {exc}") from None
        tensors.update({f"{name}.{suffix}": value for suffix, value in packed.items()})
    config = copy.deepcopy(model.config)
    config.quantization_config = quantization_config(encoded)
    with atomic_dir(folder, overwrite=True) as tmp:
        config.save_pretrained(tmp)
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if card is not None:
            (tmp / CARD_FILE).write_text(json.dumps(card, indent=2, sort_keys=True, default=str) + "\n")
        _write_model_card(tmp, folder, model, encoded, card)
    return Path(folder)


def _write_model_card(tmp: Path, folder: str | os.PathLike, model: torch.nn.Module, encoded: dict[str, Encoded],
                      card: dict | None) -> None:
    """README.md + config.json provenance: the model's own provenance plus how its weights were encoded."""
    from raynas.compression.compress_run import describe_bits
    from raynas.model_card import provenance_of, with_step, write_card

    masked = [e for e in encoded.values() if e.mask is not None]
    entry = {"method": (card or {}).get("method"), "encoding": describe_bits(encoded), "matrices": len(encoded),
             "sparsity": (1.0 - sum(int(e.mask.sum()) for e in masked) / sum(e.mask.numel() for e in masked))
             if masked else None,
             "weights_bytes": (tmp / WEIGHTS_FILE).stat().st_size}
    write_card(tmp, folder, model, with_step(provenance_of(model), "quantization", entry), model.config.model_type,
               quantized=True)


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    require(path.is_file() and (folder / WEIGHTS_FILE).is_file(),
            f"{folder}: not a saved model folder (needs config.json and {WEIGHTS_FILE})")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    require(isinstance(config, dict), f"{path}: expected a JSON object")
    return config


def load_encoded(folder: str | os.PathLike) -> dict[str, Encoded]:
    """The encoded matrices stored in a :func:`save_compressed` folder, by module name (reads the file directly)."""
    from safetensors import safe_open

    folder = Path(folder)
    config = _read_config(folder)
    require("quantization_config" in config, f"{folder}: config.json has no quantization_config (not compressed)")
    weights = check_quantization_config(config["quantization_config"])
    out: dict[str, Encoded] = {}
    with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as f:
        keys = set(f.keys())
        for name, spec in weights.items():
            missing = [s for s in stored_suffixes(spec) if f"{name}.{s}" not in keys]
            require(not missing, f"{folder / WEIGHTS_FILE}: {name} lacks {', '.join(missing)}")
            out[name] = unpack_encoded(spec, {s: f.get_tensor(f"{name}.{s}") for s in stored_suffixes(spec)})
    return out


def bytes_on_disk(folder: str | os.PathLike) -> int:
    """The size of the folder's ``model.safetensors`` in bytes (what a compression ratio is quoted from)."""
    path = Path(folder) / WEIGHTS_FILE
    require(path.is_file(), f"{folder}: no {WEIGHTS_FILE}")
    return path.stat().st_size
