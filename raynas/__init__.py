"""raynas: neural-architecture search and compression for BERT-family models.

``import raynas`` registers the ``raynas`` model type (and the ``raynas``
quantization method of packed folders) with transformers' Auto classes, so
exported models load with ``AutoModel.from_pretrained(path)``.

Why the registration is deferred: importing torch and transformers takes
seconds, and every ``raynas`` command (``--help`` included) imports this
package. So importing raynas imports neither. Registration needs transformers
anyway, so it runs the moment both are imported, in either order: at once if
transformers already is, else right after transformers' own import finishes (a
one-shot import hook, :class:`_RegisterAfterTransformers`). The public classes
below are loaded on first attribute access.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from typing import Any

import raynas._quiet  # noqa: F401  (first: before transformers is imported)
from raynas.errors import ConfigError

__version__ = "0.1.0"

_LAZY = {
    "RaynasConfig": "raynas.models", "RaynasForMaskedLM": "raynas.models",
    "RaynasForQuestionAnswering": "raynas.models", "RaynasForSequenceClassification": "raynas.models",
    "RaynasModel": "raynas.models", "load_space": "raynas.spaces",
}

__all__ = ["ConfigError", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'raynas' has no attribute {name!r}")


def _register() -> None:
    """Import :mod:`raynas.models`, whose import registers everything with transformers.

    Skipped while it is already being imported (it registers itself when it
    finishes); a failure is a warning, never a broken ``import transformers``.
    """
    if "raynas.models" in sys.modules:
        return
    try:
        importlib.import_module("raynas.models")
    except Exception as exc:  # noqa: BLE001  (the user's import must not fail because of ours)
        warnings.warn(f"raynas: could not register model_type 'raynas' with transformers: {exc}", stacklevel=2)


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder):
    """Finds ``transformers`` with the normal finders, then runs :func:`_register` after its module executes."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)  # one shot, and the lookup below must not find us again
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module: Any) -> None:
            exec_module(module)
            _register()

        spec.loader.exec_module = exec_then_register  # this spec's own loader instance only
        return spec


if "transformers" in sys.modules:
    _register()
elif not any(isinstance(f, _RegisterAfterTransformers) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTransformers())
