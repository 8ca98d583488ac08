"""Exactness: supernet active path == extracted model == saved and reloaded model."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from conftest import batch, tiny_supernet
from transformers import (
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
)

from raynas.export import export_model

N_ARCHS = 50


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kind", ["mlm", "kd", "layerwise"])
def test_active_path_equals_extracted_saved_reloaded(kind, tmp_path, tokenizer):
    net = tiny_supernet(kind).eval()
    space, rng = net.space, random.Random(7)
    ids, mask = batch()
    real = mask.bool()
    seen_types = set()
    for i in range(N_ARCHS):
        arch = net.sample_active(rng)
        with torch.no_grad():
            ref = net(ids, mask)
        exported = export_model(net.extract(), tmp_path / f"m{i}", tokenizer)
        seen_types.add(exported.model_type)
        mlm = AutoModelForMaskedLM.from_pretrained(exported.path).eval()
        base = AutoModel.from_pretrained(exported.path).eval()
        with torch.no_grad():
            logits = mlm(input_ids=ids, attention_mask=mask).logits
            out = base(input_ids=ids, attention_mask=mask)
        torch.testing.assert_close(logits[real], ref.logits[real], atol=1e-5, rtol=0, msg=f"{arch} logits")
        torch.testing.assert_close(out.last_hidden_state[real], ref.last_hidden_state[real], atol=1e-5, rtol=0)
        torch.testing.assert_close(out.pooler_output, ref.pooler_output, atol=1e-5, rtol=0)
        assert n_params(base) == space.params(arch, "base"), arch
        assert n_params(mlm) == space.params(arch, "mlm"), arch
    if kind != "layerwise":  # random homogeneous archs hit both formats
        assert seen_types == {"bert", "raynas"}


@pytest.mark.parametrize("kind", ["mlm", "layerwise"])
def test_task_heads_param_counts(kind, tmp_path):
    net = tiny_supernet(kind)
    rng = random.Random(3)
    for i in range(4):
        arch = net.sample_active(rng)
        path = export_model(net.extract(), tmp_path / f"m{i}").path
        cls = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)
        qa = AutoModelForQuestionAnswering.from_pretrained(path)
        assert n_params(cls) == net.space.params(arch, "cls", num_labels=3)
        assert n_params(qa) == net.space.params(arch, "qa")


def _gradients_as_weights(net: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``net`` whose weights are its gradients (0 where None)."""
    grads = copy.deepcopy(net)
    with torch.no_grad():
        for p, g in zip(net.parameters(), grads.parameters(), strict=True):
            g.copy_(p.grad if p.grad is not None else torch.zeros_like(p))
    return grads


@pytest.mark.parametrize("kind", ["mlm", "kd", "layerwise"])
def test_gradients_of_active_path_equal_extracted_model(kind):
    """Training sees the same function: gradients of the active slice match the standalone model's."""
    net = tiny_supernet(kind, dropout=0.0).train()
    ids, mask = batch(1)
    labels = ids.masked_fill(mask == 0, -100)
    rng = random.Random(11)
    for _ in range(5):
        net.zero_grad(set_to_none=True)
        arch = net.sample_active(rng)
        net(ids, mask, labels=labels).loss.backward()
        model = net.extract(arch).train()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        # every active weight: the supernet's gradients, sliced by extraction itself, against the model's
        sliced = _gradients_as_weights(net).extract(arch).state_dict()
        params = dict(model.named_parameters())
        assert params, arch
        for name, p in params.items():
            want = p.grad if p.grad is not None else torch.zeros_like(p)
            torch.testing.assert_close(sliced[name], want, atol=1e-5, rtol=1e-4, msg=f"{arch} {name}")
        # nothing outside the active width received gradient
        assert net.embeddings.word_embeddings.weight.grad[:, net.active_hidden:].abs().sum() == 0


def test_inactive_layers_get_no_gradient():
    net = tiny_supernet("mlm").train()
    net.set_active("1-32-16-1-16")
    ids, mask = batch()
    net(ids, mask, labels=ids).loss.backward()
    inactive = list(net.layers[2:].parameters())
    assert len(inactive) > 0 and all(p.grad is None for p in inactive)
    ffn = net.layers[1].ops["ffn"].intermediate.weight.grad
    assert ffn[16:].abs().sum() == 0 and ffn[:16, 32:].abs().sum() == 0 and ffn[:16, :32].abs().sum() > 0


def test_kd_strategy_takes_first_dims_of_every_head():
    """Strategy 'dims' (paper Fig. 3c): all heads kept, each truncated, not the first heads whole."""
    net = tiny_supernet("kd")
    model = net.extract("1-32-16-4-32")  # 4 heads x 8 dims from 4 heads x 16
    q_super = net.layers[0].ops["mha"].query.weight
    q_model = model.raynas.layers[0].query.weight
    for head in range(4):
        torch.testing.assert_close(q_model[head * 8:(head + 1) * 8], q_super[head * 16: head * 16 + 8, :32])


def test_sequence_classification_forward_and_loss(tmp_path):
    net = tiny_supernet("layerwise")
    path = export_model(net.extract(), tmp_path / "m").path
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    ids, mask = batch()
    out = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 1]))
    assert out.logits.shape == (3, 2) and torch.isfinite(out.loss)


def test_padding_row_starts_zero_and_lookup_sends_it_no_gradient():
    net = tiny_supernet("mlm").train()
    assert net.embeddings.word_embeddings.weight[0].abs().sum() == 0
    ids, mask = batch()
    net(ids, mask).last_hidden_state.sum().backward()  # lookup only: the tied decoder is not used
    grad = net.embeddings.word_embeddings.weight.grad
    assert grad[0].abs().sum() == 0 and grad[ids[0, 0]].abs().sum() > 0
