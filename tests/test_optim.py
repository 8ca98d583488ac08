"""One optimizer, schedule and set of KD losses for pre-training and fine-tuning: the move changed no number.

Before ``raynas.training.optim`` existed, fine-tuning built its own AdamW groups,
took ``transformers.get_linear_schedule_with_warmup`` and wrote its own KL / MSE /
span / hidden-state losses. These tests hold the shared versions to the old
formulas, and pin fine-tuning losses recorded with the old code (same seeds).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_finetune import _bert_dir, _write_squad, _write_sst2, _write_stsb
from transformers import BertConfig, BertForSequenceClassification, get_linear_schedule_with_warmup

from raynas.errors import ConfigError
from raynas.evaluation.finetune import FinetuneConfig, finetune
from raynas.training.objectives import HiddenDistillation, logits_distillation, score_distillation, span_distillation
from raynas.training.optim import autocast_dtype, param_groups, resolve_device, warmup_schedule

# ---------------------------------------------------------------- schedule and groups


@pytest.mark.parametrize("total, ratio", [(10, 0.1), (100, 0.06), (7, 0.0), (5, 1.0), (1, 0.5), (33, 0.3)])
def test_warmup_schedule_is_transformers_linear_schedule(total: int, ratio: float) -> None:
    """Fine-tuning's schedule, step for step, including the steps past the end (LR stays 0)."""
    ours = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    theirs = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    a, b = warmup_schedule(ours, total, ratio), get_linear_schedule_with_warmup(theirs, int(ratio * total), total)
    for _ in range(total + 3):
        assert a.get_last_lr() == b.get_last_lr()
        ours.step(), theirs.step(), a.step(), b.step()


