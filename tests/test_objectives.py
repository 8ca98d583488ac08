"""Supernet training losses: MLM, hidden / logits distillation, the teacher cache, the combined objective."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, batch, tiny_supernet
from transformers import BertConfig, BertForMaskedLM

from raynas.errors import ConfigError
from raynas.training import (
    HiddenDistillation,
    SupernetObjective,
    TeacherCache,
    TeacherOutput,
    logits_distillation,
    mlm_loss,
)

TEACHER_HIDDEN = 48


def mlm_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """conftest's padded batch plus MLM labels on a few real tokens."""
    ids, mask = batch(seed)
    g = torch.Generator().manual_seed(seed + 100)
    labels = torch.where((torch.rand(ids.shape, generator=g) < 0.3) & mask.bool(), ids, torch.full_like(ids, -100))
    labels[0, 1] = ids[0, 1]  # at least one labelled token
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def tiny_bert_teacher(seed: int = 0) -> BertForMaskedLM:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=TEACHER_HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=96, max_position_embeddings=64)
    return BertForMaskedLM(cfg)


def test_mlm_loss_matches_cross_entropy() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, :3] = -100
    ref = F.cross_entropy(logits.view(-1, 11), labels.view(-1), ignore_index=-100)
    assert torch.allclose(mlm_loss(logits, labels), ref)
    empty = mlm_loss(logits.requires_grad_(), torch.full_like(labels, -100))
    assert empty.item() == 0.0 and empty.requires_grad  # no NaN when nothing is labelled


def test_hidden_distillation_identity_and_mask() -> None:
    torch.manual_seed(0)
    loss = HiddenDistillation(16, 16)
    assert loss.proj is None
    h = torch.randn(2, 6, 16)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    assert loss(h, h.clone(), mask).item() == 0.0
    t = torch.randn(2, 6, 16)
    base = loss(h, t, mask)
    h2, t2 = h.clone(), t.clone()
    h2[1, 4:] += 100.0
    t2[1, 4:] -= 50.0
    assert torch.allclose(loss(h2, t2, mask), base)  # padded positions do not count
    assert not torch.allclose(loss(h2, t2), base)  # ... unless no mask is given
    ref = ((h - t).pow(2).mean(-1) * mask).sum() / mask.sum()
    assert torch.allclose(base, ref)


def test_hidden_distillation_projection_slices_per_width() -> None:
    torch.manual_seed(0)
    loss = HiddenDistillation(64, TEACHER_HIDDEN)
    assert loss.proj.weight.shape == (TEACHER_HIDDEN, 64)
    teacher = torch.randn(2, 5, TEACHER_HIDDEN)
    for d_s in (32, 52):
        loss.zero_grad()
        student = torch.randn(2, 5, d_s, requires_grad=True)
        value = loss(student, teacher)
        ref = F.mse_loss(F.linear(student, loss.proj.weight[:, :d_s], loss.proj.bias), teacher)
        assert torch.allclose(value, ref)
        value.backward()
        grad = loss.proj.weight.grad
        assert grad[:, :d_s].abs().sum() > 0 and grad[:, d_s:].abs().sum() == 0
        assert loss.proj.bias.grad.abs().sum() > 0 and student.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        loss(torch.randn(2, 5, 68), teacher)


def test_hidden_distillation_without_projection_uses_teacher_prefix() -> None:
    loss = HiddenDistillation(64, 64, project=False)
    t = torch.randn(1, 3, 64)
    assert loss(t[..., :40].clone(), t).item() == 0.0
    with pytest.raises(ConfigError):
        HiddenDistillation(64, 48, project=False)


