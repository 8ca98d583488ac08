"""raynas quantize end to end (tiny BERT, synthetic SST-2): variants as Tune trials, packed folders that reload to the
same predictions in another process, the table with bytes / latency / score, resume, and one-line bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from test_finetune import _bert_dir, _write_sst2

from raynas.cli import main
from raynas.compression.compress_run import CompressJob, run_compress_job
from raynas.evaluation.finetune import FinetuneConfig, finetune

TRAIN = {"lr": 1e-3, "max_steps": 6, "batch_size": 16, "max_seq_len": 32, "kd_alpha": 0.5}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quantize-recipe")
    data = _write_sst2(root / "glue", train=96, dev=32)
    base = _bert_dir(root / "base", hidden=32, layers=2)
    finetune(FinetuneConfig(task="sst2", model=str(base), data_dir=str(data), lr=2e-3, epochs=1, batch_size=16,
                            max_seq_len=32, seed=0, output_dir=str(root / "ft")))
    return {"root": root, "data": data, "base": base, "model": root / "ft"}


def _config(setup: dict[str, Path], out: Path, variants: list[dict], **extra) -> Path:
    cfg = {"task": "sst2", "model": str(setup["model"]), "data_dir": str(setup["data"]), "out": str(out),
           "variants": variants, "train": TRAIN, "latency": {"seq_len": 32, "repeats": 3}, **extra}
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _job(setup: dict[str, Path], tmp_path: Path, method: str, settings: dict, model: Path | None = None) -> dict:
    job = CompressJob(method, "sst2", str(model or setup["model"]), str(tmp_path / method), method, settings,
                      {**TRAIN, "data_dir": str(setup["data"])}, str(setup["model"]))
    return run_compress_job(job)


@pytest.mark.parametrize("method,settings,bits,runtime", [
    ("int8", {}, "int8", "ort_int8"),
    ("qat", {"bits": 4}, "int4", "torch_fp32"),
    ("kmeans", {"bits": 3}, "kmeans3", "torch_fp32"),
])
def test_a_job_saves_a_packed_folder_that_reloads_to_what_was_in_memory(setup, tmp_path, method, settings, bits,
                                                                        runtime):
    record = _job(setup, tmp_path, method, settings)
    assert record["bits"] == bits and record["runtime"] == runtime
    assert record["max_abs_diff"] <= 1e-5  # the reloaded folder computes what the compressed model in memory did
    fp32 = (setup["model"] / "model.safetensors").stat().st_size
    assert record["bytes_on_disk"] < fp32  # the file realises the size, whatever the method
    assert (tmp_path / method / "dev_outputs.npy").is_file() and 0.0 <= record["score"] <= 1.0


def test_pruned_then_kmeans_keeps_the_zeros_and_stores_them_as_a_mask(setup, tmp_path):
    pruned = _job(setup, tmp_path, "sparsify", {"sparsity": 0.5, "end_fraction": 0.5, "frequency": 1})
    assert abs(pruned["sparsity"] - 0.5) <= 0.02 and pruned["bits"] == "fp32+mask"
    chained = _job(setup, tmp_path, "kmeans", {"bits": 4}, model=Path(pruned["path"]))
    assert chained["bits"] == "kmeans4+mask" and abs(chained["sparsity"] - pruned["sparsity"]) <= 1e-6
    assert chained["bytes_on_disk"] < pruned["bytes_on_disk"]


@pytest.mark.ray
def test_variants_run_as_tune_trials_in_waves_and_a_rerun_skips_them(setup, tmp_path, capsys, monkeypatch):
    import ray

    monkeypatch.chdir(setup["root"])  # relative paths reach the trials
    setup = {**setup, "model": Path("ft")}
    variants = [{"name": "int8", "method": "int8"},
                {"name": "k2", "method": "kmeans", "settings": {"bits": 2}},
                {"name": "sparse", "method": "sparsify", "settings": {"sparsity": 0.5, "frequency": 1}},
                {"name": "sparse-k4", "method": "kmeans", "source": "sparse", "settings": {"bits": 4}}]
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        out = tmp_path / "run"
        assert main(["quantize", "--config", str(_config(setup, out, variants, backends=["torch_fp32", "ort_int8"]))]) == 0
        rows = pd.read_parquet(out / "compression.parquet")
        assert list(rows["name"]) == ["fp32", "int8", "k2", "sparse", "sparse-k4"]
        assert (rows["status"] == "ok").all() and rows["latency_ms"].gt(0).all()
        variants_rows = rows[rows["kind"] == "variant"]
        assert (variants_rows["reload_agreement"] == 1.0).all()  # a fresh process predicts what the job did
        assert (variants_rows["size_ratio"] < 1).all()
        backends = pd.read_parquet(out / "int8_backends.parquet")
        assert list(backends["backend"]) == ["torch_fp32", "ort_int8"] and backends["speedup"].gt(0).all()
        for name in ("compression.md", "compression.png"):
            assert (out / name).is_file(), name
        stamps = {p: p.stat().st_mtime_ns for p in out.glob("jobs/*/compress.json")}
        capsys.readouterr()
        assert main(["quantize", "--config", str(_config(setup, out, variants, backends=["torch_fp32"]))]) == 0
        assert "4 variant(s) in 2 wave(s), 4 finished earlier" in capsys.readouterr().err
        assert {p: p.stat().st_mtime_ns for p in out.glob("jobs/*/compress.json")} == stamps
        changed = [*variants[:1], {**variants[1], "settings": {"bits": 3}}, *variants[2:]]
        assert main(["quantize", "--config", str(_config(setup, out, changed))]) == 2
        assert "k2 finished" in capsys.readouterr().err
    finally:
        ray.shutdown()


@pytest.mark.parametrize("variant,needle", [
    ({"name": "q", "method": "qat", "settings": {"bits": 5}}, "bits"),
    ({"name": "k", "method": "kmeans", "settings": {"bits": 12}}, "bits"),
    ({"name": "s", "method": "sparsify", "settings": {"sparsity": 1.0}}, "sparsity"),
    ({"name": "s", "method": "sparsify", "settings": {"sparsity": 0.5, "block": "5x5"}}, "block"),
    ({"name": "m", "method": "mixed", "settings": {"size_fraction": 1.5}}, "size_fraction"),
    ({"name": "m", "method": "mixed", "settings": {"size_fraction": 0.001}}, "narrowest candidate width"),
    ({"name": "q", "method": "qat", "settings": {"bitz": 4}}, "unknown field(s) bitz"),
    ({"name": "x", "method": "prune"}, "method"),
    ({"name": "c", "method": "kmeans", "source": "nowhere"}, "source"),
])
def test_bad_variants_are_one_line_and_exit_2(setup, tmp_path, capsys, variant, needle):
    out = tmp_path / "bad"
    assert main(["quantize", "--config", str(_config(setup, out, [variant]))]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err
    assert not (out / "jobs").exists()


def test_a_folder_that_is_not_a_model_is_one_line_and_exit_2(setup, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    cfg = _config({**setup, "model": tmp_path / "empty"}, tmp_path / "bad", [{"name": "i", "method": "int8"}])
    assert main(["quantize", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a model folder" in err


def test_the_recorded_job_is_what_ran(setup, tmp_path):
    record = _job(setup, tmp_path, "int8", {})
    saved = json.loads((tmp_path / "int8" / "compress.json").read_text())
    assert saved["job"]["method"] == "int8" and saved["path"] == record["path"]


@pytest.mark.parametrize("method,settings", [("kmeans", {"bits": 3}),
                                             ("sparsify", {"sparsity": 0.6, "end_fraction": 0.8, "frequency": 1})])
def test_a_variant_killed_after_a_checkpoint_resumes_exactly(setup, tmp_path, monkeypatch, method, settings):
    """The codebooks (model state) and the masks (hooks state) come back from the checkpoint: the resumed job saves
    the same bytes as one that was never interrupted."""
    from safetensors.torch import load_file

    from raynas.evaluation.finetune_state import FAULT_ENV

    train = {**TRAIN, "data_dir": str(setup["data"]), "checkpoint_every": 2}

    def job(folder: str) -> CompressJob:
        return CompressJob(method, "sst2", str(setup["model"]), str(tmp_path / folder), method, settings, train,
                           str(setup["model"]))

    whole = run_compress_job(job("whole"))
    monkeypatch.setenv(FAULT_ENV, "4")
    with pytest.raises(RuntimeError, match="injected fault"):
        run_compress_job(job("cut"))
    assert (tmp_path / "cut" / "finetune-checkpoint.pt").is_file() and not (tmp_path / "cut" / "compress.json").exists()
    resumed = run_compress_job(job("cut"))
    assert resumed["score"] == whole["score"] and resumed["sparsity"] == whole["sparsity"]
    a = load_file(str(tmp_path / "whole" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
