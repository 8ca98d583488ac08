"""Device placement of fine-tuning, sweep trials and latency: a CPU check that catches a missing ``.to``, and CUDA runs.

On a CPU-only machine every tensor is on the cpu whether or not the code moved it,
so "is it on the expected device" cannot fail there. The CPU test asks the
question that can: *was it moved there?* It tags every tensor that a ``.to(device)``
call returns, untags the weights that loading produced, and hooks every module's
forward: its weights and buffers, and every tensor input of the student and the
teacher (training and evaluation alike), must carry the tag. Drop any one
placement in finetune (the objective's ``.to``, the training batch, the
evaluation batch) and it fails. The ``gpu`` tests then run the real thing on CUDA.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from test_finetune import _bert_dir, _sst2, _write_squad, _write_sst2
from torch import nn

import raynas.evaluation.finetune as ft
from raynas.evaluation.finetune import FinetuneConfig, finetune
from raynas.evaluation.latency import measure_latency
from raynas.orchestration.finetune_sweep import SweepConfig, trial_device

TAG = "_raynas_placed"


def _names_a_device(args: tuple, kwargs: dict) -> bool:
    """``t.to(device, ...)`` (what a placement is), not ``t.to(dtype)`` or ``Module.to``'s ``t.to(None, dtype)``."""
    return kwargs.get("device") is not None or any(isinstance(a, (torch.device, str)) for a in args)


def _placed(t: torch.Tensor) -> bool:
    return getattr(t, TAG, False)


