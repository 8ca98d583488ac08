"""Checkpoint layout checks that need no Ray: a run folder from before checkpoints were kept once is refused
with one line instead of silently restarting from step 0 (the runs themselves: test_supernet_training.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY, training_corpus

from raynas.config_loading import load_config
from raynas.errors import ConfigError
from raynas.orchestration.supernet_training import RAY_SNAPSHOT, TrainConfig, preflight


def _config(tmp: Path, tokenizer) -> TrainConfig:
    tokenizer.save_pretrained(tmp / "tok")
    name, space = TINY["mlm"]
    raw = {"out": str(tmp / "run"), "space": name, "space_overrides": space, "tokenizer": str(tmp / "tok"),
           "corpus": {"files": [str(training_corpus(tmp))], "seq_len": 32}}
    return load_config(TrainConfig, None, [], defaults=raw)


def test_old_layout_refused(tmp_path, tokenizer):
    cfg = _config(tmp_path, tokenizer)
    old = tmp_path / "run" / "ray_results" / cfg.name
    old.mkdir(parents=True)
    (old / RAY_SNAPSHOT).write_text(json.dumps({"checkpoint_results": []}))
    (tmp_path / "run" / "checkpoints" / "step-00000010").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"^out: .* older raynas .*cannot resume") as err:
        preflight(cfg)
    assert "\n" not in str(err.value)


def test_new_layout_accepted(tmp_path, tokenizer):
    """The current layout (Ray's snapshot in OUT/checkpoints) and a fresh out both pass."""
    cfg = _config(tmp_path, tokenizer)
    assert preflight(cfg)["out"] == str((tmp_path / "run").resolve())
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / RAY_SNAPSHOT).write_text("{}")
    (tmp_path / "run" / "ray_results" / cfg.name).mkdir(parents=True)
    (tmp_path / "run" / "ray_results" / cfg.name / RAY_SNAPSHOT).write_text("{}")
    preflight(cfg)
