"""Supernet training on a local Ray: DeepSpeed ZeRO-2 on 2 workers, and DDP resume from a checkpoint."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from conftest import TINY, VOCAB

from raynas.config_loading import load_config
from raynas.orchestration.supernet_training import TrainConfig, run_training
from raynas.supernet.checkpoint import load_supernet

pytestmark = [pytest.mark.ray, pytest.mark.deepspeed]


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield
    ray.shutdown()


def _corpus(tmp: Path) -> Path:
    """Repetitive word patterns: a tiny model can learn them in a few steps."""
    rng = random.Random(0)
    words = [f"w{i}" for i in range(VOCAB - 5)]
    paras = []
    for _ in range(200):
        start = rng.randrange(len(words) - 20)
        paras.append(" ".join(words[start: start + 20] * 3))
    path = tmp / "corpus.txt"
    path.write_text("\n\n".join(paras))
    return path


def _config(tmp: Path, tokenizer, **kw) -> TrainConfig:
    tokenizer.save_pretrained(tmp / "tok")
    name, space = TINY["mlm"]
    raw = {"out": str(tmp / "run"), "space": name, "space_overrides": space, "tokenizer": str(tmp / "tok"),
           "corpus": {"files": [str(_corpus(tmp))], "seq_len": 32, "validation_fraction": 0.1},
           "batch_size": 8, "lr": 3e-3, "warmup_ratio": 0.1, "log_every": 5, "dropout": 0.0}
    overrides = [f"{k}={v}" for k, v in kw.items()]
    return load_config(TrainConfig, None, overrides, defaults=raw)


def test_deepspeed_zero2_two_workers(tmp_path, tokenizer):
    cfg = _config(tmp_path, tokenizer, steps=20, checkpoint_every=10, eval_every=20, num_workers=2,
                  **{"deepspeed.enabled": "true", "deepspeed.zero_stage": 2})
    metrics = run_training(cfg)
    assert metrics["step"] == 20
    assert metrics["val_loss_largest"] < metrics["initial_val_loss_largest"]
    assert metrics["val_loss_smallest"] < metrics["initial_val_loss_smallest"]
    net = load_supernet(tmp_path / "run" / "supernet")
    assert str(net.active_arch)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-00000010", "step-00000020"]
    assert (tmp_path / "run" / "checkpoints" / "step-00000010" / "deepspeed").is_dir()


def test_ddp_resume(tmp_path, tokenizer):
    cfg = _config(tmp_path, tokenizer, steps=10, checkpoint_every=5, eval_every=10, num_workers=1,
                  **{"deepspeed.enabled": "false"})
    first = run_training(cfg)
    assert first["step"] == 10 and first["start_step"] == 0
    cfg.steps = 15
    second = run_training(cfg)
    assert second["step"] == 15
    assert second["start_step"] >= 5
