"""Supernet training on a local Ray: DeepSpeed ZeRO-2 on 2 workers, and DDP resume from a checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import TINY, VOCAB, training_corpus
from transformers import BertConfig, BertForMaskedLM

from raynas.config_loading import load_config
from raynas.orchestration.supernet_training import TrainConfig, run_training
from raynas.supernet.checkpoint import load_supernet
from raynas.training.factories import build_net

pytestmark = [pytest.mark.ray, pytest.mark.deepspeed, pytest.mark.usefixtures("local_ray")]


def _config(tmp: Path, tokenizer, kind: str = "mlm", model: Path | None = None, **kw) -> TrainConfig:
    tokenizer.save_pretrained(tmp / "tok")
    name, space = TINY[kind]
    student = {"model": str(model)} if model else {"space": name, "space_overrides": space}
    raw = {"out": str(tmp / "run"), **student, "tokenizer": str(tmp / "tok"),
           "corpus": {"files": [str(training_corpus(tmp))], "seq_len": 32, "validation_fraction": 0.1},
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
    trained, (initial, _) = load_supernet(tmp_path / "run" / "supernet"), build_net(cfg)  # build_net: the seeded init
    assert trained.space.to_dict() == initial.space.to_dict()
    assert not torch.equal(trained.embeddings.word_embeddings.weight, initial.embeddings.word_embeddings.weight)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*")) == ["step-00000010", "step-00000020"]
    assert (tmp_path / "run" / "checkpoints" / "step-00000010" / "deepspeed").is_dir()
    _assert_one_copy(tmp_path / "run")


def _assert_one_copy(run: Path) -> None:
    """Each checkpoint's bytes exist once: Ray Train's run folder is OUT/checkpoints and holds, beside the
    step-N folders the workers wrote, only its own small bookkeeping (no copies, no ray_results)."""
    assert not (run / "ray_results").exists()
    ckpts = run / "checkpoints"
    ray_files = [p for p in ckpts.rglob("*") if p.is_file() and not p.relative_to(ckpts).parts[0].startswith("step-")]
    assert sum(p.stat().st_size for p in ray_files) < 100_000, ray_files
    student_files = sorted(p.relative_to(run).as_posix() for p in run.rglob("student.pt"))
    assert student_files == [f"checkpoints/{d.name}/student.pt" for d in sorted(ckpts.glob("step-*"))]
    state = json.loads((ckpts / "checkpoint_manager_snapshot.json").read_text())  # what a rerun resumes from
    assert state["latest_checkpoint_result"]["checkpoint_dir_name"] == sorted(p.name for p in ckpts.glob("step-*"))[-1]


def _worker_log_count(text: str) -> int:
    """How often ``text`` was written to the Ray Train workers' stdout/stderr in this Ray session (what
    log_to_driver echoes on the driver, line for line)."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())  # no public API names the folder
    return sum(p.read_text(errors="replace").count(text) for p in logs.glob("worker-*.err"))


def test_ddp_resume(tmp_path, tokenizer):
    cfg = _config(tmp_path, tokenizer, steps=10, checkpoint_every=5, eval_every=10, num_workers=1,
                  **{"deepspeed.enabled": "false"})
    first = run_training(cfg)
    assert first["step"] == 10 and first["start_step"] == 0
    cfg.steps = 15
    second = run_training(cfg)
    assert second["step"] == 15
    assert second["start_step"] == 10  # the first run's last checkpoint
    assert _worker_log_count("resumed from step 10\n") == 1  # rank 0's line, once (Ray's print patch echoed it)
    assert _worker_log_count("step 15/15 loss") == 1
    _assert_one_copy(tmp_path / "run")


def _arch_log(run: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (run / "archs" / f"rank-{rank}.jsonl").read_text().splitlines()]


def _teacher(tmp: Path, tokenizer) -> Path:
    """A tiny BERT teacher with the kd space's 4 heads, saved as a folder (as a user would pass one)."""
    torch.manual_seed(1)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=96, max_position_embeddings=64)
    BertForMaskedLM(cfg).save_pretrained(tmp / "teacher")
    tokenizer.save_pretrained(tmp / "teacher")
    return tmp / "teacher"


