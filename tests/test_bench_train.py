"""``raynas bench train`` on a tiny space: 4 runs (supernet / plain largest x 1 and 2 workers) on a local Ray.

No timing assertions beyond "positive": throughput on a shared CPU says nothing about correctness.
"""

from __future__ import annotations

import random
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import TINY, VOCAB

from raynas.benchmarks.train_throughput import TRAIN_SCHEMA
from raynas.cli import main as cli_main
from recipes import bench


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield
    ray.shutdown()


def _config(tmp: Path, tokenizer) -> Path:
    tokenizer.save_pretrained(tmp / "tok")
    rng = random.Random(0)
    words = [f"w{i}" for i in range(VOCAB - 5)]
    paras = [" ".join(words[s: s + 20] * 3) for s in (rng.randrange(len(words) - 20) for _ in range(200))]
    (tmp / "corpus.txt").write_text("\n\n".join(paras))
    name, space = TINY["mlm"]
    raw = {"out": str(tmp / "unused"), "space": name, "space_overrides": space, "tokenizer": str(tmp / "tok"),
           "corpus": {"files": [str(tmp / "corpus.txt")], "seq_len": 32, "validation_fraction": 0.1},
           "batch_size": 8, "lr": 3e-3, "log_every": 5, "dropout": 0.0, "num_workers": 2,
           "sampler": {"name": "batchwise", "per_worker": 2},
           "deepspeed": {"enabled": True, "zero_stage": 2, "precision": "fp32"}}
    path = tmp / "bench.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.slow  # four Ray Train runs (~2 min); the default suite keeps the fast checks of the recipe
@pytest.mark.ray
@pytest.mark.deepspeed
def test_bench_train_four_runs(tmp_path, tokenizer, local_ray, capsys):
    out = tmp_path / "bench"
    (out / "supernet-1w").mkdir(parents=True)
    (out / "supernet-1w" / "stale").write_text("an old run: must be removed, not resumed")
    code = bench.main(["train", "--config", str(_config(tmp_path, tokenizer)), "--steps", "4", "--workers", "2,1",
                       "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "tokens_per_s" in printed and "ratio_vs_plain" in printed

    df = pd.read_parquet(out / "bench_train.parquet")
    assert list(df.columns) == TRAIN_SCHEMA.names
    assert list(zip(df["config"], df["workers"])) == [("supernet", 1), ("plain", 1), ("supernet", 2), ("plain", 2)]
    assert (df["tokens_per_s"] > 0).all() and (df["sequences_per_s"] > 0).all()
    assert list(df["passes_per_seq"]) == [2, 1, 2, 1]
    # batch-wise: each worker draws its own 2 archs (up to the odd repeat); the plain model is one model
    assert list(df["sub_models_per_step"][df["config"] == "plain"]) == [1.0, 1.0]
    assert 1.0 < df["sub_models_per_step"].iloc[2] <= 4.0
    sup, plain = df.iloc[0], df.iloc[1]
    assert sup["sequences_per_s"] == pytest.approx(sup["tokens_per_s"] / (2 * 32))
    assert sup["ratio_vs_plain"] == pytest.approx(sup["tokens_per_s"] / plain["tokens_per_s"])
    assert plain["ratio_vs_plain"] == 1.0 and sup["scaling"] == 1.0 and plain["scaling"] == 1.0
    assert df["mean_params"].iloc[0] <= plain["mean_params"]  # sampled sub-models are at most the largest
    assert set(df["largest"]) == {"3-64-128-4-64"} and set(df["engine"]) == {"deepspeed-zero2-fp32"}
    assert not (out / "supernet-1w" / "stale").exists()
    assert (out / "plain-2w" / "model" / "config.json").is_file()  # the plain run's trained model
    assert '"model_type": "bert"' in (out / "largest-model" / "config.json").read_text()


def test_bench_train_rejects_bad_input(tmp_path, tokenizer, capsys):
    cfg = str(_config(tmp_path, tokenizer))
    assert cli_main(["bench", "train", "--config", cfg, "--workers", "3"]) == 2
    assert "not a multiple of 3 workers" in capsys.readouterr().err
    assert cli_main(["bench", "train", "--config", cfg, "--workers", "1,x"]) == 2
    assert "--workers" in capsys.readouterr().err
    assert cli_main(["bench", "train", "--config", cfg, "--steps", "1"]) == 2
    assert cli_main(["bench", "train", "--config", cfg, "model=somewhere"]) == 2
    assert cli_main(["bench", "train", "--config", str(tmp_path / "missing.yaml")]) == 2
