"""Latency measurement and the family report, on tiny models: values and files, never timings compared."""

from __future__ import annotations

import math
import sys

import pandas as pd
import pytest
import torch
from conftest import tiny_supernet
from transformers import BertConfig, BertForMaskedLM, BertModel

from raynas.errors import ConfigError
from raynas.evaluation.latency import compare_latency, measure_latency
from raynas.evaluation.report import family_report, load_report

FAST = {"seq_len": 16, "warmup": 1, "repeats": 3}
LATENCY_KEYS = {"latency_ms", "latency_p90_ms", "latency_min_ms", "params", "seq_len", "batch_size", "threads"}


def tiny_bert(seed: int = 0, layers: int = 2) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    return BertModel(config)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _check_measurement(row: dict, params: int, threads: int) -> None:
    assert LATENCY_KEYS <= set(row)
    assert row["latency_ms"] > 0 and row["latency_min_ms"] > 0 and row["latency_p90_ms"] > 0
    assert row["latency_min_ms"] <= row["latency_ms"] <= row["latency_p90_ms"]
    assert row["params"] == params
    assert (row["seq_len"], row["batch_size"], row["threads"]) == (16, 1, threads)


def test_measure_latency_in_memory_restores_mode_and_threads():
    model = tiny_bert().train()
    before = torch.get_num_threads()
    row = measure_latency(model, threads=1, **FAST)
    _check_measurement(row, n_params(model), threads=1)
    assert model.training and torch.get_num_threads() == before


def test_measure_latency_counts_the_base_model_of_a_model_with_a_head():
    torch.manual_seed(0)
    mlm = BertForMaskedLM(tiny_bert().config)
    row = measure_latency(mlm, **FAST)
    assert row["params"] == n_params(mlm.bert)  # no pooler in BertForMaskedLM, no MLM head counted


def test_measure_latency_of_saved_folders(tmp_path):
    model = tiny_bert()
    model.save_pretrained(tmp_path / "bert")
    _check_measurement(measure_latency(tmp_path / "bert", threads=1, **FAST), n_params(model), threads=1)
    net = tiny_supernet("kd")  # d_qkv != d_m: exported as model_type raynas
    arch = net.set_active("2-40-64-4-32")
    net.extract().save_pretrained(tmp_path / "raynas")
    row = measure_latency(str(tmp_path / "raynas"), threads=1, **FAST)
    _check_measurement(row, net.space.params(arch, "base"), threads=1)


def test_measure_latency_rejects_bad_settings(tmp_path):
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        measure_latency(tiny_bert(), seq_len=65)
    with pytest.raises(ConfigError, match="repeats"):
        measure_latency(tiny_bert(), repeats=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="config.json"):
        measure_latency(tmp_path / "empty")


def test_compare_latency_speedup_and_keys(tmp_path):
    paths = []
    for i, layers in enumerate((2, 1, 3)):
        tiny_bert(i, layers).save_pretrained(tmp_path / f"m{i}")
        paths.append(str(tmp_path / f"m{i}"))
    rows = compare_latency(paths[1:], reference=paths[0], **FAST)
    assert [r["model"] for r in rows] == [paths[0], *paths[1:]]  # a reference not listed comes first
    for row in rows:
        assert LATENCY_KEYS | {"model", "speedup"} <= set(row)
        assert row["speedup"] > 0 and row["latency_ms"] > 0
    assert rows[0]["speedup"] == 1.0
    assert rows[1]["speedup"] == rows[0]["latency_ms"] / rows[1]["latency_ms"]

    listed = compare_latency(paths, reference=paths[1], **FAST)
    assert [r["model"] for r in listed] == paths  # a listed reference keeps its place
    assert listed[1]["speedup"] == 1.0
    assert [r["params"] for r in listed] == [n_params(tiny_bert(i, n)) for i, n in enumerate((2, 1, 3))]
    with pytest.raises(ConfigError, match="twice"):
        compare_latency([paths[0], paths[0]], reference=paths[0], **FAST)