def test_kd_attention_per_rank_archs_zero2(tmp_path, tokenizer):
    """Distillation (hidden + attention maps) under ZeRO-2 with each worker drawing its own sub-models."""
    cfg = _config(tmp_path, tokenizer, "kd", steps=12, checkpoint_every=12, eval_every=12, num_workers=2,
                  **{"objective.mode": "kd", "objective.teacher": str(_teacher(tmp_path, tokenizer)),
                     "objective.attention_weight": 1.0, "deepspeed.zero_stage": 2})
    metrics = run_training(cfg)
    assert metrics["val_loss_largest"] < metrics["initial_val_loss_largest"]
    assert metrics["val_loss_smallest"] < metrics["initial_val_loss_smallest"]
    logs = [_arch_log(tmp_path / "run", r) for r in (0, 1)]
    assert all(len(log) == 12 * 2 for log in logs)  # M = 2 sub-models per worker per step
    assert [e["arch"] for e in logs[0]] != [e["arch"] for e in logs[1]]  # per-rank archs (Algorithm 1)
    assert {"hidden", "attention"} <= set(logs[0][0])


def test_sandwich_inplace_zero3_same_archs(tmp_path, tokenizer):
    """ZeRO-3: every rank trains the same archs; sandwich distils the later sub-models from the largest."""
    cfg = _config(tmp_path, tokenizer, steps=6, checkpoint_every=6, eval_every=6, num_workers=2,
                  **{"sampler.name": "sandwich", "sampler.n_random": 1, "deepspeed.zero_stage": 3})
    metrics = run_training(cfg)
    assert metrics["step"] == 6
    logs = [_arch_log(tmp_path / "run", r) for r in (0, 1)]
    assert [e["arch"] for e in logs[0]] == [e["arch"] for e in logs[1]]
    assert "logits" not in logs[0][0] and all("logits" in e for e in logs[0][1:3])  # largest first, then taught
    assert str(load_supernet(tmp_path / "run" / "supernet").space.largest()) == logs[0][0]["arch"]  # sandwich: first


def test_train_plain_model(tmp_path, tokenizer):
    """raynas train: an extracted sub-model, further trained with MLM under DeepSpeed, loads with AutoModel."""
    from transformers import AutoModel, AutoModelForMaskedLM

    from raynas.export import export_model
    from raynas.spaces import load_space
    from raynas.supernet import Supernet

    name, space = TINY["mlm"]
    net = Supernet.from_space(load_space(name, space))
    export_model(net.extract("2-64-64-4-64"), tmp_path / "student", tokenizer)  # bert-expressible
    cfg = _config(tmp_path, tokenizer, steps=10, checkpoint_every=10, eval_every=10, num_workers=1,
                  model=tmp_path / "student", **{"deepspeed.zero_stage": 1})
    metrics = run_training(cfg)
    assert metrics["val_loss_model"] < metrics["initial_val_loss_model"]
    trained = AutoModelForMaskedLM.from_pretrained(tmp_path / "run" / "model")
    assert trained.config.model_type == "bert" and trained.config.num_hidden_layers == 2
    before, after = (AutoModel.from_pretrained(tmp_path / d) for d in ("student", "run/model"))
    assert torch.equal(before.pooler.dense.weight, after.pooler.dense.weight)  # kept, not re-initialised
    assert not torch.equal(before.encoder.layer[0].output.dense.weight, after.encoder.layer[0].output.dense.weight)


@pytest.mark.gpu
@pytest.mark.parametrize("deepspeed", ["true", "false"])
def test_kd_on_cuda_one_worker(tmp_path, tokenizer, deepspeed):
    """use_gpu: student, teacher and batches on the worker's GPU; precision auto = bf16 (DeepSpeed's, or DDP autocast)."""
    cfg = _config(tmp_path, tokenizer, "kd", steps=6, checkpoint_every=6, eval_every=6, num_workers=1,
                  use_gpu="true", **{"objective.mode": "kd", "objective.teacher": str(_teacher(tmp_path, tokenizer)),
                                     "objective.attention_weight": 1.0, "deepspeed.enabled": deepspeed})
    metrics = run_training(cfg)
    assert metrics["step"] == 6
    assert all(math.isfinite(metrics[k]) for k in ("loss", "val_loss_largest", "val_loss_smallest"))
