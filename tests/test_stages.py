"""StageRun: finished stages are skipped, unfinished ones rerun, a changed config is refused with the field named."""

from __future__ import annotations

import json

import pytest

from raynas.errors import ConfigError
from raynas.stages import StageRun, config_diff


def test_finished_stage_is_skipped_and_returns_its_recorded_summary(tmp_path) -> None:
    calls: list[str] = []
    run = StageRun(tmp_path, ["a", "b"], log=lambda _: None)
    first = run.run("a", {"n": 1}, lambda: calls.append("a") or {"value": 3}, summary=lambda r: r)
    assert first == {"value": 3} and calls == ["a"]
    again = StageRun(tmp_path, ["a", "b"], log=lambda _: None)
    assert again.run("a", {"n": 1}, lambda: calls.append("a2") or {"value": 9}, summary=lambda r: r) == {"value": 3}
    assert calls == ["a"]  # not run again


def test_unfinished_stage_runs_again(tmp_path) -> None:
    run = StageRun(tmp_path, ["a"], log=lambda _: None)
    with pytest.raises(RuntimeError):
        run.run("a", {"n": 1}, lambda: (_ for _ in ()).throw(RuntimeError("killed")))
    record = json.loads((tmp_path / "stages.json").read_text())
    assert record["a"]["done"] is False
    again = StageRun(tmp_path, ["a"], log=lambda _: None)
    assert again.run("a", {"n": 1}, lambda: 5, summary=lambda r: r) == 5
    assert again.done("a")


def test_changed_config_is_refused_naming_the_field(tmp_path) -> None:
    run = StageRun(tmp_path, ["a", "b"], log=lambda _: None)
    run.run("a", {"search": {"population": 25}, "seed": 0}, lambda: None)
    again = StageRun(tmp_path, ["a", "b"], log=lambda _: None)
    with pytest.raises(ConfigError, match=r"search.population: 25 -> 30"):
        again.check({"a": {"search": {"population": 30}, "seed": 0}, "b": {}})
    again.check({"a": {"search": {"population": 25}, "seed": 0}, "b": {"x": 1}})  # b never ran: nothing to refuse


def test_config_diff_names_added_and_removed_fields() -> None:
    assert config_diff({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 3}, "d": 4}) == ["b.c: 2 -> 3", "d: '(unset)' -> 4"]
