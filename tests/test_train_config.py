"""Training config checks before Ray starts: TrainConfig fields, preflight, engine helpers (no cluster)."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY, VOCAB, tiny_space, tiny_supernet
from transformers import BertConfig, BertForMaskedLM

from raynas.config_loading import load_config
from raynas.errors import ConfigError
from raynas.orchestration.engines import deepspeed_config, merge
from raynas.orchestration.supernet_training import TrainConfig, load_tokenizer, preflight
from raynas.supernet import save_supernet
from raynas.training.config import ObjectiveConfig, resolve_precision
from raynas.training.optim import lr_lambda, param_groups

TEACHER_HEADS = 4  # the kd space's head count; the mlm space has 1-4 heads


def make_config(raw: dict | None = None, overrides: tuple[str, ...] = (), kind: str | None = "mlm") -> TrainConfig:
    base: dict = {}
    if kind is not None:
        name, space = TINY[kind]
        base = {"space": name, "space_overrides": copy.deepcopy(space)}
    return load_config(TrainConfig, None, list(overrides), defaults={**base, **(raw or {})})


@pytest.fixture
def teacher_dir(tmp_path: Path, tokenizer) -> Path:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=1, num_attention_heads=TEACHER_HEADS,
                     intermediate_size=64, max_position_embeddings=64)
    path = tmp_path / "teacher"
    BertForMaskedLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ---------------------------------------------------------------- engine helpers


def test_lr_lambda_warmup_then_linear_decay() -> None:
    f = lr_lambda(100, 0.1)  # 10 warmup steps
    assert f(0) == pytest.approx(0.1)
    assert f(4) == pytest.approx(0.5)
    assert f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5)
    assert f(99) == pytest.approx(1 / 90)
    assert f(100) == 0.0 and f(150) == 0.0  # never negative
    g = lr_lambda(10, 0.0)  # at least one warmup step
    assert g(0) == pytest.approx(1.0) and g(1) == pytest.approx(1.0) and g(4) == pytest.approx(6 / 9)


def test_resolve_precision() -> None:
    assert resolve_precision("auto", False) == "fp32"
    assert resolve_precision("auto", True) == "bf16"
    assert resolve_precision("fp16", True) == "fp16"
    assert resolve_precision("fp32", False) == "fp32"
    with pytest.raises(ConfigError, match="deepspeed.precision.*use_gpu"):
        resolve_precision("bf16", False)
    with pytest.raises(ConfigError, match="deepspeed.precision"):
        resolve_precision("fp8", True)


def test_deepspeed_config_merges_user_overrides() -> None:
    extra = {"zero_optimization": {"offload_optimizer": {"device": "cpu"}, "stage": 1},
             "gradient_clipping": 0.5, "wall_clock_breakdown": True}
    cfg = deepspeed_config(2, "bf16", micro=4, accum=3, world=2, extra=extra)
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["gradient_accumulation_steps"] == 3
    assert cfg["train_batch_size"] == 24
    assert cfg["bf16"] == {"enabled": True} and cfg["fp16"] == {"enabled": False}
    assert cfg["zero_optimization"] == {"stage": 1, "offload_optimizer": {"device": "cpu"}}  # nested, user wins
    assert cfg["gradient_clipping"] == 0.5 and cfg["wall_clock_breakdown"] is True
    assert cfg["zero_allow_untested_optimizer"] is True
    plain = deepspeed_config(3, "fp32", 2, 1, 1, {})
    assert plain["zero_optimization"] == {"stage": 3} and plain["gradient_clipping"] == 1.0
    assert not plain["bf16"]["enabled"] and not plain["fp16"]["enabled"] and plain["train_batch_size"] == 2


def test_merge_is_deep_and_pure() -> None:
    a = {"x": {"y": 1, "z": {"w": 2}}, "k": 1}
    b = {"x": {"z": {"v": 3}}, "k": {"new": 1}}
    out = merge(a, b)
    assert out == {"x": {"y": 1, "z": {"w": 2, "v": 3}}, "k": {"new": 1}}
    assert a == {"x": {"y": 1, "z": {"w": 2}}, "k": 1}  # inputs untouched


def test_param_groups_no_decay_for_norms_and_biases() -> None:
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=64, max_position_embeddings=64))
    model.bert.embeddings.token_type_embeddings.weight.requires_grad_(False)
    decay, no_decay = param_groups(model, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    named = {id(p): n for n, p in model.named_parameters()}
    decay_names = {named[id(p)] for p in decay["params"]}
    no_decay_names = {named[id(p)] for p in no_decay["params"]}
    assert not decay_names & no_decay_names
    assert "bert.embeddings.token_type_embeddings.weight" not in decay_names | no_decay_names  # frozen
    assert len(decay_names) + len(no_decay_names) == sum(p.requires_grad for p in model.parameters())
    assert "bert.encoder.layer.0.attention.self.query.weight" in decay_names
    assert "bert.embeddings.word_embeddings.weight" in decay_names
    for n in no_decay_names:
        assert "LayerNorm" in n or n.endswith("bias"), n
    assert "bert.embeddings.LayerNorm.weight" in no_decay_names
    assert "bert.encoder.layer.0.attention.self.query.bias" in no_decay_names
    # a supernet's elastic layers too
    net = tiny_supernet("mlm")
    decay, no_decay = param_groups(net, 0.1)
    names = {id(p): n for n, p in net.named_parameters()}
    assert all("LayerNorm" in names[id(p)] or names[id(p)].endswith("bias") for p in no_decay["params"])
    assert all(p.ndim == 2 for p in decay["params"])


# ---------------------------------------------------------------- TrainConfig fields


def test_default_config_builds() -> None:
    cfg = make_config()
    assert cfg.space == "autotinybert-mlm" and cfg.objective.mode == "mlm" and cfg.deepspeed.zero_stage == 2
    over = make_config(overrides=("objective.attention_weight=0.5", "deepspeed.precision=fp32", "steps=7"))
    assert over.objective.attention_weight == 0.5 and over.deepspeed.precision == "fp32" and over.steps == 7


@pytest.mark.parametrize(("raw", "kind", "fields"), [
    ({"model": "some/model"}, "mlm", ["space", "model"]),  # two students
    ({}, None, ["exactly one", "none"]),  # no student
    ({"objective": {"mode": "kd"}}, "kd", ["objective.teacher", "kd"]),
    ({"objective": {"teacher": "bert-base-uncased"}}, "mlm", ["objective.teacher", "only used"]),
    ({"objective": {"mode": "distil"}}, "mlm", ["objective.mode"]),
    ({"objective": {"mlm_probability": 1.5}}, "mlm", ["objective.mlm_probability"]),
    ({"deepspeed": {"zero_stage": 5}}, "mlm", ["deepspeed.zero_stage"]),
    ({"sampler": {"name": "random"}}, "mlm", ["sampler.name"]),
    ({"bogus": 1}, "mlm", ["bogus", "unknown key"]),
    ({"objective": {"bogus_weight": 1.0}}, "mlm", ["objective.bogus_weight", "unknown key"]),
    ({"steps": 0}, "mlm", ["steps"]),
    ({"batch_size": 5, "num_workers": 2}, "mlm", ["batch_size", "num_workers"]),
    ({"max_failures": -2}, "mlm", ["max_failures"]),
    ({"objective": {"attention_weight": "lots"}}, "mlm", ["objective.attention_weight"]),
    ({"objective": {"mode": "kd", "teacher": "t", "hidden_weight": 0.0}}, "kd", ["every kd loss weight"]),
    ({"objective": {"temperature": 0.0}}, "mlm", ["objective.temperature"]),
    ({"sampler": {"n_random": -1}}, "mlm", ["sampler.n_random"]),
    ({"corpus": {"seq_len": 4}}, "mlm", ["corpus seq_len"]),
])
def test_config_errors_name_the_field(raw: dict, kind: str | None, fields: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        make_config(raw, kind=kind)
    for text in fields:
        assert text in str(info.value), (text, str(info.value))


def test_every_bad_field_in_one_error() -> None:
    with pytest.raises(ConfigError) as info:
        make_config({"steps": 0, "sampler": {"per_worker": 0}, "deepspeed": {"zero_stage": 9},
                     "objective": {"mode": "kd", "hidden_weight": -1.0}})
    lines = str(info.value).splitlines()
    assert lines[0] == "" and len(lines) == 1 + 5, lines  # one "  - field: ..." line per problem
    for name in ("steps", "sampler.per_worker", "deepspeed.zero_stage", "objective.teacher",
                 "objective.hidden_weight"):
        assert any(line.startswith(f"  - {name}: ") for line in lines), (name, lines)


def test_checks_apply_to_configs_built_in_code() -> None:
    """dataclasses.replace (as bench train does) and direct construction are checked like YAML."""
    cfg = make_config()
    assert dataclasses.replace(cfg, num_workers=4).num_workers == 4
    with pytest.raises(ConfigError, match="^batch_size: 16 is not a multiple of num_workers 3$"):
        dataclasses.replace(cfg, num_workers=3)
    with pytest.raises(ConfigError, match="objective.teacher: mode kd needs a teacher"):
        TrainConfig(space="autotinybert-mlm", objective=ObjectiveConfig(mode="kd"))
    TrainConfig(space="autotinybert-mlm", objective=ObjectiveConfig(mode="kd", teacher="t"))


# ---------------------------------------------------------------- preflight


def test_preflight_kd_with_attention_returns_absolute_paths(tmp_path, teacher_dir, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump(tiny_space("kd").to_dict()))
    cfg = make_config({"space": "space.yaml", "out": "runs/x",
                       "objective": {"mode": "kd", "teacher": "teacher", "attention_weight": 1.0}}, kind=None)
    raw = preflight(cfg)
    assert raw["out"] == str((tmp_path / "runs" / "x").resolve()) and Path(raw["out"]).is_absolute()
    assert raw["space"] == str(space_file.resolve())
    assert raw["objective"]["teacher"] == str(teacher_dir.resolve())  # relative in the config
    assert raw["objective"]["attention_weight"] == 1.0 and raw["steps"] == cfg.steps  # the rest passes through
    assert cfg.out == "runs/x"  # the config itself is untouched


def test_preflight_builtin_space_keeps_its_name(teacher_dir) -> None:
    cfg = make_config({"objective": {"mode": "kd", "teacher": str(teacher_dir)}}, kind="mlm")
    raw = preflight(cfg)  # attention_weight 0: head counts do not matter
    assert raw["space"] == "autotinybert-mlm" and raw["space_overrides"] == TINY["mlm"][1]


def test_preflight_attention_needs_matching_heads(teacher_dir) -> None:
    cfg = make_config({"objective": {"mode": "kd", "teacher": str(teacher_dir), "attention_weight": 1.0}}, kind="mlm")
    with pytest.raises(ConfigError, match="objective.attention_weight.*heads") as info:
        preflight(cfg)
    assert f"({TEACHER_HEADS})" in str(info.value) and "[1, 4]" in str(info.value)
    ok = make_config({"objective": {"mode": "kd", "teacher": str(teacher_dir), "attention_weight": 1.0}}, kind="kd")
    assert preflight(ok)["objective"]["attention_weight"] == 1.0


def test_preflight_unknown_teacher_path() -> None:
    cfg = make_config({"objective": {"mode": "kd", "teacher": "/nonexistent"}}, kind="kd")
    with pytest.raises(ConfigError, match="^objective.teacher: '/nonexistent'"):
        preflight(cfg)


def test_preflight_teacher_folder_without_config(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    cfg = make_config({"objective": {"mode": "kd", "teacher": str(tmp_path / "empty")}}, kind="kd")
    with pytest.raises(ConfigError, match="objective.teacher.*config.json"):
        preflight(cfg)


def test_preflight_model(teacher_dir) -> None:
    with pytest.raises(ConfigError, match="^model: '/nonexistent'"):
        preflight(make_config({"model": "/nonexistent"}, kind=None))
    raw = preflight(make_config({"model": str(teacher_dir)}, kind=None))
    assert raw["model"] == str(teacher_dir.resolve())


def test_preflight_relative_model_becomes_absolute(tmp_path, teacher_dir, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    raw = preflight(make_config({"model": "teacher", "out": "out"}, kind=None))
    assert raw["model"] == str(teacher_dir.resolve()) and raw["out"] == str((tmp_path / "out").resolve())


def test_preflight_model_attention_heads(tmp_path, teacher_dir, tokenizer) -> None:
    torch.manual_seed(0)
    two_heads = tmp_path / "student"
    BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=64)).save_pretrained(two_heads)
    cfg = make_config({"model": str(two_heads),
                       "objective": {"mode": "kd", "teacher": str(teacher_dir), "attention_weight": 1.0}}, kind=None)
    with pytest.raises(ConfigError, match="heads"):
        preflight(cfg)
    same = make_config({"model": str(teacher_dir),
                        "objective": {"mode": "kd", "teacher": str(teacher_dir), "attention_weight": 1.0}}, kind=None)
    preflight(same)


def test_precision_is_checked_with_the_config() -> None:
    with pytest.raises(ConfigError, match="deepspeed.precision: bf16 needs use_gpu"):
        make_config({"deepspeed": {"precision": "bf16"}})  # use_gpu false
    with pytest.raises(ConfigError, match="deepspeed.precision: expected one of"):
        make_config({"deepspeed": {"precision": "fp8"}})
    with pytest.raises(ConfigError, match="deepspeed.precision: fp16 needs deepspeed.enabled"):
        make_config({"use_gpu": True, "deepspeed": {"precision": "fp16", "enabled": False}})
    assert make_config({"deepspeed": {"precision": "fp32"}}).precision == "fp32"
    assert make_config({"use_gpu": True}).precision == "bf16"  # auto


def test_preflight_bad_space_and_init_from(tmp_path) -> None:
    with pytest.raises(ConfigError):
        preflight(make_config({"space": "no-such-space"}, kind=None))
    with pytest.raises(ConfigError):
        preflight(make_config({"init_from": str(tmp_path / "missing")}, kind=None))


def test_preflight_init_from_and_tokenizer(tmp_path, tokenizer) -> None:
    with_tok = save_supernet(tiny_supernet("kd"), tmp_path / "with", tokenizer)
    without = save_supernet(tiny_supernet("kd"), tmp_path / "without")
    raw = preflight(make_config({"init_from": str(with_tok)}, kind=None))
    assert raw["init_from"] == str(Path(with_tok).resolve())
    assert load_tokenizer(make_config({"init_from": str(with_tok)}, kind=None)).vocab_size == VOCAB
    with pytest.raises(ConfigError, match="tokenizer"):
        load_tokenizer(make_config({"init_from": str(without)}, kind=None))


def test_load_tokenizer_from_model_or_folder(tmp_path, teacher_dir, tokenizer) -> None:
    assert load_tokenizer(make_config({"model": str(teacher_dir)}, kind=None)).vocab_size == VOCAB
    tok_dir = tmp_path / "tok"
    tokenizer.save_pretrained(tok_dir)
    assert load_tokenizer(make_config({"tokenizer": str(tok_dir)})).vocab_size == VOCAB
    with pytest.raises(ConfigError, match="tokenizer"):
        load_tokenizer(make_config({"tokenizer": "/nonexistent/tok"}))


def test_resume_with_more_steps_takes_the_new_schedules_lr() -> None:
    """The optimizer state carries the old schedule's last lr (0 at its end); the engine re-derives it."""
    from types import SimpleNamespace

    import torch

    from raynas.orchestration.engines import Engine

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(10, 0.1))
    for _ in range(10):
        opt.step()
        sched.step()
    saved = (opt.state_dict(), sched.state_dict())
    opt2 = torch.optim.AdamW([p], lr=1e-3)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lr_lambda(15, 0.1))
    opt2.load_state_dict(saved[0])
    sched2.load_state_dict(saved[1])
    assert opt2.param_groups[0]["lr"] == 0.0  # what the restored state alone gives
    Engine._resync_lr(SimpleNamespace(sched=sched2))
    assert opt2.param_groups[0]["lr"] == pytest.approx(1e-3 * lr_lambda(15, 0.1)(10)) and opt2.param_groups[0]["lr"] > 0