def test_logits_distillation() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(2, 4, 9), torch.randn(2, 4, 9)
    assert logits_distillation(t, t.clone(), 2.0).abs().item() < 1e-6
    mask = torch.tensor([[1, 0, 1, 0], [0, 0, 1, 1]])
    temp = 2.0
    ls, lt = F.log_softmax(s / temp, -1), F.log_softmax(t / temp, -1)
    kl = (lt.exp() * (lt - ls)).sum(-1)
    ref = kl[mask.bool()].mean() * temp**2
    assert torch.allclose(logits_distillation(s, t, temp, mask), ref)
    ref_all = F.kl_div(ls.view(-1, 9), lt.view(-1, 9), log_target=True, reduction="batchmean") * temp**2
    assert torch.allclose(logits_distillation(s, t, temp), ref_all)


def test_teacher_cache_runs_teacher_once_per_batch() -> None:
    teacher = tiny_bert_teacher()
    calls: list[int] = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    cache = TeacherCache(teacher)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    net = tiny_supernet("kd", dropout=0.0)
    objective = SupernetObjective("kd", student_width=net.space.max_hidden, teacher_width=TEACHER_HIDDEN,
                                  teacher=cache)
    b1, b2 = mlm_batch(0), mlm_batch(1)
    first = cache(b1)
    assert first.last_hidden_state.shape == (3, 12, TEACHER_HIDDEN) and first.logits.shape == (3, 12, VOCAB)
    for arch in ("1-32-16-4-16", "2-48-64-4-32", "3-64-128-4-64"):
        net.set_active(arch)
        objective(net, b1)
    assert len(calls) == 1 and cache.calls == 1 and cache(b1) is first
    cache(b2)
    assert len(calls) == 2
    ref = teacher(input_ids=b2["input_ids"], attention_mask=b2["attention_mask"], output_hidden_states=True)
    assert torch.allclose(cache(b2).last_hidden_state, ref.hidden_states[-1])


def test_teacher_cache_with_raynas_model() -> None:
    net = tiny_supernet("mlm", dropout=0.0)
    model = net.extract("2-40-64-2-32")
    out = TeacherCache(model)(mlm_batch())
    assert out.last_hidden_state.shape == (3, 12, 40) and out.logits.shape == (3, 12, VOCAB)


def test_kd_objective_backprops_into_active_weights_and_projection() -> None:
    net = tiny_supernet("kd", dropout=0.0)
    objective = SupernetObjective("kd", student_width=net.space.max_hidden, teacher_width=TEACHER_HIDDEN,
                                  logits_weight=1.0, mlm_weight=0.5, teacher=TeacherCache(tiny_bert_teacher()))
    net.set_active("2-40-64-4-32")
    loss, metrics = objective(net, mlm_batch())
    assert torch.isfinite(loss) and set(metrics) == {"loss", "hidden", "logits", "mlm"}
    assert metrics["loss"] == pytest.approx(metrics["hidden"] + metrics["logits"] + metrics["mlm"], rel=1e-5)
    loss.backward()
    word = net.embeddings.word_embeddings.weight.grad
    assert word[:, :40].abs().sum() > 0 and word[:, 40:].abs().sum() == 0
    proj = objective.hidden.proj.weight.grad
    assert proj[:, :40].abs().sum() > 0 and proj[:, 40:].abs().sum() == 0
    assert any(p is objective.hidden.proj.weight for p in objective.parameters())


def test_kd_steps_reduce_loss() -> None:
    net = tiny_supernet("kd", dropout=0.0)
    torch.manual_seed(0)
    objective = SupernetObjective("kd", student_width=net.space.max_hidden, teacher_width=TEACHER_HIDDEN,
                                  logits_weight=1.0, teacher=TeacherCache(tiny_bert_teacher()))
    opt = torch.optim.Adam([*net.parameters(), *objective.parameters()], lr=3e-3)
    net.set_active("2-48-64-4-32")
    b = mlm_batch()
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss, _ = objective(net, b)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_mlm_objective_with_inplace_distillation() -> None:
    net = tiny_supernet("mlm", dropout=0.0)
    b = mlm_batch()
    objective = SupernetObjective("mlm", logits_weight=1.0)
    net.set_active(net.space.largest())
    loss, metrics = objective(net, b)
    assert set(metrics) == {"loss", "mlm"}  # no teacher_out: the largest runs on MLM alone
    target = TeacherOutput.detached(net(b["input_ids"], b["attention_mask"]))
    net.set_active(net.space.smallest())
    loss, metrics = objective(net, b, target)
    assert set(metrics) == {"loss", "mlm", "logits"} and torch.isfinite(loss)
    loss.backward()


