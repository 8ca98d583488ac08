"""Typed recipe configs: a dataclass filled from YAML plus dotted CLI overrides.

``load_config(SweepConfig, "recipes/configs/x.yaml", ["train.lr=1e-4"])`` reads
the file, applies ``key.sub=value`` overrides (values parsed as YAML scalars),
and checks every field against the dataclass's type hints. Unknown keys and bad
values are collected and raised as ONE :class:`ConfigError` naming each field,
so a user fixes a config in one pass instead of one error per run.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar, Union

import yaml

from raynas.errors import ConfigError

T = TypeVar("T")


class FieldErrors(ConfigError):
    """Raised by a config dataclass's ``__post_init__`` with one message per bad field (named relative to it).

    :func:`load_config` lists each with the field's dotted prefix, beside any type
    errors, in its one error; built in code, the dataclass raises it as one ConfigError.
    """

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__(_join(self.problems))


def _join(errors: Sequence[str]) -> str:
    return "; ".join(errors) if len(errors) == 1 else "\n  - " + "\n  - ".join(errors)


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such config file")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{p}: not valid YAML{at}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level, got {type(raw).__name__}")
    return raw


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``a.b=1`` sets ``raw["a"]["b"] = 1`` (value parsed as YAML: numbers, lists, null...)."""
    out = dict(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. train.lr=1e-4)")
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, dict) else {}
            node = node[part]
        node[parts[-1]] = value
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = (),
                defaults: dict[str, Any] | None = None) -> T:
    """An instance of dataclass ``cls`` from ``defaults`` < YAML file < overrides."""
    raw = dict(defaults or {})
    if path is not None:
        raw.update(read_yaml(path))
    raw = apply_overrides(raw, overrides)
    errors: list[str] = []
    value = _build(cls, raw, "", errors)
    if errors:
        raise ConfigError(_attributed(errors, path, overrides))
    return value


def _attributed(errors: Sequence[str], path: str | Path | None, overrides: Sequence[str]) -> str:
    """The errors, each named by where the bad value came from: the YAML file or the ``key=value`` that set it.

    A typo on the command line (``stesp=10``) must not send the user looking in a file they never changed.
    """
    setters = {item.partition("=")[0]: item for item in overrides}

    def source(error: str) -> str:
        name = error.split(":", 1)[0].strip()
        for key, item in setters.items():
            if name == key or name.startswith(key + ".") or key.startswith(name + "."):
                return f"command line {item!r}"
        return str(path) if path else ""

    sources = [source(e) for e in errors]
    if len(set(sources)) == 1:
        return (f"{sources[0]}: " if sources[0] else "") + _join(errors)
    return _join([f"{s}: {e}" if s else e for s, e in zip(sources, errors)])


def _build(cls: type, raw: Any, prefix: str, errors: list[str]) -> Any:
    if not isinstance(raw, dict):
        errors.append(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    before = len(errors)
    for key in sorted(set(raw) - set(fields)):
        close = difflib.get_close_matches(key, list(fields), n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"expected one of {sorted(fields)}"
        errors.append(f"{prefix}{key}: unknown key ({hint})")
    kwargs = {}
    for name, f in fields.items():
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                errors.append(f"{prefix}{name}: missing")
            continue
        kwargs[name] = _coerce(hints[name], raw[name], f"{prefix}{name}", errors)
    if len(errors) > before:
        return None
    try:
        return cls(**kwargs)
    except FieldErrors as exc:
        errors.extend(prefix + p for p in exc.problems)
        return None
    except (TypeError, ValueError) as exc:  # other __post_init__ checks
        errors.append(f"{prefix.rstrip('.') or 'config'}: {exc}")
        return None


def _coerce(hint: Any, value: Any, name: str, errors: list[str]) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options:
            trial: list[str] = []
            result = _coerce(option, value, name, trial)
            if not trial:
                return result
        errors.append(f"{name}: expected {_describe(hint)}, got {value!r}")
        return None
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{name}.", errors)
    if origin in (list, tuple):
        if not isinstance(value, list):
            errors.append(f"{name}: expected a list, got {value!r}")
            return None
        inner = args[0] if args else Any
        return [_coerce(inner, v, f"{name}[{i}]", errors) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            errors.append(f"{name}: expected a mapping, got {value!r}")
            return None
        inner = args[1] if len(args) == 2 else Any
        return {k: _coerce(inner, v, f"{name}.{k}", errors) for k, v in value.items()}
    if hint is Any:
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is bool and isinstance(value, bool):
        return value
    if hint is str and isinstance(value, (str, Path)):
        return str(value)
    if hint in (int, float, bool, str):
        errors.append(f"{name}: expected {hint.__name__}, got {value!r}")
        return None
    return value


def _describe(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return " or ".join(getattr(a, "__name__", str(a)) for a in args) + (" or null" if type(None) in typing.get_args(hint) else "")


def load_section(cls: type[T], raw: dict[str, Any], prefix: str) -> T:
    """``cls`` from a pipeline config's section ``raw``; every error is named ``prefix.field``."""
    try:
        return load_config(cls, None, defaults=raw)
    except ConfigError as exc:
        lines = [ln.strip()[2:] if ln.strip().startswith("- ") else ln.strip() for ln in str(exc).splitlines()
                 if ln.strip()]
        raise ConfigError("; ".join(f"{prefix}.{ln}" for ln in lines)) from None


def merge_dicts(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` merged into a deep copy of ``base``, nested mappings key by key; neither input is changed."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = merge_dicts(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else copy.deepcopy(value)
    return out
