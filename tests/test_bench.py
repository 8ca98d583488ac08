"""``raynas bench supernet`` on tiny spaces: it runs, writes the declared table, rejects bad options.

No timing assertions: step times on a shared CPU say nothing about correctness.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from raynas.cli import main as cli_main
from raynas.spaces import load_space
from recipes import bench

TINY_EMBEDDINGS = {"vocab_size": 100, "max_position_embeddings": 64, "type_vocab_size": 2}
COLUMNS = ["arch", "params", "supernet_ms", "extracted_ms", "ratio", "batch", "seq_len", "threads", "space"]


def _write(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def tiny_homogeneous(tmp_path: Path) -> Path:
    return _write(tmp_path / "tiny-mlm.yaml", {
        "kind": "homogeneous", "name": "tiny-mlm", "strategy": "heads", "head_dim": 16,
        "layers": {"min": 1, "max": 2}, "hidden": {"min": 32, "max": 64, "step": 4},
        "ffn": {"min": 16, "max": 128, "step": 4}, "heads": {"min": 1, "max": 4}, "embeddings": TINY_EMBEDDINGS,
    })


@pytest.fixture
def tiny_layerwise(tmp_path: Path) -> Path:
    return _write(tmp_path / "tiny-layerwise.yaml", {
        "kind": "layerwise", "name": "tiny-layerwise", "num_layers": 4, "hidden": {"values": [48]}, "head_dim": 16,
        "ops": {"mha": [16, 32], "ffn": [32, 64], "conv": {"kernels": [3], "inner": [16]}, "identity": True},
        "embeddings": TINY_EMBEDDINGS,
    })


def _run_and_check(space_file: Path, out: Path, archs: int) -> None:
    argv = ["supernet", "--space", str(space_file), "--archs", str(archs), "--batch", "2", "--seq-len", "16",
            "--repeats", "1", "--out", str(out)]
    assert bench.main(argv) == 0
    assert out.is_file()
    table = pq.read_table(out)
    assert table.schema.names == COLUMNS
    assert table.schema == bench.SUPERNET_SCHEMA
    rows = table.to_pylist()
    assert len(rows) == archs
    space = load_space(space_file)
    for row in rows:
        assert row["ratio"] > 0 and row["supernet_ms"] > 0 and row["extracted_ms"] > 0
        assert row["params"] == space.params(row["arch"], "mlm")
        assert (row["batch"], row["seq_len"], row["space"]) == (2, 16, space.name)
        assert row["threads"] >= 1


def test_bench_supernet_homogeneous(tiny_homogeneous: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _run_and_check(tiny_homogeneous, tmp_path / "out" / "supernet.parquet", archs=2)
    captured = capsys.readouterr()
    assert "median ratio (supernet / extracted):" in captured.out
    assert "over 2 archs" in captured.out
    assert captured.err.count("[1/2]") == 1 and captured.err.count("[2/2]") == 1


def test_bench_supernet_layerwise(tiny_layerwise: Path, tmp_path: Path) -> None:
    _run_and_check(tiny_layerwise, tmp_path / "layerwise.parquet", archs=2)


def test_bench_supernet_rejects_zero_archs(capsys: pytest.CaptureFixture) -> None:
    assert cli_main(["bench", "supernet", "--archs", "0"]) == 2
    err = capsys.readouterr().err
    assert "--archs" in err
    assert len(err.strip().splitlines()) == 1


def test_bench_supernet_rejects_missing_supernet_dir(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli_main(["bench", "supernet", "--supernet", str(tmp_path / "missing")]) == 2
    assert "--supernet" in capsys.readouterr().err


def test_bench_fitness_agrees_with_extraction_and_writes_its_table(tiny_layerwise: Path, tmp_path: Path):
    out = tmp_path / "fitness.parquet"
    argv = ["fitness", "--space", str(tiny_layerwise), "--archs", "5", "--batches", "2", "--batch", "2",
            "--seq-len", "16", "--out", str(out)]
    assert bench.main(argv) == 0
    table = pq.read_table(out)
    assert table.schema == bench.FITNESS_SCHEMA
    rows = table.to_pylist()
    space = load_space(tiny_layerwise)
    assert [r["arch"] for r in rows[:2]] == [space.format(space.largest()), space.format(space.smallest())]
    assert len(rows) == 5 and all(r["abs_diff"] < 1e-5 and r["shared_loss"] > 0 for r in rows)


def test_bench_fitness_rejects_too_long_sequences(tiny_homogeneous: Path, capsys):
    assert cli_main(["bench", "fitness", "--space", str(tiny_homogeneous), "--seq-len", "65"]) == 2
    assert "--seq-len 65" in capsys.readouterr().err