ROWS = [
    {"model": "teacher", "params": 22_700_000, "latency_ms": 40.0, "speedup": 1.0,
     "cola": 40.0, "sst2": 91.0, "qnli": 88.0},
    {"model": "small", "params": 11_300_000, "latency_ms": 20.0, "speedup": 2.0,
     "CoLA": 30.0, "SST-2": 89.0, "qnli": 86.0},
    {"model": "tiny", "params": 4_400_000, "latency_ms": 8.0, "speedup": 5.0, "sst2": 85.0, "qnli": None},
]


def test_family_report_files_and_values(tmp_path):
    paths = family_report(ROWS, tmp_path / "out", title="Tiny family", reference="teacher")
    assert set(paths) == {"parquet", "markdown", "plot"} and all(p.is_file() for p in paths.values())
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    df = load_report(tmp_path / "out")
    assert list(df.columns) == ["model", "params", "latency_ms", "speedup", "cola", "sst2", "qnli",
                                "glue_avg", "glue_avg_no_cola"]
    assert str(df["model"].dtype) in ("object", "str", "string")
    assert df["params"].dtype == "int64"
    assert all(df[c].dtype == "float64" for c in df.columns[2:])
    assert df["params"].tolist() == [22_700_000, 11_300_000, 4_400_000]
    by = df.set_index("model")
    assert by.loc["teacher", "glue_avg"] == pytest.approx((40.0 + 91.0 + 88.0) / 3)
    assert by.loc["teacher", "glue_avg_no_cola"] == pytest.approx((91.0 + 88.0) / 2)
    assert by.loc["small", "glue_avg"] == pytest.approx((30.0 + 89.0 + 86.0) / 3)
    assert by.loc["small", "glue_avg_no_cola"] == pytest.approx((89.0 + 86.0) / 2)
    assert math.isnan(by.loc["tiny", "cola"]) and math.isnan(by.loc["tiny", "qnli"])
    assert math.isnan(by.loc["tiny", "glue_avg"]) and math.isnan(by.loc["tiny", "glue_avg_no_cola"])
    assert load_report(paths["parquet"]).equals(df)

    md = paths["markdown"].read_text()
    assert md.startswith("# Tiny family")
    for name in ("teacher (ref)", "small", "tiny"):
        assert name in md
    assert "GLUE avg over cola, sst2, qnli; without CoLA over sst2, qnli" in md
    assert "| small | 11.3 | 20.0 | 2.00x | 30.0 | 89.0 | 86.0 | 68.3 | 87.5 |" in md
    assert "| tiny | 4.4 | 8.0 | 5.00x | - | 85.0 | - | - | - |" in md


def test_family_report_single_task_squad_and_derived_speedup(tmp_path):
    rows = [{"model": "ref", "params": 10, "latency_ms": 30.0, "squad": 88.5},
            {"model": "m", "params": 5, "latency_ms": 10.0, "squad": 80.0}]
    paths = family_report(rows, tmp_path, title="SQuAD", reference="ref")
    df = pd.read_parquet(paths["parquet"])
    assert list(df.columns) == ["model", "params", "latency_ms", "speedup", "squad", "glue_avg", "glue_avg_no_cola"]
    assert df["speedup"].tolist() == [1.0, 3.0]
    assert df["glue_avg"].isna().all() and df["glue_avg_no_cola"].isna().all()
    assert "GLUE avg: no GLUE task in this report" in paths["markdown"].read_text()


def test_family_report_rejects_bad_rows(tmp_path):
    with pytest.raises(ConfigError, match="not one of the models"):
        family_report(ROWS, tmp_path, title="t", reference="nobody")
    with pytest.raises(ConfigError, match="percent"):
        family_report([{"model": "a", "params": 1, "latency_ms": 1.0, "sst2": 0.91}], tmp_path, title="t",
                      reference=None)
    with pytest.raises(ConfigError, match="neither a report column nor a task"):
        family_report([{"model": "a", "params": 1, "latency_ms": 1.0, "sst": 91.0}], tmp_path, title="t",
                      reference=None)
    assert not (tmp_path / "report.parquet").exists()


def test_family_report_without_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(ConfigError, match=r"pip install raynas\[report\]"):
        family_report(ROWS, tmp_path, title="t", reference="teacher")
    assert list(tmp_path.iterdir()) == []