def test_param_groups_are_fine_tunings_old_split_without_the_frozen_teacher() -> None:
    """Old fine-tuning split: decay on >= 2-D trainable tensors, none below, in parameter order."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    holder = torch.nn.Module()
    holder.student = BertForSequenceClassification(config)
    holder.teacher = BertForSequenceClassification(config).requires_grad_(False)
    holder.projection = torch.nn.Linear(16, 24)
    params = [p for p in holder.parameters() if p.requires_grad]
    decay, no_decay = param_groups(holder, 0.01)
    assert decay["params"] == [p for p in params if p.ndim >= 2] and decay["weight_decay"] == 0.01
    assert no_decay["params"] == [p for p in params if p.ndim < 2] and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(holder.student.parameters())) + 2


# ---------------------------------------------------------------- device and precision settings


def test_device_and_precision_settings() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("tpu", "gpu", "meta"):
        with pytest.raises(ConfigError, match=f"device: expected auto, cpu, cuda or cuda:N, got '{bad}'"):
            resolve_device(bad)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype("fp32", cuda) is None and autocast_dtype("auto", cpu) is None
    assert autocast_dtype("bf16", cuda) is torch.bfloat16 and autocast_dtype("auto", cuda) is torch.bfloat16
    with pytest.raises(ConfigError, match="precision: bf16 autocast needs a cuda device"):
        autocast_dtype("bf16", cpu)
    with pytest.raises(ConfigError, match="precision: expected one of"):
        autocast_dtype("fp16", cuda)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error a CPU-only machine gives")
def test_cuda_without_a_gpu_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="device: cuda requested, but torch sees no GPU"):
        resolve_device("cuda")


# ---------------------------------------------------------------- KD terms: the old fine-tuning formulas


def _old_kl(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    return F.kl_div(F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1),
                    reduction="batchmean", log_target=True) * t * t


def test_kd_terms_compute_the_old_fine_tuning_losses() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(8, 3) * 3, torch.randn(8, 3) * 3
    assert logits_distillation(s, t, 2.0).item() == pytest.approx(_old_kl(s, t, 2.0).item(), rel=1e-6)
    scores = torch.randn(8, 1), torch.randn(8, 1)
    assert score_distillation(*scores).item() == F.mse_loss(scores[0].squeeze(-1), scores[1].squeeze(-1)).item()

    mask = torch.ones(4, 10, dtype=torch.long)
    mask[1, 6:], mask[3, 2:] = 0, 0
    ss, se, ts, te = (torch.randn(4, 10) * 2 for _ in range(4))
    pad = mask == 0
    old = (_old_kl(ss.masked_fill(pad, -1e4), ts.masked_fill(pad, -1e4), 2.0)
           + _old_kl(se.masked_fill(pad, -1e4), te.masked_fill(pad, -1e4), 2.0)) / 2
    assert span_distillation(ss, se, ts, te, mask, 2.0).item() == pytest.approx(old.item(), rel=1e-6)
    changed = ss.clone()
    changed[3, 5] = 50.0  # a padding position: no effect
    assert span_distillation(changed, se, ts, te, mask, 2.0).item() == span_distillation(ss, se, ts, te, mask,
                                                                                          2.0).item()

    student, teacher = torch.randn(4, 10, 6), torch.randn(4, 10, 9)
    hidden = HiddenDistillation(6, 9)  # widths differ: a projection, as fine-tuning had
    projection = copy.deepcopy(hidden.proj)
    keep = mask.unsqueeze(-1).float()
    old_hidden = ((projection(student) - teacher).pow(2) * keep).sum() / (keep.sum() * 9)
    assert hidden(student, teacher, mask).item() == pytest.approx(old_hidden.item(), rel=1e-6)
    same = HiddenDistillation(9, 9)  # equal widths: no projection (fine-tuning's nn.Identity)
    assert same.proj is None
    wide = teacher.flip(0)
    old_same = ((wide - teacher).pow(2) * keep).sum() / (keep.sum() * 9)
    assert same(wide, teacher, mask).item() == pytest.approx(old_same.item(), rel=1e-6)


# ---------------------------------------------------------------- whole fine-tuning runs, pinned


# Recorded with the code before the move (finetune.py's own losses, optimizer and transformers' schedule), on
# this data, one torch thread: (train_loss, score). The SST-2 runs have warmup steps (2 of 8, 1 of 4), so the
# schedule's ramp counts; the KD runs cover classification KL + a projected hidden loss, regression MSE + an
# unprojected hidden loss, and QA span KL + a projected hidden loss.
RECORDED = {
    "sst2_plain": (0.6939224153757095, 0.5),
    "sst2_kd": (1.7500968277454376, 0.5),
    "stsb_kd": (5.31005072593689, 0.38297881360823555),
    "qa_plain": (3.4348387718200684, 32.976190476190474),
    "qa_kd": (2.8542022705078125, 23.434343434343432),
}


@pytest.fixture()
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_fine_tuning_losses_are_the_recorded_ones(tmp_path: Path, one_thread) -> None:
    """Same seeds, same losses as before the shared optimizer / schedule / KD terms, up to float32 rounding.

    Bit-identical except the classification KL, which now averages per-row KLs
    instead of dividing the batch sum by its size (about 1e-8 relative apart).
    """
    _bert_dir(tmp_path / "base")
    _bert_dir(tmp_path / "student", hidden=16, layers=1, seed=1)
    glue = _write_stsb(_write_sst2(tmp_path / "glue", train=64, dev=16), train=32, dev=8)
    squad = _write_squad(tmp_path / "squad", version_2=False)
    common = {"lr": 2e-3, "batch_size": 16, "max_seq_len": 32, "seed": 0, "threads": 1, "data_dir": str(glue),
              "warmup_ratio": 0.25}
    base, student = str(tmp_path / "base"), str(tmp_path / "student")
    got = {}
    r = finetune(FinetuneConfig(task="sst2", model=base, epochs=2, output_dir=str(tmp_path / "t-sst2"), **common))
    got["sst2_plain"] = r["train_loss"], r["accuracy"]
    r = finetune(FinetuneConfig(task="sst2", model=student, teacher=str(tmp_path / "t-sst2"), epochs=1, kd_alpha=0.5,
                                kd_temperature=2.0, kd_hidden_weight=1.0, **common))
    got["sst2_kd"] = r["train_loss"], r["accuracy"]
    finetune(FinetuneConfig(task="stsb", model=base, epochs=1, output_dir=str(tmp_path / "t-stsb"), **common))
    r = finetune(FinetuneConfig(task="stsb", model=base, teacher=str(tmp_path / "t-stsb"), max_steps=2,
                                kd_hidden_weight=0.5, **common))
    got["stsb_kd"] = r["train_loss"], r["spearmanr"]
    qa = {"task": "squad", "data_dir": str(squad), "lr": 3e-3, "batch_size": 8, "max_seq_len": 32, "doc_stride": 8,
          "seed": 0, "threads": 1, "warmup_ratio": 0.25}
    r = finetune(FinetuneConfig(model=base, epochs=1, output_dir=str(tmp_path / "t-qa"), **qa))
    got["qa_plain"] = r["train_loss"], r["f1"]
    r = finetune(FinetuneConfig(model=student, teacher=str(tmp_path / "t-qa"), kd_hidden_weight=1.0,
                                kd_temperature=2.0, max_steps=3, **qa))
    got["qa_kd"] = r["train_loss"], r["f1"]
    for name, (loss, score) in RECORDED.items():
        assert got[name][0] == pytest.approx(loss, rel=1e-6, abs=0), name
        assert got[name][1] == pytest.approx(score, rel=1e-9, abs=0), name
