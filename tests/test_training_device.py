"""A training worker puts the student, the teacher and every batch on its device, in the student's dtype.

On a CPU-only machine a missing ``.to(device)`` is invisible: everything is on the
CPU anyway. So the worker's pure pieces (build_teacher, build_student, evaluate)
run here with the ``meta`` device, and a forward pre-hook on the student's and the
teacher's top module asserts that every input and every weight is on it: a tensor
left behind on the CPU fails the hook. Meta tensors hold no values, so each run
stops at the first op that reads one (an ``.item()`` inside a forward or a loss);
the hooks record which models were entered before that.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import TINY, VOCAB
from test_objectives import mlm_batch
from torch import nn
from transformers import BertConfig, BertForMaskedLM

from raynas.config_loading import load_config
from raynas.training.config import TrainConfig
from raynas.training.factories import build_student, build_teacher, student_dtype, train_placement
from raynas.training.optim import Placement
from raynas.training.student import evaluate

META = torch.device("meta")


def _tiny_bert(path: Path, heads: int = 4) -> Path:
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=1, num_attention_heads=heads,
                               intermediate_size=64, max_position_embeddings=64)).save_pretrained(path)
    return path


def _config(**raw: object) -> TrainConfig:
    return load_config(TrainConfig, None, defaults=raw)


def _kd_config(teacher: Path, **raw: object) -> TrainConfig:
    name, space = TINY["kd"]
    return _config(space=name, space_overrides=copy.deepcopy(space),
                   objective={"mode": "kd", "teacher": str(teacher), "attention_weight": 1.0}, **raw)


def _watch(*models: nn.Module) -> list[str]:
    """Hooks asserting each model's inputs and weights are on META; returns the names of the models entered."""
    entered: list[str] = []

    def check(module: nn.Module, args: tuple, kwargs: dict) -> None:
        tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
        tensors += [*module.parameters(), *module.buffers()]
        stray = sorted({str(t.device) for t in tensors if t.device != META})
        assert not stray, f"{type(module).__name__}: tensors on {stray}, expected meta"
        entered.append(type(module).__name__)

    for model in models:
        model.register_forward_pre_hook(check, with_kwargs=True)
    return entered


def test_kd_worker_pieces_put_student_teacher_and_batches_on_the_device(tmp_path) -> None:
    cfg = _kd_config(_tiny_bert(tmp_path / "teacher"))
    teacher = build_teacher(cfg, META)
    student, space = build_student(cfg, teacher, META)
    assert teacher.device == META and not teacher.teacher.training and not teacher.logits  # no logits term
    entered = _watch(student.net, teacher.teacher.base_model)  # kd without logits: the teacher's head is skipped
    batches = [mlm_batch()]  # built on the CPU, as the collator builds them
    with pytest.raises(RuntimeError, match="meta"):  # the first value read, inside the teacher's forward
        evaluate(student, {"largest": space.largest()}, batches, Placement(META))
    assert entered == ["Supernet", "BertModel"]  # the student's whole forward ran on meta, then the teacher's
    assert batches[0]["input_ids"].device.type == "cpu"  # moved copies: the caller's batch is left as it was
    entered.clear()
    with pytest.raises(RuntimeError, match="meta"):
        teacher(mlm_batch())  # called alone with a CPU batch, the TeacherCache moves it itself
    assert entered == ["BertModel"]


def test_plain_student_and_its_batches_on_the_device(tmp_path) -> None:
    """raynas train: a plain masked-LM model from a folder."""
    student, space = build_student(_config(model=str(_tiny_bert(tmp_path / "student"))), None, META)
    assert space is None
    entered = _watch(student.net)
    with pytest.raises(RuntimeError, match="meta"):
        evaluate(student, {"model": None}, [mlm_batch()], Placement(META))
    assert entered == ["BertForMaskedLM"]  # mlm: the whole masked-LM model runs


def test_precision_decides_teacher_dtype_and_autocast(tmp_path) -> None:
    teacher_dir = _tiny_bert(tmp_path / "teacher")
    cpu = torch.device("cpu")
    deepspeed_bf16 = _kd_config(teacher_dir, use_gpu=True)  # precision auto: bf16 on GPU
    assert student_dtype(deepspeed_bf16) == torch.bfloat16  # DeepSpeed casts the student's weights
    assert train_placement(deepspeed_bf16, cpu).amp_dtype is None  # ... so no autocast on top
    assert next(build_teacher(deepspeed_bf16, META).teacher.parameters()).dtype == torch.bfloat16
    ddp_bf16 = _kd_config(teacher_dir, use_gpu=True, deepspeed={"enabled": False})
    assert student_dtype(ddp_bf16) == torch.float32 and train_placement(ddp_bf16, cpu).amp_dtype == torch.bfloat16
    cpu_run = _kd_config(teacher_dir)
    assert student_dtype(cpu_run) == torch.float32 and train_placement(cpu_run, cpu).amp_dtype is None
