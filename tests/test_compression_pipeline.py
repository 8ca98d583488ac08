"""raynas pipeline on a tiny setting: a family of pre-trained folders -> fine-tuning -> L0 pruning -> quantization,
and one Pareto table across every stage (tiny BERTs, synthetic SST-2, a local Ray)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml
from test_finetune import _bert_dir, _write_sst2

from raynas.cli import main
from raynas.orchestration.compression_pipeline import pareto_front

TRAIN = {"lr": 1e-3, "max_steps": 6, "batch_size": 16, "max_seq_len": 32}


def test_the_pareto_front_keeps_what_nothing_beats():
    rows = [{"bytes_on_disk": 10, "latency_ms": 10.0, "score": 0.9},   # the big accurate one
            {"bytes_on_disk": 2, "latency_ms": 5.0, "score": 0.8},     # small and fast
            {"bytes_on_disk": 3, "latency_ms": 6.0, "score": 0.7},     # beaten by the one above on everything
            {"bytes_on_disk": 2, "latency_ms": 5.0, "score": 0.8}]     # a tie is not beaten
    assert pareto_front(rows) == [True, True, False, True]


@pytest.mark.ray
def test_a_family_runs_through_every_stage_into_one_pareto_table(tmp_path, capsys):
    import ray

    data = _write_sst2(tmp_path / "glue", train=96, dev=32)
    teacher = _bert_dir(tmp_path / "teacher", hidden=32, layers=2, seed=0)
    small = _bert_dir(tmp_path / "small", hidden=16, layers=1, seed=1)
    cfg = {"task": "sst2", "teacher": str(teacher), "data_dir": str(data), "out": str(tmp_path / "run"),
           "family": {"models": {"small": str(small)}},
           "finetune": {"lr": 2e-3, "epochs": 1, "batch_size": 16, "max_seq_len": 32},
           "prune": {"models": ["teacher"], "targets": [{"kind": "params", "target": 0.4}], "train": TRAIN},
           "quantize": {"variants": [{"name": "int8", "method": "int8"},
                                     {"name": "k2", "method": "kmeans", "settings": {"bits": 2}}], "train": TRAIN},
           "latency": {"seq_len": 32, "repeats": 3}}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert main(["pipeline", "--config", str(path)]) == 0
        rows = pd.read_parquet(tmp_path / "run" / "pareto.parquet")
        assert list(rows["stage"]) == ["finetune", "finetune", "prune", "quantize", "quantize", "quantize",
                                       "quantize"]
        assert set(rows["name"]) >= {"teacher (fine-tuned)", "small (fine-tuned)", "teacher pruned params-0.4",
                                     "teacher-params-0.4 int8", "small k2"}
        assert rows["latency_ms"].gt(0).all() and rows["bytes_on_disk"].gt(0).all()
        assert rows["pareto"].any() and not rows["pareto"].all() or len(rows) == rows["pareto"].sum()
        pruned = rows[rows["stage"] == "prune"].iloc[0]
        teacher_row = rows[rows["name"] == "teacher (fine-tuned)"].iloc[0]
        assert pruned["params"] < teacher_row["params"]
        quantized = rows[rows["name"] == "small k2"].iloc[0]
        small_row = rows[rows["name"] == "small (fine-tuned)"].iloc[0]
        assert quantized["bytes_on_disk"] < small_row["bytes_on_disk"]
        assert (tmp_path / "run" / "pareto.md").is_file()
        capsys.readouterr()
        assert main(["pipeline", "--config", str(path)]) == 0  # every stage done: skipped, the table re-measured
        err = capsys.readouterr().err
        assert "family: done in an earlier run" in err and "finetune: done in an earlier run" in err
        assert "1 job(s), 1 finished earlier, 0 to run" in err
    finally:
        ray.shutdown()


def test_a_prune_section_naming_an_unknown_member_is_one_line(tmp_path, capsys):
    cfg = {"task": "sst2", "teacher": "x", "out": str(tmp_path / "run"), "family": {"models": {}},
           "prune": {"models": ["teacher"], "targets": [{"kind": "params", "target": 1.5}]}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["pipeline", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_family_run_without_a_family_table_is_one_line(tmp_path, capsys):
    (tmp_path / "notarun").mkdir()
    cfg = {"task": "sst2", "teacher": "x", "out": str(tmp_path / "run"),
           "family": {"run": str(tmp_path / "notarun"), "include_teacher": False}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["pipeline", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a family run" in err
    assert not Path(tmp_path / "run" / "finetuned").exists()
