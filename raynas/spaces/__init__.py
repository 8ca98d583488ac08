"""Search spaces as data: YAML in, a :class:`Space` out.

``load_space("autotinybert-mlm")`` reads a shipped space; any other argument is
a path to a YAML file. Malformed YAML or fields give one :class:`ConfigError`
that names the file and every bad field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from raynas.config_loading import read_yaml
from raynas.errors import ConfigError
from raynas.spaces.base import Choice, EmbeddingShape, Space
from raynas.spaces.homogeneous import HomogeneousSpace, TinyArch
from raynas.spaces.layerwise import LayerwiseArch, LayerwiseSpace
from raynas.spaces.ops import FFN, MHA, Identity, OpSpec, SepConv, op_from_dict

BUILTIN_DIR = Path(__file__).parent / "builtin"
KINDS = {"homogeneous": HomogeneousSpace, "layerwise": LayerwiseSpace}

__all__ = [
    "Choice", "EmbeddingShape", "FFN", "HomogeneousSpace", "Identity", "LayerwiseArch", "LayerwiseSpace",
    "MHA", "OpSpec", "SepConv", "Space", "TinyArch", "builtin_spaces", "load_space", "op_from_dict", "space_from_dict",
]


def builtin_spaces() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def space_from_dict(raw: Any, where: str = "space") -> Space:
    """Build a space from its mapping (as read from YAML)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level, got {type(raw).__name__}")
    kind = raw.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"{where}: kind: expected one of {sorted(KINDS)}, got {kind!r}")
    return KINDS[kind].from_dict(raw, where)


def load_space(name_or_path: str | Path, overrides: dict[str, Any] | None = None) -> Space:
    """A shipped space by name, or a YAML file; ``overrides`` replace top-level keys."""
    text = str(name_or_path)
    path = BUILTIN_DIR / f"{text}.yaml" if text in builtin_spaces() else Path(text)
    if not path.is_file():
        raise ConfigError(f"space {text!r}: no such file, and not a shipped space ({', '.join(builtin_spaces())})")
    raw = read_yaml(path)
    if overrides:
        raw = {**raw, **overrides}
    return space_from_dict(raw, where=str(path))
