"""Typed configs: YAML + dotted overrides, every bad field named in one error."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from raynas.config_loading import load_config
from raynas.errors import ConfigError


@dataclass
class Train:
    lr: float = 1e-5
    steps: int | None = None


@dataclass
class Recipe:
    models: list[str]
    train: Train = field(default_factory=Train)
    grid: dict[str, list[float]] = field(default_factory=dict)
    name: str = "x"


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("models: [a]\ntrain: {lr: 1e-4}\nname: base\n")  # YAML 1.1 reads 1e-4 as a string
    cfg = load_config(Recipe, path, ["train.steps=10", "grid.lr=[1e-5, 2.0e-5]", "models=[a, b]"])
    assert cfg == Recipe(models=["a", "b"], train=Train(lr=1e-4, steps=10), grid={"lr": [1e-5, 2e-5]}, name="base")


def test_every_bad_field_is_named_once(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("colour: red\ntrain: {lr: fast, steps: 1.5, extra: 1}\n")
    with pytest.raises(ConfigError) as info:
        load_config(Recipe, path)
    text = str(info.value)
    for needle in (str(path), "colour: unknown key", "models: missing", "train.lr: expected float",
                   "train.steps: expected int or null", "train.extra: unknown key"):
        assert needle in text


@pytest.mark.parametrize("content, needle", [("a: [1, 2\n", "not valid YAML"), ("- 1\n", "mapping")])
def test_malformed_yaml(tmp_path, content, needle):
    path = tmp_path / "c.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=needle):
        load_config(Recipe, path)


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(Recipe, None, ["models"])
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(Recipe, tmp_path / "nope.yaml")


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[1].glob("recipes/configs/evaluate-*.yaml")))
def test_shipped_evaluate_configs_validate(path):
    from recipes.evaluate import EvaluateConfig

    cfg = load_config(EvaluateConfig, path)
    assert cfg.tasks and cfg.out
