"""raynas evaluate end to end on Ray Tune: a 4-trial sweep on 2 CPUs, Parquet tables and the report."""

from __future__ import annotations

import pandas as pd
import pytest
from test_finetune import _bert_dir, _write_sst2

from raynas.cli import main


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.ray
def test_sweep_lands_in_parquet_and_report_renders(tmp_path, ray_local, capsys):
    teacher = _bert_dir(tmp_path / "teacher", hidden=32, layers=2)
    student = _bert_dir(tmp_path / "student", hidden=16, layers=1, seed=1)
    data = _write_sst2(tmp_path / "glue", train=96, dev=32)
    out = tmp_path / "eval"
    argv = ["evaluate", "--models", str(student), str(teacher), "--tasks", "sst2", "--data-dir", str(data),
            "--reference", str(teacher), "--out", str(out), "search.lr=[1.0e-3, 3.0e-3]",
            "search.seed=[1, 2]", "fixed.epochs=1", "fixed.batch_size=16", "fixed.max_seq_len=32",
            "latency.repeats=2", "latency.seq_len=32", "cpus_per_trial=1"]
    code = main(argv)
    assert code == 0, capsys.readouterr().err[-3000:]
    trials = pd.read_parquet(out / "trials.parquet")
    assert len(trials) == 8 and set(trials["status"]) == {"ok"}  # 2 models x 2 lr x 2 seeds
    assert set(trials["device"]) == {"cpu"}  # gpus_per_trial 0: every trial ran on the cpu
    assert trials["score"].between(0, 1).all() and (trials["train_time_s"] > 0).all()
    assert sorted(set(trials["lr"])) == [1e-3, 3e-3]
    best = pd.read_parquet(out / "best.parquet")
    assert len(best) == 2
    for _, row in best.iterrows():
        same = trials[(trials["model"] == row["model"])]
        assert row["score"] == same["score"].max()
    report = pd.read_parquet(out / "report.parquet")
    assert len(report) == 2 and set(report["sst2"]) == {100 * s for s in best["score"]}
    assert report.loc[report["model"] == str(teacher), "speedup"].item() == 1.0
    assert (out / "report.md").is_file() and (out / "score_vs_speedup.png").read_bytes()[:4] == b"\x89PNG"

    # the same command again: Tune's experiment is restored, no trial runs again, every row once
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "8 trial(s) finished earlier, kept" in err, err[-3000:]
    again = pd.read_parquet(out / "trials.parquet")
    assert sorted(again["trial_id"]) == sorted(trials["trial_id"]) and again["trial_id"].is_unique
    kept = again.set_index("trial_id")["train_time_s"].sort_index()
    assert kept.equals(trials.set_index("trial_id")["train_time_s"].sort_index())  # the first run's rows

    # a changed grid for the same folder is refused, naming the key, before Ray runs anything
    assert main([*argv, "search.lr=[2.0e-3]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "search.lr" in err[0] and "different config" in err[0], err


@pytest.mark.parametrize("args, needle", [
    (["--tasks", "sst3"], "sst3"),
    (["--tasks", "qnli"], "QNLI"),
])
def test_bad_task_or_missing_file_exits_2_before_ray(tmp_path, capsys, args, needle):
    model = _bert_dir(tmp_path / "m")
    data = _write_sst2(tmp_path / "glue", train=8, dev=8)
    code = main(["evaluate", "--models", str(model), "--data-dir", str(data), "--out", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_wrong_column_layout_exits_2_naming_the_file(tmp_path, capsys):
    model = _bert_dir(tmp_path / "m")
    data = _write_sst2(tmp_path / "glue", train=8, dev=8)
    (data / "SST-2" / "dev.tsv").write_text("text\tpolarity\nfine movie\t1\n")
    code = main(["evaluate", "--models", str(model), "--tasks", "sst2", "--data-dir", str(data),
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "dev.tsv" in err and "Traceback" not in err


def test_unknown_config_key_exits_2(tmp_path, capsys):
    code = main(["evaluate", "--models", "m", "--tasks", "sst2", "serach.lr=[1]"])
    assert code == 2 and "serach: unknown key" in capsys.readouterr().err


def test_no_data_dir_and_no_hub_is_one_line_before_ray(tmp_path, capsys, monkeypatch):
    """Tasks from the hub with the hub unreachable: refused in the driver, not after every trial has failed."""
    from raynas import teachers

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(teachers, "hub_reachable", lambda timeout=3.0: False)
    model = _bert_dir(tmp_path / "m")
    capsys.readouterr()
    code = main(["evaluate", "--models", str(model), "--tasks", "sst2", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "data_dir: not given" in err[0], err
    assert not (tmp_path / "o").exists()
