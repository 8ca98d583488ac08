"""Latency dataset and predictor: stratified archs, the timed model is the exported one, resume, fit, save/load, Ray tasks."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import tiny_space, tiny_supernet

from raynas.config_loading import load_config
from raynas.errors import ConfigError
from raynas.evaluation.latency import load_encoder
from raynas.export import export_model
from raynas.search import latency_data as ld
from raynas.search.latency_data import ArchModels, LatencyConfig, build_latency_predictor, measure_archs, sample_archs
from raynas.search.predictor import LatencyPredictor, depth
from raynas.supernet import SupernetConfig

# tiny timings: what is tested is the bookkeeping, not the numbers
FAST = dict(seq_len=16, warmup=1, repeats=3, chunk=8, noise_archs=4)


def models_for(space) -> ArchModels:
    return ArchModels(SupernetConfig(space=space.to_dict()))


# ---- sampling ------------------------------------------------------------------------------------
def test_sample_archs_stratified_with_extremes_and_deterministic():
    space = tiny_space("mlm")
    archs = sample_archs(space, 48, seed=3)
    assert len(archs) == len(set(archs)) == 48
    assert archs[:2] == [str(space.smallest()), str(space.largest())]
    assert archs == sample_archs(space, 48, seed=3) and archs != sample_archs(space, 48, seed=4)
    by_depth = Counter(depth(space, a) for a in archs[2:])
    assert set(by_depth) == {2, 4, 6} and max(by_depth.values()) - min(by_depth.values()) <= 1
    # within each depth, every FLOPs quartile of that depth's archs holds a sampled arch
    pool = sample_archs(space, 600, seed=0)
    for d in (2, 4, 6):
        flops = sorted(space.flops(a) for a in pool if depth(space, a) == d)
        edges = [flops[len(flops) * q // 4] for q in range(1, 4)]
        quartiles = {sum(space.flops(a) >= e for e in edges) for a in archs if depth(space, a) == d}
        assert quartiles == {0, 1, 2, 3}, (d, quartiles)


def test_sample_archs_layerwise_space():
    space = tiny_space("layerwise")
    archs = sample_archs(space, 30, seed=0)
    assert len(set(archs)) == 30 and all(space.contains(a) for a in archs)
    assert str(space.smallest()) in archs and str(space.largest()) in archs
    assert len({depth(space, a) for a in archs}) >= 4  # shallow and deep chains, not only the typical depth


# ---- the timed model -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mlm", "kd", "layerwise"])
def test_built_model_has_the_exported_parameter_count(kind):
    space = tiny_space(kind)
    models = models_for(space)
    for arch in sample_archs(space, 6, seed=1):
        model = models.build(arch)
        assert sum(p.numel() for p in model.parameters()) == space.params(arch, "base"), arch


@pytest.mark.parametrize("arch", ["2-64-64-4-64", "2-48-64-2-32"])  # bert-expressible (qkv = hidden), raynas
def test_built_model_is_the_exported_model_structurally(tmp_path, arch):
    net = tiny_supernet("mlm")
    exported = export_model(net.extract(arch), tmp_path / "m")
    loaded = load_encoder(exported.path)
    built = models_for(net.space).build(arch, seed=5)
    assert type(built) is type(loaded)
    assert {k: v.shape for k, v in built.state_dict().items()} == {k: v.shape for k, v in loaded.state_dict().items()}
    assert built.config._attn_implementation == loaded.config._attn_implementation
    again = models_for(net.space).build(arch, seed=5)
    assert all(torch_equal(a, b) for a, b in zip(built.parameters(), again.parameters()))  # seeded


def torch_equal(a, b) -> bool:
    return bool((a == b).all())


# ---- dataset, resume, noise floor, reference -------------------------------------------------------------
def test_dataset_resume_keeps_rows_and_measures_only_missing(tmp_path):
    space = tiny_space("mlm")
    cfg = LatencyConfig(n_archs=12, holdout_fraction=0.25, reference="largest", **FAST)
    build_latency_predictor(space, tmp_path, config=cfg)
    table = pq.read_table(tmp_path / ld.DATA_FILE)
    assert table.schema.equals(ld.LATENCY_SCHEMA)
    rows = table.to_pylist()
    roles = Counter(r["role"] for r in rows)
    assert roles["sample"] == 12 and roles["remeasure"] == 3 and roles["reference"] == 3  # 2 + 1 chunks
    report = json.loads((tmp_path / ld.REPORT_FILE).read_text())
    assert report["noise"]["archs"] == 3 and report["noise"]["mape"] >= 0 and report["reference_ms"] > 0

    measured: list[str] = []

    def counting(jobs):  # the real runner, counting what it is asked to measure
        for job, new in ld.local_runner(jobs):
            measured.extend(job.archs)
            yield job, new

    build_latency_predictor(space, tmp_path, config=cfg, runner=counting)
    assert measured == [] and pq.read_table(tmp_path / ld.DATA_FILE).to_pylist() == rows

    # a kill after the first chunk: only that chunk's rows survive; the rerun measures the rest and keeps them
    first = [r for r in rows if r["chunk"] == 0]
    pq.write_table(pq.read_table(tmp_path / ld.DATA_FILE).slice(0, len(first)), tmp_path / ld.DATA_FILE)
    build_latency_predictor(space, tmp_path, config=cfg, runner=counting)
    after = pq.read_table(tmp_path / ld.DATA_FILE).to_pylist()
    assert after[: len(first)] == first
    assert sorted(measured) == sorted(r["arch"] for r in rows if r["chunk"] > 0 and r["role"] != "reference")
    assert Counter(r["role"] for r in after)["sample"] == 12

    with pytest.raises(ConfigError, match="seq_len"):  # other settings never mix into the same file
        build_latency_predictor(space, tmp_path, config=dataclasses.replace(cfg, seq_len=8))


def test_targets_normalized_by_the_reference_of_their_chunk():
    def row(arch, role, chunk, med, low):
        return {"arch": arch, "role": role, "chunk": chunk, "latency_ms": med, "latency_min_ms": low}

    # chunk 1 ran during a slow period: everything in it, the reference included, took twice as long
    rows = [row("r", "reference", 0, 10.0, 8.0), row("a", "sample", 0, 5.0, 4.0),
            row("r", "reference", 1, 20.0, 16.0), row("b", "sample", 1, 10.0, 8.0),
            row("r", "reference", 2, 10.0, 8.0)]
    target, ref_ms, n = ld.fit_targets(rows, LatencyConfig(reference="r"))
    assert (ref_ms, n) == (10.0, 3) and [target(r) for r in rows[1:4:2]] == [5.0, 5.0]
    target, ref_ms, _ = ld.fit_targets(rows, LatencyConfig(reference="r", statistic="min", normalize=False))
    assert ref_ms == 8.0 and [target(r) for r in rows[1:4:2]] == [4.0, 8.0]
    with pytest.raises(ConfigError, match="normalize"):
        ld.fit_targets([*rows, row("c", "sample", 7, 1.0, 1.0)], LatencyConfig(reference="r"))


# ---- the predictor ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def measured_40():
    space = tiny_space("mlm")
    archs = sample_archs(space, 40, seed=0)
    settings = LatencyConfig(**{k: v for k, v in FAST.items() if k != "noise_archs"}).settings()
    rows = measure_archs(space, archs, settings, chunk=10)
    return space, archs, [r["latency_ms"] for r in rows], settings


def test_predictor_fit_metrics_and_save_load_round_trip(tmp_path, measured_40):
    space, archs, ms, settings = measured_40
    pred = LatencyPredictor.fit(space, archs, ms, settings, reference="largest", reference_ms=max(ms))
    for kind in ("mlp", "flops-linear"):
        m = pred.candidates[kind]
        assert m["n_holdout"] == 8 and all(np.isfinite(m[k]) for k in ("mape", "rmse_ms", "kendall_tau"))
    assert pred.kind in ("mlp", "flops-linear") and pred.metrics["mape"] == pred.candidates[pred.kind]["mape"]
    assert len(pred.holdout_rows) == 8
    loaded = LatencyPredictor.load(pred.save(tmp_path / "p"))
    for kind in ("mlp", "flops-linear"):  # both stored models, not only the kept one
        pred.kind = loaded.kind = kind
        assert loaded.predict(archs) == pred.predict(archs)
    assert loaded.settings == settings and loaded.reference_ms == max(ms) and loaded.space_name == space.name
    assert loaded.candidates == pred.candidates


def test_flops_linear_fits_linear_data_exactly():
    space = tiny_space("layerwise")
    archs = sample_archs(space, 30, seed=2)
    truth = [0.7 * space.flops(a, 16) / 1e9 + 0.05 * depth(space, a) + 0.3 for a in archs]
    pred = LatencyPredictor.fit(space, archs, truth, {"seq_len": 16}, steps=50)
    assert pred.candidates["flops-linear"]["mape"] < 1e-6 and pred.kind == "flops-linear"
    assert np.allclose(pred.linear.coef, [0.7, 0.05, 0.3])


def test_predictor_bad_inputs(tmp_path, measured_40):
    space, archs, ms, settings = measured_40
    pred = LatencyPredictor.fit(space, archs, ms, settings, steps=50)
    with pytest.raises(ConfigError, match="9-64"):
        pred.predict(["9-64-64-4-64"])  # 9 layers: not in the space
    with pytest.raises(ConfigError, match=str(tmp_path / "missing")):
        LatencyPredictor.load(tmp_path / "missing")
    folder = pred.save(tmp_path / "p")
    (folder / "predictor.json").write_text("{not json")
    with pytest.raises(ConfigError, match="predictor.json"):
        LatencyPredictor.load(folder)
    pred.save(folder)
    (folder / "mlp.safetensors").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="mlp.safetensors"):
        LatencyPredictor.load(folder)


def test_config_and_recipe_bad_inputs(tmp_path):
    from recipes.latency import main

    with pytest.raises(ConfigError) as err:
        load_config(LatencyConfig, None, ["threads=0", "holdout_fraction=1.5", "device=tpu", "resources={CPU: 2}"])
    for field in ("threads", "holdout_fraction", "device", "resources.CPU"):
        assert field in str(err.value)
    with pytest.raises(ConfigError, match="no-such-space"):
        main(["--space", "no-such-space", "--out", str(tmp_path / "o")])
    with pytest.raises(ConfigError, match="nowhere"):
        main(["--supernet", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    with pytest.raises(ConfigError, match="reference"):
        main(["--space", "autotinybert-mlm", "--out", str(tmp_path / "o"), f"reference={tmp_path}/no-model"])
    assert not (tmp_path / "o").exists()  # refused before anything ran


# ---- Ray tasks ---------------------------------------------------------------------------------------------------
@pytest.mark.ray
@pytest.mark.usefixtures("local_ray")
def test_ray_runner_measures_the_same_rows(tmp_path, capsys):
    import ray

    from raynas.orchestration.latency_tasks import ray_runner
    from recipes.latency import main

    space = tiny_space("mlm")
    archs = sample_archs(space, 6, seed=0)
    settings = LatencyConfig(**FAST).settings()
    node = ray.get_runtime_context().get_node_id()
    runner = ray_runner(threads=1, concurrency=2, label_selector={"ray.io/node-id": node})
    rows = measure_archs(space, archs, settings, reference="largest", chunk=4, runner=runner)
    local = measure_archs(space, archs, settings, reference="largest", chunk=4)
    assert len(rows) == len(local) == 8
    assert sorted((r["arch"], r["role"], r["params"]) for r in rows) == sorted(
        (r["arch"], r["role"], r["params"]) for r in local)

    # the recipe end to end on Ray: a space YAML, overrides, the table
    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump(space.to_dict()))
    out = tmp_path / "out"
    assert main(["--space", str(space_file), "--out", str(out), "n_archs=10", "noise_archs=2", "seq_len=16",
                 "warmup=1", "repeats=2", "chunk=5"]) == 0
    printed = capsys.readouterr().out
    assert "flops-linear" in printed and "mlp" in printed and str(out / ld.PREDICTOR_DIR) in printed
    assert LatencyPredictor.load(out / ld.PREDICTOR_DIR).metrics["n_holdout"] == 2
    assert Path(out / ld.DATA_FILE).is_file()
