"""Search on Ray Tune: a real small run on a tiny supernet, resume after an interruption, the recipe's bad configs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import tiny_supernet, training_corpus

from raynas.benchmarks.proxy_fitness import mlm_batches
from raynas.cli import run_recipe
from raynas.search.config import SearchConfig
from raynas.search.constraints import Constraint
from raynas.search.evolution import EvolutionSearch
from raynas.search.results import CHOSEN_FILE, EVALUATED_FILE, EVALUATED_SCHEMA
from raynas.supernet.checkpoint import save_supernet
from raynas.training.validation import validation_losses

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]
CFG = {"generations": 2, "population": 6, "budgets": ["1.5x", "3x"], "constraint": "params", "archs_per_trial": 4}


@pytest.fixture
def supernet_dir(tmp_path, tokenizer) -> Path:
    return save_supernet(tiny_supernet("mlm"), tmp_path / "supernet", tokenizer=tokenizer)


# ---------------------------------------------------------------- bad configs: one line, exit 2, no Ray


@pytest.mark.parametrize(("extra", "message"), [
    (["--supernet", "{tmp}/nope"], "--supernet {tmp}/nope: no such folder"),
    (["--predictor", "{tmp}/nope"], "--predictor {tmp}/nope: no such folder"),
    (["constraint=params", "budgets=[2x, 1K]"], "budget 1K: below the smallest arch of the space (1-32-16-1-16: "),
    (["budgets=[2x]"], "constraint latency: needs a latency predictor"),
    (["constraint=params", "strategy=annealing", "population=0"], "strategy: expected one of"),
    (["constraint=params", "colour=red"], "colour: unknown key"),
])
def test_bad_configs_exit_2_with_one_line_before_ray_starts(supernet_dir, tmp_path, capsys, monkeypatch, extra, message):
    import ray

    from recipes.search import main

    def started(*args, **kwargs):
        raise AssertionError("Ray was started for a config that should have been refused")

    monkeypatch.setattr(ray, "init", started)
    monkeypatch.setattr(ray, "put", started)
    argv = ["--supernet", str(supernet_dir), "--out", str(tmp_path / "out"),
            *[a.format(tmp=tmp_path) for a in extra]]
    assert run_recipe(main, argv, "raynas search") == 2
    err = capsys.readouterr().err
    assert err.startswith("raynas search: error: ") and message.format(tmp=tmp_path) in err
    assert not (tmp_path / "out" / EVALUATED_FILE).exists()


# ---------------------------------------------------------------- the Searcher contract, without a cluster


def test_searcher_hands_out_generations_in_chunks_and_saves_and_restores_its_state(tmp_path):
    from ray.tune.search import Searcher

    from raynas.orchestration.search_tune import ArchSearcher

    space = tiny_supernet("mlm").space
    constraint = Constraint(space, "params")
    cfg = SearchConfig(**{**CFG, "archs_per_trial": 5})

    def searcher() -> ArchSearcher:
        search = EvolutionSearch(space, constraint.costs, constraint.budgets(cfg.budgets), **cfg.search_kwargs())
        return ArchSearcher(search, cfg.archs_per_trial)

    s = searcher()
    configs = [s.suggest(f"t{i}") for i in range(4)]
    assert [len(c["archs"]) for c in configs[:3]] == [4, 4, 4]  # 12 archs evened over 3 trials of <= 5
    assert configs[3] is None  # generation 2 needs generation 1's losses
    s.save(str(tmp_path / "searcher.pkl"))
    restored = searcher()
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert restored.trials == s.trials and restored.search.pending == s.search.pending
    for tid in ("t0", "t1"):
        restored.on_trial_complete(tid, {"losses": json.dumps([{"loss": 1.0}] * 4), "eval_s": 0.1})
    restored.on_trial_complete("t2", error=True)  # its archs go back to the queue, then to a new trial
    again = restored.suggest("t4")
    assert again["archs"] == configs[2]["archs"] and again["generation"] == 1
    restored.on_trial_complete("t4", {"losses": json.dumps([{"loss": 2.0}] * 4), "eval_s": 0.1})
    assert restored.search.generation == 2 and restored.suggest("t5")["generation"] == 2
    done = searcher()
    done.max_trials = 0
    assert done.suggest("t0") == Searcher.FINISHED


# ---------------------------------------------------------------- a real Tune run


def in_process(cfg: SearchConfig, net, constraint: Constraint, batches) -> EvolutionSearch:
    """The same search driven without Ray: validation_losses on each chunk, in this process, one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the trials (cpus_per_trial=1): same reductions, same numbers
    try:
        search = EvolutionSearch(net.space, constraint.costs, constraint.budgets(cfg.budgets), **cfg.search_kwargs())
        while not search.done:
            archs = [a for a, _ in search.ask(cfg.archs_per_trial)]
            for arch, terms in zip(archs, validation_losses(net, archs, batches), strict=True):
                search.tell(arch, terms["loss"])
    finally:
        torch.set_num_threads(threads)
    return search


