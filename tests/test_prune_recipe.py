"""raynas prune end to end on Ray Tune (tiny BERT, synthetic SST-2): a family of targets, Parquet rows, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from test_finetune import _bert_dir, _write_sst2

from raynas.cli import main
from raynas.compression.prune_run import source_config
from raynas.compression.targets import LatencyModel
from raynas.evaluation.finetune import FinetuneConfig, finetune


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prune-recipe")
    data = _write_sst2(root / "glue", train=96, dev=32)
    base = _bert_dir(root / "base", hidden=32, layers=2)
    finetune(FinetuneConfig(task="sst2", model=str(base), data_dir=str(data), lr=2e-3, epochs=1, batch_size=16,
                            max_seq_len=32, seed=0, output_dir=str(root / "ft")))
    return {"root": root, "data": data, "base": base, "model": root / "ft"}


def _config(setup: dict[str, Path], out: Path, **extra) -> Path:
    cfg = {"task": "sst2", "model": str(setup["model"]), "data_dir": str(setup["data"]), "out": str(out),
           "targets": [{"kind": "params", "target": 0.4}, {"kind": "speedup", "target": 1.3}],
           "train": {"lr": 1e-3, "epochs": 1, "batch_size": 16, "max_seq_len": 32},
           "latency": {"seq_len": 32, "repeats": 3, "fit_samples": 8, "fit_repeats": 2, "min_r2": -1e9}, **extra}
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.ray
def test_a_family_of_targets_runs_as_tune_trials_and_a_rerun_skips_them(setup, tmp_path, capsys, monkeypatch):
    import ray

    monkeypatch.chdir(setup["root"])  # a model path relative to the working directory reaches the trials
    setup = {**setup, "model": Path("ft")}

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        out = tmp_path / "run"
        assert main(["prune", "--config", str(_config(setup, out))]) == 0
        rows = pd.read_parquet(out / "trials.parquet")
        assert sorted(rows["name"]) == ["params-0.4", "speedup-1.3x"]
        assert (rows["status"] == "ok").all() and (rows["max_abs_diff"] <= 1e-5).all()
        params = rows[rows["kind"] == "params"]
        assert ((params["params_sparsity"] - 0.4).abs() <= 0.02).all()
        speed = rows[rows["kind"] == "speedup"]
        # the projection's guarantee: never slower than asked, short of it by at most one unit (or block) step of
        # the fitted cost model; on this tiny model latency is mostly per-block, so steps are coarse
        lat = LatencyModel(**json.loads((out / "stages.json").read_text())["latency"]["summary"])
        cost = lat.cost_model(source_config(str(setup["root"] / "ft")))
        step = max(c.slope + c.on for c in cost.layers.values()) / cost.full
        asked = speed["target_fraction"]
        assert (speed["achieved_fraction"] <= asked + 1e-9).all()
        assert (asked - speed["achieved_fraction"] <= step + 1e-9).all()
        assert rows["latency_ms"].gt(0).all() and rows["speedup"].gt(0).all()
        assert (rows["accuracy"] == rows["score"]).all()  # SST-2's dev metric in its own column
        assert rows["speedup_same_format"].gt(0).all() and (out / "unpruned-raynas" / "config.json").is_file()
        assert all(len(h) == 2 for h in rows["heads"]) and all(len(f) == 2 for f in rows["ffn"])
        for name in ("pruning.md", "report.md", "report.parquet", "score_vs_speedup.png", "latency_fit.parquet"):
            assert (out / name).is_file(), name
        stamps = {p: p.stat().st_mtime_ns for p in out.glob("jobs/*/prune.json")}
        capsys.readouterr()
        assert main(["prune", "--config", str(_config(setup, out))]) == 0
        err = capsys.readouterr().err
        assert "2 job(s), 2 finished earlier, 0 to run" in err
        assert {p: p.stat().st_mtime_ns for p in out.glob("jobs/*/prune.json")} == stamps
    finally:
        ray.shutdown()


@pytest.mark.parametrize("change,needle", [
    ({"targets": [{"kind": "params", "target": 1.2}]}, "targets[0].target: a params sparsity must be in (0, 1)"),
    ({"targets": [{"kind": "speedup", "target": 0.5}]}, "targets[0].target: a speedup must be > 1"),
    ({"targets": [{"kind": "size", "target": 0.5}]}, "targets[0].kind"),
    ({"model": "BASE"}, "no SequenceClassification head"),
    ({"data_dir": "MISSING"}, "no such file"),
    ({"train": {"lr": -1}}, "lr: expected a positive learning rate"),
    ({"baselines": ["random"]}, "baselines: unknown baseline"),
])
def test_bad_input_is_one_line_and_exit_2_before_training(setup, tmp_path, capsys, change, needle):
    change = {k: (str(setup["base"]) if v == "BASE" else str(tmp_path / "nowhere") if v == "MISSING" else v)
              for k, v in change.items()}
    assert main(["prune", "--config", str(_config(setup, tmp_path / "run", **change))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "run" / "jobs").exists()


def test_a_poor_latency_fit_stops_the_run_before_any_trial(setup, tmp_path, capsys):
    latency = {"seq_len": 32, "repeats": 3, "fit_samples": 8, "fit_repeats": 2, "min_r2": 1.01}  # unreachable
    assert main(["prune", "--config", str(_config(setup, tmp_path / "run", latency=latency))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "latency.min_r2: the latency model explains the timings poorly" in err[-1]
    assert (tmp_path / "run" / "latency_fit.parquet").is_file() and not (tmp_path / "run" / "jobs").exists()
