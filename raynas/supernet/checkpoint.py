"""Supernet folders: ``supernet.json`` + ``model.safetensors`` (+ ``tokenizer/``).

Written to a temporary folder and renamed into place, so an interrupted save
never leaves a folder that looks complete. ``supernet.json`` may carry the
supernet's provenance (teacher, whether its MLM head was ever trained, training
runs; see :mod:`raynas.model_card`): a loaded supernet holds it as an attribute,
so the models extracted from it can say where they came from.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from raynas.atomic_io import atomic_dir
from raynas.errors import ConfigError
from raynas.model_card import PROVENANCE_KEY, provenance_of
from raynas.supernet.supernet import Supernet, SupernetConfig

FORMAT = "raynas-supernet"
VERSION = 1
CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_DIR = "supernet.json", "model.safetensors", "tokenizer"


def save_supernet(net: Supernet, path: str | os.PathLike, tokenizer: Any = None, overwrite: bool = True,
                  provenance: dict[str, Any] | None = None) -> Path:
    """Write ``net`` (and ``tokenizer``) to ``path``; ``provenance`` defaults to the one ``net`` carries."""
    provenance = provenance if provenance is not None else provenance_of(net)
    if provenance:  # "supernet" says which folder a loaded supernet came from: not part of a new folder's record
        provenance = {k: v for k, v in provenance.items() if k != "supernet"}
    with atomic_dir(path, overwrite) as tmp:
        meta = {"format": FORMAT, "version": VERSION, "config": net.config.to_dict(),
                "active_arch": str(net.active_arch), **({"provenance": provenance} if provenance else {})}
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        save_file({k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}, str(tmp / WEIGHTS_FILE),
                  metadata={"format": FORMAT})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / TOKENIZER_DIR)
    return Path(path)


def load_supernet(path: str | os.PathLike) -> Supernet:
    """The supernet saved at ``path``; ConfigError naming the file if anything is off."""
    root = Path(path)
    meta_file, weights_file = root / CONFIG_FILE, root / WEIGHTS_FILE
    if not meta_file.is_file():
        raise ConfigError(f"{root}: not a supernet folder (no {CONFIG_FILE})")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{meta_file}: unreadable ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("config"), dict):
        raise ConfigError(f"{meta_file}: not a {FORMAT} file")
    if meta.get("version") != VERSION:
        raise ConfigError(f"{meta_file}: format version {meta.get('version')!r}, this raynas reads {VERSION}")
    try:
        config = SupernetConfig(**meta["config"])
    except TypeError as exc:
        raise ConfigError(f"{meta_file}: config: {exc}") from None
    net = Supernet(config)
    try:
        state = load_file(str(weights_file))
    except (OSError, SafetensorError) as exc:
        raise ConfigError(f"{weights_file}: cannot read weights ({exc})") from None
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[:3]
        raise ConfigError(f"{weights_file}: does not match {meta_file}: {' '.join(first)}") from None
    if meta.get("active_arch"):
        net.set_active(meta["active_arch"])
    recorded = meta.get("provenance") if isinstance(meta.get("provenance"), dict) else {}
    setattr(net, PROVENANCE_KEY, {**recorded, "supernet": str(root.resolve())})  # what extracted models cite
    return net.eval()


def load_supernet_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer saved with the supernet, or None."""
    folder = Path(path) / TOKENIZER_DIR
    if not folder.is_dir():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)
