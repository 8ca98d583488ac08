"""The one exception type that callers (and the CLI) treat as "bad input".

It subclasses ``ValueError`` so library users can catch the standard type; the
CLI maps it to exit code 2 with a one-line message instead of a traceback.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """Bad user input: an arch string, a space YAML, a config field or a file."""


def require(condition: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(message)