class PlacementSpy:
    """Tags what ``.to(device)`` returns; hooks assert that models' weights and inputs were placed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.models: list[nn.Module] = []
        self.checked: dict[str, int] = {"train": 0, "eval": 0, "modules": 0}
        real_to = torch.Tensor.to

        def to(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            out = real_to(tensor, *args, **kwargs)
            if _names_a_device(args, kwargs):
                setattr(out, TAG, True)
            return out

        monkeypatch.setattr(torch.Tensor, "to", to)
        real_load = ft.task_model_for

        def load(*args: Any, **kwargs: Any) -> nn.Module:
            model = real_load(*args, **kwargs)
            for t in [*model.parameters(), *model.buffers()]:  # loading may have moved them: that does not count
                if _placed(t):
                    delattr(t, TAG)
            model.register_forward_pre_hook(self._check_inputs, with_kwargs=True)
            self.models.append(model)
            return model

        monkeypatch.setattr(ft, "task_model_for", load)

    def _check_inputs(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]
        assert tensors and all(_placed(t) for t in tensors), \
            f"{type(model).__name__} got inputs that were never moved to the device: " \
            f"{[k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and not _placed(v)]}"
        self.checked["eval" if not model.training and model is self.models[0] else "train"] += 1

    def check_weights(self, module: nn.Module, args: tuple) -> None:
        """Every module that runs: its weights and buffers were moved to the device after loading."""
        stray = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if not _placed(t)]
        assert not stray, f"{type(module).__name__} runs with weights never moved to the device: {stray[:3]}"
        self.checked["modules"] += 1

    def __enter__(self) -> PlacementSpy:
        self._handle = nn.modules.module.register_module_forward_pre_hook(self.check_weights)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()


@pytest.fixture()
def spy(monkeypatch: pytest.MonkeyPatch) -> Iterator[PlacementSpy]:
    with PlacementSpy(monkeypatch) as s:
        yield s


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("device")
    _bert_dir(root / "base")
    _bert_dir(root / "student", hidden=16, layers=1, seed=1)
    _write_sst2(root / "glue", train=32, dev=16)
    _write_squad(root / "squad", version_2=False)
    return root


@pytest.fixture(scope="module")
def sst2_teacher(tiny: Path) -> Path:
    finetune(_sst2(tiny, max_steps=2, output_dir=str(tiny / "teacher")))
    return tiny / "teacher"


def test_every_model_input_and_weight_was_moved_to_the_device(tiny: Path, sst2_teacher: Path, spy) -> None:
    """Student, teacher, hidden-state projection, training batches and evaluation batches: all placed."""
    results = finetune(_sst2(tiny, model=str(tiny / "student"), teacher=str(sst2_teacher), kd_hidden_weight=1.0,
                             max_steps=3, device="cpu"))
    assert results["device"] == "cpu" and results["steps"] == 3
    assert len(spy.models) == 2  # student, teacher
    assert spy.checked["train"] == 2 * 3  # student and teacher, every step
    assert spy.checked["eval"] == 2  # evaluated after epochs 1 and 1.5, 16 dev rows in one batch of 2 x 16
    assert spy.checked["modules"] > 50


def test_qa_prediction_is_placed_too(tiny: Path, spy) -> None:
    results = finetune(FinetuneConfig(task="squad", model=str(tiny / "base"), data_dir=str(tiny / "squad"), lr=3e-3,
                                      max_steps=2, batch_size=8, max_seq_len=32, doc_stride=8, device="cpu"))
    assert results["steps"] == 2 and spy.checked["train"] == 2
    assert spy.checked["eval"] == -(-results["eval_features"] // 16)  # every evaluation batch checked


def test_spy_catches_a_model_left_behind(tiny: Path, monkeypatch: pytest.MonkeyPatch, spy) -> None:
    """The check itself can fail: an objective that never moves to the device is reported."""
    monkeypatch.setattr(ft._Objective, "to", lambda self, *a, **k: self)
    with pytest.raises(AssertionError, match="weights never moved to the device"):
        finetune(_sst2(tiny, max_steps=1, device="cpu"))


def test_latency_moves_the_model_and_its_inputs(spy) -> None:
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=64))
    inputs: list[bool] = []
    model.register_forward_pre_hook(lambda m, a, k: inputs.extend(_placed(v) for v in k.values()), with_kwargs=True)
    row = measure_latency(model, seq_len=16, warmup=1, repeats=2, device="cpu")
    assert row["latency_ms"] > 0 and inputs == [True, True] * 3  # input_ids and attention_mask, 3 forwards
    assert spy.checked["modules"] > 0  # the weight check ran: every module's weights were placed


# ---------------------------------------------------------------- sweep trials: which device


def test_trial_device_follows_rays_gpu_assignment() -> None:
    assert trial_device("auto", [0]) == "cuda"
    assert trial_device("auto", []) == "cpu"
    assert trial_device("cpu", [0]) == "cpu"  # an explicit choice wins
    assert trial_device("cuda:1", []) == "cuda:1"


def test_sweep_rejects_a_device_that_contradicts_its_gpus() -> None:
    with pytest.raises(ValueError, match="fixed.device: cpu, but gpus_per_trial > 0"):
        SweepConfig(models=["m"], tasks=["sst2"], gpus_per_trial=1, fixed={"device": "cpu"})
    with pytest.raises(ValueError, match="fixed.device: cuda needs gpus_per_trial > 0"):
        SweepConfig(models=["m"], tasks=["sst2"], fixed={"device": "cuda"})
    with pytest.raises(ValueError, match="gpus_per_trial: expected >= 0"):
        SweepConfig(models=["m"], tasks=["sst2"], gpus_per_trial=-1)


# ---------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_finetune_trial_on_cuda(tiny: Path, sst2_teacher: Path, precision: str) -> None:
    """``auto`` picks the GPU; student, teacher and batches run there (a CPU tensor in a CUDA forward would raise)."""
    seen: list[torch.device] = []
    real_load = ft.task_model_for

    def load(*args: Any, **kwargs: Any) -> nn.Module:
        model = real_load(*args, **kwargs)
        model.register_forward_pre_hook(lambda m, a, k: seen.extend(v.device for v in k.values()
                                                                    if isinstance(v, torch.Tensor)), with_kwargs=True)
        return model

    mp = pytest.MonkeyPatch()
    mp.setattr(ft, "task_model_for", load)
    try:
        results = finetune(_sst2(tiny, model=str(tiny / "student"), teacher=str(sst2_teacher), kd_hidden_weight=1.0,
                                 max_steps=3, precision=precision))
    finally:
        mp.undo()
    assert results["device"] == "cuda" and results["steps"] == 3
    assert 0.0 <= results["accuracy"] <= 1.0 and math.isfinite(results["train_loss"])
    assert seen and {d.type for d in seen} == {"cuda"}


@pytest.mark.gpu
@pytest.mark.ray
def test_sweep_trial_with_a_gpu_runs_on_cuda(tiny: Path, tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    from raynas.orchestration.finetune_sweep import run_sweep

    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        rows = run_sweep(SweepConfig(models=[str(tiny / "base")], tasks=["sst2"], data_dir=str(tiny / "glue"),
                                     search={"lr": [1e-3]}, fixed={"max_steps": 2, "batch_size": 16,
                                                                   "max_seq_len": 32},
                                     gpus_per_trial=1), tmp_path)
    finally:
        ray.shutdown()
    assert [(r["status"], r["device"]) for r in rows] == [("ok", "cuda")], rows


@pytest.mark.gpu
def test_latency_on_cuda_synchronizes_and_gives_the_module_back() -> None:
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=64)).train()
    calls = []
    real = torch.cuda.synchronize
    mp = pytest.MonkeyPatch()
    mp.setattr(torch.cuda, "synchronize", lambda *a: (calls.append(a), real(*a)))
    try:
        row = measure_latency(model, seq_len=16, warmup=1, repeats=3, device="cuda")
    finally:
        mp.undo()
    assert row["latency_ms"] > 0 and row["params"] == sum(p.numel() for p in model.parameters())
    assert len(calls) == 2 * (1 + 3)  # before and after every timed forward, warmup included
    assert next(model.parameters()).device.type == "cpu" and model.training