@pytest.mark.usefixtures("local_ray")
def test_tune_search_stores_the_proxy_fitness_and_resumes_without_lost_or_duplicated_rows(tmp_path):
    from raynas.orchestration.search_tune import run_search

    net = tiny_supernet("mlm").eval()
    batches = mlm_batches(net.space.embeddings.vocab_size, 2, 4, 16, seed=0)
    cfg = SearchConfig(**CFG)
    constraint = Constraint(net.space, "params")
    out = tmp_path / "search"
    lines: list[str] = []

    first = run_search(cfg, net, constraint, out, batches=batches, max_trials=2, progress=lines.append)
    assert not first.done and len(first.evaluated) == 8  # 2 trials of 4; generation 1 has 12 archs
    assert not (out / CHOSEN_FILE).exists()  # only a finished search names its winners

    second = run_search(cfg, net, constraint, out, batches=batches, progress=lines.append)
    assert second.done and second.replayed == 8
    df = pd.read_parquet(out / EVALUATED_FILE)
    assert list(df.columns) == EVALUATED_SCHEMA.names
    assert len(df) == 24 and df["arch"].is_unique and sorted(df["generation"].unique()) == [1, 2]
    assert df.groupby("generation").size().to_dict() == {1: 12, 2: 12}

    # the Tune run is the algorithm: same archs per generation and the losses validation_losses gives
    reference = in_process(cfg, net, constraint, batches)
    assert {a: r["generation"] for a, r in reference.archive.items()} == dict(zip(df["arch"], df["generation"]))
    assert df["proxy_loss"].tolist() == pytest.approx([reference.archive[a]["loss"] for a in df["arch"]], rel=1e-6)
    limits = {b.label: b.value for b in second.budgets}
    assert all(p <= limits[b] for p, b in zip(df["params"], df["budget"]))
    assert (df["finished_at"] >= df["started_at"]).all() and df["trial_id"].nunique() == 6

    chosen = pd.read_parquet(out / CHOSEN_FILE)
    for _, row in chosen.iterrows():
        fits = df[df["params"] <= row["budget_value"]]
        assert row["arch"] == fits.loc[fits["proxy_loss"].idxmin(), "arch"]
    t = second.timing
    assert t["trials"] == 4 and t["archs"] == 16 and 0 < t["eval_s_per_arch"] < 5
    assert t["tune_overhead_s_per_trial"] >= 0
    assert any(line.startswith("search: generation 2/2, evaluations 24/24") for line in lines)
    assert any("resumed 8 stored evaluations" in line for line in lines)


# ---------------------------------------------------------------- kill the driver, rerun (slow: two Ray starts)


@pytest.mark.slow
def test_killed_driver_rerun_completes_without_lost_or_duplicated_rows(supernet_dir, tmp_path):
    corpus = training_corpus(tmp_path)
    out = tmp_path / "search"
    cmd = [sys.executable, "-m", "recipes.search", "--supernet", str(supernet_dir), "--out", str(out),
           "constraint=params", "budgets=[1.5x, 3x]", "generations=3", "population=8", "archs_per_trial=2",
           f"corpus.files=[{corpus}]", "corpus.seq_len=32", "batch_size=4", "eval_batches=2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        if (out / EVALUATED_FILE).exists() and len(pd.read_parquet(out / EVALUATED_FILE)) >= 6:
            break
        time.sleep(0.5)
    assert proc.poll() is None, "the search finished (or failed) before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = pd.read_parquet(out / EVALUATED_FILE)
    assert 6 <= len(killed) < 48 and not (out / CHOSEN_FILE).exists()

    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    df = pd.read_parquet(out / EVALUATED_FILE)
    assert len(df) == 48 and df["arch"].is_unique
    assert set(killed["arch"]) <= set(df["arch"])  # nothing stored before the kill was lost or redone
    assert killed.set_index("arch")["proxy_loss"].equals(df.set_index("arch").loc[killed["arch"], "proxy_loss"])
    assert f"resumed {len(killed)} stored evaluations" in rerun.stderr
    assert (out / CHOSEN_FILE).exists() and "budget" in rerun.stdout
