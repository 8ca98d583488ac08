"""``raynas bench ranking``: the arch picker, the rank measures on known answers, bad input, and one real run.

The real run trains 3 tiny archs stand-alone for a few steps on a local Ray; it
checks the wiring (table, finite losses, accuracy in [0, 1], reuse on rerun,
refusal of other settings), not the accuracy value, which says nothing at
that budget.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import TINY, tiny_space, tiny_supernet, training_corpus

from raynas.benchmarks.ranking import PAPER_PAIRWISE_ACCURACY, RANKING_SCHEMA, format_summary, pick_archs, rank_rows
from raynas.cli import main as cli_main
from raynas.errors import ConfigError
from raynas.spaces import load_space
from raynas.supernet.checkpoint import save_supernet
from recipes import bench


def _setup(tmp: Path, tokenizer, **changes) -> tuple[Path, Path]:
    """``(supernet folder, config YAML)``: a seeded random tiny supernet (dropout 0) and the config it matches."""
    tokenizer.save_pretrained(tmp / "tok")
    supernet = save_supernet(tiny_supernet("mlm", seed=0, dropout=0.0), tmp / "supernet", tokenizer=tokenizer)
    name, space = TINY["mlm"]
    raw = {"out": str(tmp / "unused"), "space": name, "space_overrides": space, "tokenizer": str(tmp / "tok"),
           "corpus": {"files": [str(training_corpus(tmp))], "seq_len": 32, "validation_fraction": 0.1},
           "steps": 3, "batch_size": 4, "lr": 3e-3, "dropout": 0.0, "log_every": 1, "checkpoint_every": 3,
           "eval_batches": 1, "num_workers": 1, "deepspeed": {"enabled": False}, **changes}
    config = tmp / "ranking.yaml"
    config.write_text(yaml.safe_dump(raw))
    return supernet, config


# ---------------------------------------------------------------- arch picker


@pytest.mark.parametrize("kind", ["mlm", "layerwise"])
def test_pick_archs_spread_seeded_distinct_with_extremes(kind):
    space = tiny_space(kind)
    k = 8
    archs = pick_archs(space, k, seed=3)
    names = [space.format(a) for a in archs]
    assert len(names) == k and len(set(names)) == k
    assert names[0] == space.format(space.smallest()) and names[-1] == space.format(space.largest())
    sizes = [space.params(a, "encoder") for a in archs]
    assert sizes == sorted(sizes)
    step = (sizes[-1] - sizes[0]) / (k - 1)
    assert max(b - a for a, b in zip(sizes, sizes[1:])) <= 2 * step  # no size band left out
    assert [space.format(a) for a in pick_archs(space, k, seed=3)] == names  # seeded
    others = {tuple(space.format(a) for a in pick_archs(space, k, seed=s)) for s in range(4, 8)}
    assert len(others | {tuple(names)}) > 1  # another seed draws other archs between the extremes


def test_pick_archs_refuses_more_archs_than_the_space_has():
    name, raw = TINY["mlm"]
    small = load_space(name, {**raw, "layers": {"values": [1]}, "hidden": {"values": [32]},
                              "ffn": {"values": [16, 32]}, "heads": {"values": [1]}})
    assert len(pick_archs(small, 2)) == 2
    with pytest.raises(ConfigError, match="only 2 distinct archs"):
        pick_archs(small, 3)


# ---------------------------------------------------------------- metrics wiring


def _rows(proxy, alone):
    return [{"arch": f"a{i}", "params": 100 * (i + 1), "encoder_params": 10 * (i + 1), "proxy_loss": p,
             "standalone_loss": s, "train_loss": 0.0, "train_s": 0.0} for i, (p, s) in enumerate(zip(proxy, alone))]


def test_rank_rows_known_answers():
    rows, summary = rank_rows(_rows([1.0, 2.0, 3.0, 4.0], [1.5, 2.5, 4.5, 3.5]))  # one of 6 pairs swapped
    assert [r["proxy_rank"] for r in rows] == [1, 2, 3, 4]
    assert [r["standalone_rank"] for r in rows] == [1, 2, 4, 3]
    assert summary["pairs"] == 6 and summary["archs"] == 4
    assert summary["pairwise_accuracy"] == pytest.approx(5 / 6)
    assert summary["kendall_tau"] == pytest.approx(4 / 6)
    assert summary["paper_pairwise_accuracy"] == PAPER_PAIRWISE_ACCURACY == 0.967
    assert "0.833 over 6 pairs" in format_summary(summary) and "0.967" in format_summary(summary)

    _, reverse = rank_rows(_rows([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]))
    assert reverse["pairwise_accuracy"] == 0.0 and reverse["kendall_tau"] == pytest.approx(-1.0)

    tied, summary = rank_rows(_rows([1.0, 1.0, 2.0], [1.0, 2.0, 3.0]))  # a proxy tie counts half
    assert [r["proxy_rank"] for r in tied] == [1, 1, 3]
    assert summary["pairwise_accuracy"] == pytest.approx(2.5 / 3)


# ---------------------------------------------------------------- bad input: one line, exit 2, no Ray


def _fails(argv: list[str], capsys, needle: str) -> None:
    import ray

    assert cli_main(["bench", "ranking", *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not ray.is_initialized()


def test_bad_input_exits_2_before_ray(tmp_path, tokenizer, capsys):
    supernet, config = _setup(tmp_path, tokenizer)
    base = ["--supernet", str(supernet), "--config", str(config), "--out", str(tmp_path / "out")]
    _fails([*base[:1], str(tmp_path / "missing"), *base[2:]], capsys, "no such folder")
    _fails(["--supernet", str(tmp_path), *base[2:]], capsys, "not a supernet folder")
    _fails([*base, "--archs", "2"], capsys, "--archs: expected an integer >= 3")
    _fails([*base, "space_overrides.layers.max=2"], capsys, "differs from the supernet's")
    _fails([*base, f"model={supernet}", "space=null"], capsys, "needs the supernet's training config")
    _fails([*base, "--workers", "3"], capsys, "not a multiple of num_workers 3")
    _fails([*base, "objective.mode=kd", "objective.teacher=some-teacher"], capsys, "objective.project")
    _fails(["--supernet", str(supernet), "--config", str(tmp_path / "missing.yaml")], capsys, "missing.yaml")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- one real run


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.usefixtures("local_ray")
def test_ranking_end_to_end_reuses_and_refuses_other_settings(tmp_path, tokenizer, capsys):
    supernet, config = _setup(tmp_path, tokenizer)
    out = tmp_path / "out"
    argv = ["ranking", "--supernet", str(supernet), "--config", str(config), "--archs", "3", "--val-batches", "2",
            "--out", str(out)]
    assert bench.main(argv) == 0
    printed = capsys.readouterr()
    assert "pairwise ranking accuracy" in printed.out and "Kendall tau" in printed.out
    assert "[3/3]" in printed.err

    table = pq.read_table(out / "ranking.parquet")
    assert table.schema == RANKING_SCHEMA
    rows = table.to_pylist()
    assert len(rows) == 3 and len({r["arch"] for r in rows}) == 3
    for r in rows:
        assert math.isfinite(r["proxy_loss"]) and math.isfinite(r["standalone_loss"])
        assert math.isfinite(r["train_loss"]) and r["train_s"] > 0
        assert 1 <= r["proxy_rank"] <= 3 and 1 <= r["standalone_rank"] <= 3
        run = out / "standalone" / r["arch"]
        assert (run / "model" / "config.json").is_file() and (run / "ranking_run.json").is_file()
        assert not (run / "checkpoints").exists()  # only a resume needs them
    space = tiny_space("mlm")
    assert rows[0]["arch"] == space.format(space.smallest()) and rows[-1]["arch"] == space.format(space.largest())
    summary = json.loads((out / "ranking.json").read_text())
    assert 0.0 <= summary["pairwise_accuracy"] <= 1.0 and -1.0 <= summary["kendall_tau"] <= 1.0
    assert summary["steps"] == 3 and summary["archs"] == 3

    assert bench.main(argv) == 0  # a rerun reuses every finished run and scores the same
    again = capsys.readouterr()
    assert again.err.count("reusing the finished run") == 3
    assert pq.read_table(out / "ranking.parquet").to_pylist() == rows

    assert cli_main(["bench", *argv, "--steps", "5"]) == 2  # other settings into the same folder: refused
    assert "train.steps differ" in capsys.readouterr().err
