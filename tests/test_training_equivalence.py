"""Training runs that must give the same losses: resumed vs uninterrupted, ZeRO-2 per-rank accumulation vs DDP.

The per-step, per-sub-model losses come from the arch logs (``out/archs/rank-R.jsonl``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY, training_corpus

from raynas.config_loading import load_config
from raynas.orchestration.supernet_training import TrainConfig, run_training

# 2-3 min each on 2 shared CPUs
pytestmark = [pytest.mark.ray, pytest.mark.deepspeed, pytest.mark.slow, pytest.mark.usefixtures("local_ray")]
TOL = 1e-5


def _config(tmp: Path, tokenizer, out: str, **kw) -> TrainConfig:
    """The tiny MLM supernet config of test_supernet_training, writing to ``tmp/out``."""
    if not (tmp / "tok").exists():
        tokenizer.save_pretrained(tmp / "tok")
        training_corpus(tmp)
    name, space = TINY["mlm"]
    raw = {"out": str(tmp / out), "space": name, "space_overrides": space, "tokenizer": str(tmp / "tok"),
           "corpus": {"files": [str(tmp / "corpus.txt")], "seq_len": 32, "validation_fraction": 0.1},
           "batch_size": 8, "lr": 3e-3, "warmup_ratio": 0.1, "log_every": 5, "dropout": 0.0, "seed": 0}
    return load_config(TrainConfig, None, [f"{k}={v}" for k, v in kw.items()], defaults=raw)


def _log(run: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (run / "archs" / f"rank-{rank}.jsonl").read_text().splitlines()]


def _assert_same_losses(got: list[dict], want: list[dict], what: str) -> None:
    """Same (step, arch) sequence, and every loss term equal to TOL relative."""
    assert [(e["step"], e["arch"]) for e in got] == [(e["step"], e["arch"]) for e in want], what
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys(), what
        for term in w:
            if term in ("step", "arch", "size"):
                continue
            assert g[term] == pytest.approx(w[term], rel=TOL, abs=TOL), \
                f"{what}: step {w['step']} arch {w['arch']} {term}: {g[term]} vs {w[term]}"


def _crash_once_after(monkeypatch, step: int, marker: Path) -> None:
    """Rank 0 of the next run_training raises right after its report of ``step``, once (``marker`` remembers).

    The worker's ``ray.train.report`` puts into a queue of one result, so once the report of
    ``step`` returns, the controller has taken the checkpoint reported before it: the run
    restarts from that checkpoint, deterministically.
    """
    from raynas.orchestration import train_worker

    real_loop = train_worker.train_loop

    def crashing_loop(config):  # a local function: Ray pickles it by value, and real_loop by reference
        import ray.train

        real_report = ray.train.report
        rank = ray.train.get_context().get_world_rank()

        def report(metrics, *args, **kwargs):
            real_report(metrics, *args, **kwargs)
            if rank == 0 and metrics["step"] == step and not marker.exists():
                marker.touch()
                raise RuntimeError(f"injected failure after step {step}")

        ray.train.report = report
        try:
            real_loop(config)
        finally:
            ray.train.report = real_report

    monkeypatch.setattr(train_worker, "train_loop", crashing_loop)


@pytest.mark.parametrize("how", ["rerun-ddp-1", "restart-zero2-2"])
def test_resumed_run_matches_uninterrupted(tmp_path, tokenizer, monkeypatch, how):
    """A run that fails after step k+1 and resumes from its step-k checkpoint logs the losses and archs of an
    uninterrupted run. ``rerun``: the failed run_training raises and the same command runs again (Ray Train
    restores the run's latest checkpoint); ``restart``: FailureConfig restarts the worker group in the same call."""
    steps, k = 6, 3
    kw = {"steps": steps, "checkpoint_every": k, "eval_every": steps, "log_every": 1,
          "dropout": 0.1}  # dropout draws from torch's global RNG: the checkpoint must carry it
    if how == "rerun-ddp-1":
        kw.update({"num_workers": 1, "deepspeed.enabled": "false"})
    else:
        kw.update({"num_workers": 2, "deepspeed.enabled": "true", "deepspeed.zero_stage": 2, "max_failures": 1})
    full = run_training(_config(tmp_path, tokenizer, "full", **kw))
    assert full["step"] == steps and full["start_step"] == 0

    _crash_once_after(monkeypatch, k + 1, tmp_path / "crashed")
    cfg = _config(tmp_path, tokenizer, "resumed", **kw)
    if how.startswith("rerun"):
        with pytest.raises(Exception, match=f"injected failure after step {k + 1}"):
            run_training(cfg)
        assert [e["step"] for e in _log(tmp_path / "resumed", 0)][-1] == k + 1  # it got past the checkpoint
    resumed = run_training(cfg)
    assert (tmp_path / "crashed").exists()
    assert resumed["step"] == steps and resumed["start_step"] == k
    for rank in range(kw["num_workers"]):
        got, want = _log(tmp_path / "resumed", rank), _log(tmp_path / "full", rank)
        assert [e["step"] for e in got] == [e["step"] for e in want]  # lines past the checkpoint were dropped
        _assert_same_losses(got, want, f"{how} rank {rank}")
    assert resumed["val_loss_largest"] == pytest.approx(full["val_loss_largest"], rel=TOL)
    assert resumed["val_loss_smallest"] == pytest.approx(full["val_loss_smallest"], rel=TOL)


def test_zero2_per_rank_accumulation_matches_ddp(tmp_path, tokenizer):
    """2 workers drawing their own sub-models: ZeRO-2 (GradientAccumulator, one engine backward) and DDP
    (one backward per sub-model) train the same weights, so every logged loss agrees.

    The sandwich rule puts the largest arch in every rank's step, so every trainable weight gets a gradient
    every step (the pooler, which no loss reads, is frozen: see ``freeze_unreached``). With archs that leave
    some weight untouched by every rank in a step the engines differ by design: DDP leaves its gradient
    None and AdamW skips it, ZeRO hands AdamW a zero gradient and momentum still moves it.
    """
    kw = {"steps": 8, "checkpoint_every": 8, "eval_every": 8, "num_workers": 2, "sampler.name": "sandwich"}
    ddp = run_training(_config(tmp_path, tokenizer, "ddp", **kw, **{"deepspeed.enabled": "false"}))
    zero2 = run_training(_config(tmp_path, tokenizer, "zero2", **kw,
                                 **{"deepspeed.enabled": "true", "deepspeed.zero_stage": 2}))
    assert zero2["step"] == ddp["step"] == 8
    for rank in (0, 1):
        _assert_same_losses(_log(tmp_path / "zero2", rank), _log(tmp_path / "ddp", rank), f"rank {rank}")
    assert zero2["val_loss_largest"] == pytest.approx(ddp["val_loss_largest"], rel=TOL)
    assert zero2["val_loss_smallest"] == pytest.approx(ddp["val_loss_smallest"], rel=TOL)
