"""The trainer's pure-torch pieces: TrainStudent, GradientAccumulator, attention distillation, FixedSampler.

All in memory on tiny supernets and a tiny BERT teacher; no Ray, no DeepSpeed engine.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import VOCAB, tiny_supernet
from test_objectives import TEACHER_HIDDEN, mlm_batch
from transformers import BertConfig, BertForMaskedLM

from raynas.errors import ConfigError
from raynas.training.objectives import SupernetObjective, TeacherCache, TeacherOutput, attention_distillation
from raynas.training.sampling import SAMPLERS, FixedSampler, build_sampler
from raynas.training.student import GradientAccumulator, TrainStudent

# kd space (conftest TINY["kd"]): 3 layers max -> op-layers mha, ffn, mha, ffn, mha, ffn
KD_ARCHS = ("1-32-16-4-16", "2-48-64-4-32", "2-40-128-4-64")  # <= 2 layers: op-layers 4 and 5 untouched
HEADS = 4


def eager_teacher(seed: int = 0) -> BertForMaskedLM:
    """Same head count as the kd space, eager attention so it can return probabilities."""
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=TEACHER_HIDDEN, num_hidden_layers=2, num_attention_heads=HEADS,
                     intermediate_size=96, max_position_embeddings=64, attn_implementation="eager")
    return BertForMaskedLM(cfg).eval()


def _grads(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]


# ---------------------------------------------------------------- GradientAccumulator


def test_gradient_accumulator_equals_mean_of_backward_runs() -> None:
    net = tiny_supernet("kd", dropout=0.0)
    objective = SupernetObjective("mlm")
    student = TrainStudent(net, objective)
    params = list(student.parameters())
    b = mlm_batch()
    scale = 1.0 / len(KD_ARCHS)

    # reference: plain backward per arch, grads summed by autograd, then scaled
    student.zero_grad(set_to_none=True)
    for arch in KD_ARCHS:
        loss, _, _ = student(b, arch)
        loss.backward()
    want = [g * scale for g in _grads(params)]
    assert any(g.abs().sum() > 0 for g in want)

    student.zero_grad(set_to_none=True)
    acc = GradientAccumulator(params)
    with pytest.raises(RuntimeError, match="add"):
        acc.surrogate()
    for arch in KD_ARCHS:
        loss, _, _ = student(b, arch)
        acc.add(loss, scale)
        assert all(p.grad is None for p in params)  # autograd.grad: nothing lands in .grad
    assert acc.count == len(KD_ARCHS)
    acc.surrogate().backward()
    assert acc.count == 0
    got = [p.grad for p in params]
    assert all(g is not None for g in got)  # untouched parameters get an exact zero, not None
    for (name, _), g, w in zip(student.named_parameters(), got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=0, msg=name)

    named = dict(student.named_parameters())
    untouched = [n for n in named if n.startswith(("net.layers.4.", "net.layers.5."))]
    assert untouched and all(named[n].grad.abs().max() == 0 for n in untouched)
    # sanity: the surrogate did reach a trained layer
    assert named["net.layers.0.ops.mha.query.weight"].grad.abs().sum() > 0

    acc.zero()
    assert all(buf.abs().max() == 0 for buf in acc.buffers)
    student.zero_grad(set_to_none=True)
    acc.surrogate().backward()
    assert all(p.grad is not None and p.grad.abs().max() == 0 for p in params)


def test_gradient_accumulator_scale_and_frozen_params() -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    lin.bias.requires_grad_(False)
    acc = GradientAccumulator(list(lin.parameters()))
    assert acc.params == [lin.weight]
    x = torch.randn(4, 3)
    acc.add(lin(x).sum(), 0.5)
    acc.add(lin(x).sum())  # default scale 1
    lin.weight.grad = None
    acc.surrogate().backward()
    ref = x.sum(0).expand(2, 3)  # d/dW of sum(Wx + b)
    torch.testing.assert_close(lin.weight.grad, 1.5 * ref)


# ---------------------------------------------------------------- TrainStudent


def test_train_student_runs_arch_without_activating_it_and_matches_extracted_model() -> None:
    net = tiny_supernet("kd", dropout=0.0).eval()
    student = TrainStudent(net, SupernetObjective("mlm"))
    assert student.elastic
    b = mlm_batch()
    net.set_active(KD_ARCHS[-1])
    for arch in KD_ARCHS:
        loss, metrics, out = student(b, arch)
        assert net.active_arch == net.space.validate(KD_ARCHS[-1])  # forward(arch=): no shared state written
        assert set(metrics) == {"loss", "mlm"} and metrics["loss"] == pytest.approx(loss.item())
        with torch.no_grad():
            ref = net.extract(arch)(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        torch.testing.assert_close(out.logits.detach(), ref.logits, atol=1e-5, rtol=0)
    # arch=None runs the active arch
    _, _, out = student(b)
    torch.testing.assert_close(out.logits.detach(), ref.logits, atol=1e-5, rtol=0)
    with pytest.raises(ConfigError):
        student(b, "9-64-128-4-64")  # not in the space


@pytest.mark.parametrize("kind", ["raynas", "bert"])
def test_train_student_plain_model(kind: str) -> None:
    if kind == "raynas":
        model = tiny_supernet("mlm", dropout=0.0).extract("2-40-64-2-32").train()
    else:
        torch.manual_seed(0)
        model = BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, intermediate_size=64, max_position_embeddings=64))
    student = TrainStudent(model, SupernetObjective("mlm"))
    assert not student.elastic
    loss, metrics, out = student(mlm_batch(), None)
    assert torch.isfinite(loss) and out.logits.shape == (3, 12, VOCAB) and set(metrics) == {"loss", "mlm"}
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    with pytest.raises(ValueError, match="plain model"):
        student(mlm_batch(), "2-40-64-2-32")


def test_train_student_owns_the_projection() -> None:
    net = tiny_supernet("kd", dropout=0.0)
    objective = SupernetObjective("kd", student_width=net.space.max_hidden, teacher_width=TEACHER_HIDDEN,
                                  teacher=TeacherCache(eager_teacher()))
    student = TrainStudent(net, objective)
    proj = objective.hidden.proj
    assert proj.weight.shape == (TEACHER_HIDDEN, net.space.max_hidden)  # a projection: the widths differ
    ids = {id(p) for p in student.parameters()}
    assert id(proj.weight) in ids and id(proj.bias) in ids
    assert len(ids) == len(list(net.parameters())) + 2
    # the frozen teacher is not part of the trained module
    assert not any(id(p) in ids for p in objective.teacher.teacher.parameters())
    loss, metrics, _ = student(mlm_batch(), KD_ARCHS[1])
    assert set(metrics) == {"loss", "hidden"}
    loss.backward()
    assert proj.weight.grad[:, :48].abs().sum() > 0 and proj.weight.grad[:, 48:].abs().max() == 0


# ---------------------------------------------------------------- attention distillation


def _probs(seed: int, shape=(2, HEADS, 6, 6)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).softmax(-1)


def test_attention_distillation_values_and_mask() -> None:
    t, s = _probs(0), _probs(1)
    assert attention_distillation(t, t.clone()).abs().item() < 1e-7
    ref = (t * (t.log() - s.log())).sum(-1).mean(1).mean()
    value = attention_distillation(s, t)
    assert value.item() > 0
    torch.testing.assert_close(value, ref)

    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    base = attention_distillation(s, t, mask)
    kl = (t * (t.log() - s.log())).sum(-1).mean(1)
    torch.testing.assert_close(base, kl[mask.bool()].mean())
    s2 = s.clone()
    s2[1, :, 4:, :] = _probs(7)[1, :, 4:, :]  # new probabilities on padded query rows only
    torch.testing.assert_close(attention_distillation(s2, t, mask), base)
    assert not torch.allclose(attention_distillation(s2, t), attention_distillation(s, t))  # counted without mask
    s3 = s.clone()
    s3[1, :, 2, :] = _probs(8)[1, :, 2, :]  # a real query row does count
    assert not torch.allclose(attention_distillation(s3, t, mask), base)
    empty = attention_distillation(s.requires_grad_(), t, torch.zeros(2, 6))
    assert empty.item() == 0.0 and empty.requires_grad


def test_attention_distillation_shape_mismatch() -> None:
    with pytest.raises(ConfigError, match="head counts"):
        attention_distillation(_probs(0, (2, 2, 6, 6)), _probs(1))


def test_teacher_cache_attentions() -> None:
    b = mlm_batch()
    cache = TeacherCache(eager_teacher(), output_attentions=True)
    out = cache(b)
    assert out.attention.shape == (3, HEADS, 12, 12)
    torch.testing.assert_close(out.attention.sum(-1), torch.ones(3, HEADS, 12), atol=1e-5, rtol=0)
    assert TeacherCache(eager_teacher()).__call__(b).attention is None  # not asked for


def test_kd_objective_with_attention_term() -> None:
    net = tiny_supernet("kd", dropout=0.0)
    teacher = TeacherCache(eager_teacher(), output_attentions=True)
    objective = SupernetObjective("kd", student_width=net.space.max_hidden, teacher_width=TEACHER_HIDDEN,
                                  attention_weight=2.0, teacher=teacher)
    student = TrainStudent(net, objective)
    b = mlm_batch()
    loss, metrics, out = student(b, "2-48-64-4-32")
    assert set(metrics) == {"loss", "hidden", "attention"}
    assert metrics["attention"] > 0
    assert metrics["loss"] == pytest.approx(metrics["hidden"] + metrics["attention"], rel=1e-5)
    # the term is 2 x the KL between the student's last MHA layer and the teacher's last layer
    want = 2.0 * attention_distillation(out.attentions[-1], teacher(b).attention, b["attention_mask"])
    assert metrics["attention"] == pytest.approx(want.item(), rel=1e-5)
    loss.backward()
    for layer in (0, 2):  # both MHA layers of a 2-layer arch
        q = net.layers[layer].ops["mha"].query.weight.grad
        assert q is not None and q.abs().sum() > 0
    # attention alone (no hidden term) still reaches the last query weights
    net.zero_grad(set_to_none=True)
    only = SupernetObjective("kd", hidden_weight=0.0, attention_weight=1.0, teacher=teacher)
    loss, metrics, _ = TrainStudent(net, only)(b, "2-48-64-4-32")
    assert set(metrics) == {"loss", "attention"}
    loss.backward()
    assert net.layers[2].ops["mha"].query.weight.grad.abs().sum() > 0


def test_attention_objective_needs_teacher_attentions() -> None:
    net = tiny_supernet("kd", dropout=0.0)
    objective = SupernetObjective("kd", hidden_weight=0.0, attention_weight=1.0,
                                  teacher=TeacherCache(eager_teacher()))  # output_attentions not asked for
    with pytest.raises(ConfigError, match="attentions"):
        TrainStudent(net, objective)(mlm_batch(), KD_ARCHS[0])


# ---------------------------------------------------------------- in-place distillation (sandwich, mlm mode)


def test_inplace_distillation_through_student() -> None:
    net = tiny_supernet("mlm", dropout=0.0)
    student = TrainStudent(net, SupernetObjective("mlm", logits_weight=1.0))
    b = mlm_batch()
    loss, metrics, out = student(b, net.space.largest(), None)
    assert set(metrics) == {"loss", "mlm"}
    target = TeacherOutput.detached(out)
    assert not target.logits.requires_grad and not target.last_hidden_state.requires_grad
    torch.testing.assert_close(target.logits, out.logits.detach())
    loss, metrics, _ = student(b, net.space.smallest(), target)
    assert set(metrics) == {"loss", "mlm", "logits"} and metrics["logits"] > 0
    loss.backward()
    # the largest arch again, distilled from itself: the logits term vanishes
    _, metrics, _ = student(b, net.space.largest(), target)
    assert metrics["logits"] == pytest.approx(0.0, abs=1e-6)


def test_inplace_only_objective_without_target_raises() -> None:
    net = tiny_supernet("mlm", dropout=0.0)
    student = TrainStudent(net, SupernetObjective("mlm", logits_weight=1.0, mlm_weight=0.0))
    with pytest.raises(ConfigError, match="no loss term"):
        student(mlm_batch(), net.space.largest())


# ---------------------------------------------------------------- FixedSampler


def test_fixed_sampler() -> None:
    assert SAMPLERS["fixed"] is FixedSampler
    sampler = build_sampler("fixed", None, 3)
    assert [sampler.sample(step) for step in range(5)] == [[None]] * 5
    assert sampler.step == 4
    state = json.loads(json.dumps(sampler.state_dict()))  # plain JSON
    assert state["name"] == "fixed" and state["seed"] == 3 and state["step"] == 4
    other = FixedSampler(None, 99)
    other.load_state_dict(state)
    assert other.state_dict() == sampler.state_dict()
    assert other.sample(5) == [None] and other.step == 5
    assert FixedSampler(None, 0, arch="2-40-64-2-32").sample(0) == ["2-40-64-2-32"]
    with pytest.raises(ConfigError, match="fixed"):
        other.load_state_dict({**state, "name": "uniform"})
    with pytest.raises(ConfigError, match="fixed"):
        build_sampler("fixed", None, 0, per_worker=2)  # an option it does not take


def test_freeze_unreached_leaves_only_what_a_loss_trains() -> None:
    from raynas.training.factories import freeze_unreached

    net = tiny_supernet("kd")
    assert freeze_unreached(net, logits=True) == ["pooler.dense.weight", "pooler.dense.bias"]
    net = tiny_supernet("kd")
    frozen = freeze_unreached(net, logits=False)
    assert {n.split(".")[0] for n in frozen} == {"pooler", "cls"} and not net.cls.bias.requires_grad
    assert net.embeddings.word_embeddings.weight.requires_grad  # the tied decoder stays trainable
    plain = net.extract(net.space.largest())
    frozen = freeze_unreached(plain, logits=False)
    assert set(frozen) == {"raynas.pooler.dense.weight", "raynas.pooler.dense.bias", "cls.bias",
                           "cls.dense.weight", "cls.dense.bias", "cls.LayerNorm.weight", "cls.LayerNorm.bias"}
    assert plain.get_input_embeddings().weight.requires_grad