def test_objective_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown objective"):
        SupernetObjective("attn")
    with pytest.raises(ConfigError, match="student_width"):
        SupernetObjective("kd")
    with pytest.raises(ConfigError, match="every loss weight"):
        SupernetObjective("kd", hidden_weight=0.0)
    net = tiny_supernet("kd", dropout=0.0)
    with pytest.raises(ConfigError, match="TeacherCache"):
        SupernetObjective("kd", student_width=64, teacher_width=48)(net, mlm_batch())


def _count_calls(module: torch.nn.Module) -> list[int]:
    calls: list[int] = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("kind", ["supernet", "bert"])
def test_kd_loss_skips_the_mlm_heads_with_identical_values(kind: str) -> None:
    """Hidden + attention KD reads no logits: neither the student's nor the teacher's MLM head runs, same loss."""
    if kind == "supernet":
        net = tiny_supernet("kd", dropout=0.0).eval()
        net.set_active("2-40-64-4-32")
        width, head = net.space.max_hidden, net.cls
    else:
        torch.manual_seed(3)
        net = BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                         intermediate_size=64, max_position_embeddings=64,
                                         attn_implementation="eager")).eval()
        width, head = 32, net.cls
    teacher = tiny_bert_teacher()
    teacher.set_attn_implementation("eager")
    student_head, teacher_head = _count_calls(head), _count_calls(teacher.cls)
    lean = SupernetObjective("kd", student_width=width, teacher_width=TEACHER_HIDDEN, attention_weight=1.0,
                             teacher=TeacherCache(teacher, output_attentions=True, logits=False))
    assert not lean.needs_logits
    b = mlm_batch()
    loss, metrics, out = lean(net, b, return_output=True)
    assert student_head == [] and teacher_head == [] and getattr(out, "logits", None) is None
    assert set(metrics) == {"loss", "hidden", "attention"}

    full = SupernetObjective("kd", student_width=width, teacher_width=TEACHER_HIDDEN, attention_weight=1.0,
                             teacher=TeacherCache(teacher, output_attentions=True))
    full.load_state_dict(lean.state_dict())  # the same projection
    full.needs_logits = True  # as before: both heads run, nothing reads them
    ref, ref_metrics = full(net, b)
    assert len(student_head) == 1 and len(teacher_head) == 1
    assert torch.equal(loss, ref) and metrics == ref_metrics


def test_needs_logits_follows_the_terms_that_read_them() -> None:
    assert SupernetObjective("mlm").needs_logits  # MLM loss
    assert SupernetObjective("mlm", mlm_weight=0.0, logits_weight=1.0).needs_logits  # in-place targets
    assert SupernetObjective("kd", student_width=8, teacher_width=8, logits_weight=0.5).needs_logits
    assert SupernetObjective("kd", student_width=8, teacher_width=8, mlm_weight=0.5).needs_logits
    assert not SupernetObjective("kd", student_width=8, teacher_width=8, attention_weight=1.0).needs_logits


def test_teacher_cache_without_logits_same_hidden_states() -> None:
    teacher = tiny_bert_teacher()
    b = mlm_batch()
    lean, full = TeacherCache(teacher, logits=False)(b), TeacherCache(teacher)(b)
    assert lean.logits is None and full.logits.shape == (3, 12, VOCAB)
    assert torch.equal(lean.last_hidden_state, full.last_hidden_state)
