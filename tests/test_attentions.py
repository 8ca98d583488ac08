"""Attention probabilities (``output_attentions``) for attention-map distillation.

Supernet active path == extracted model == exported plain BERT (eager), and the
explicit-attention path computes what the SDPA path computes.
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import batch, tiny_supernet
from transformers import BertForMaskedLM

from raynas.export import export_model
from raynas.spaces.ops import MHA
from raynas.supernet.elastic import _head_index

KINDS = ["mlm", "kd", "layerwise"]
N_ARCHS = 8


def mha_specs(ops) -> list[MHA]:
    return [op for op in ops if isinstance(op, MHA)]


@pytest.mark.parametrize("kind", KINDS)
def test_supernet_attentions_equal_extracted_model(kind):
    net = tiny_supernet(kind).eval()
    rng = random.Random(5)
    ids, mask = batch(2)
    seq = ids.shape[1]
    pad = ~mask.bool()
    for _ in range(N_ARCHS):
        arch = net.sample_active(rng)
        specs = mha_specs(net.active_ops)
        model = net.extract(arch)
        with torch.no_grad():
            got = net(ids, mask, output_attentions=True)
            plain = net(ids, mask)
            want = model(input_ids=ids, attention_mask=mask, output_attentions=True)
            want_plain = model(input_ids=ids, attention_mask=mask)
        assert plain.attentions is None and want_plain.attentions is None
        assert len(got.attentions) == len(want.attentions) == len(specs), arch
        for a, b, spec in zip(got.attentions, want.attentions, specs, strict=True):
            assert a.shape == (ids.shape[0], spec.heads, seq, seq)
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=f"{arch}")
            torch.testing.assert_close(a.sum(-1), torch.ones_like(a.sum(-1)), atol=1e-5, rtol=0)
            assert a[pad[:, None, None, :].expand_as(a)].abs().max() < 1e-12  # padded keys get nothing
        # the explicit path computes what SDPA computes
        torch.testing.assert_close(got.logits, plain.logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(got.last_hidden_state, plain.last_hidden_state, atol=1e-5, rtol=0)
        torch.testing.assert_close(want.logits, want_plain.logits, atol=1e-5, rtol=0)


def test_no_mask_and_base_model_attentions():
    net = tiny_supernet("layerwise").eval()
    net.set_active("48:mha48,ffn64,conv3_16,id,mha16,ffn32")
    ids, _ = batch(3)
    model = net.extract()
    with torch.no_grad():
        got = net(ids, output_attentions=True).attentions
        base = model.raynas(ids, output_attentions=True)
        ref = model.raynas(ids)
    assert [a.shape[1] for a in got] == [3, 1]
    for a, b in zip(got, base.attentions, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    torch.testing.assert_close(base.last_hidden_state, ref.last_hidden_state, atol=1e-5, rtol=0)


def test_training_mode_probs_are_before_dropout():
    """Dropout applies to the probs used for the context, not to the returned ones."""
    net = tiny_supernet("mlm", dropout=0.5).train()
    net.set_active("2-32-64-2-32")
    ids, mask = batch()
    probs = net(ids, mask, output_attentions=True).attentions
    for a in probs:
        torch.testing.assert_close(a.sum(-1), torch.ones_like(a.sum(-1)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind, arch", [
    ("mlm", "2-32-64-2-32"), ("mlm", "3-48-128-3-48"), ("kd", "2-64-40-4-64"),
    ("layerwise", "48:mha48,ffn64,id,mha48,ffn64,id"),
])
def test_exported_bert_eager_attentions_match(kind, arch, tmp_path, tokenizer):
    net = tiny_supernet(kind).eval()
    net.set_active(arch)
    ids, mask = batch(4)
    model = net.extract()
    exported = export_model(model, tmp_path / "m", tokenizer)
    assert exported.model_type == "bert", arch
    bert = BertForMaskedLM.from_pretrained(exported.path, attn_implementation="eager", output_attentions=True).eval()
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask, output_attentions=True)
        theirs = bert(input_ids=ids, attention_mask=mask)
    assert len(theirs.attentions) == len(ours.attentions) == len(mha_specs(net.active_ops))
    for a, b in zip(ours.attentions, theirs.attentions, strict=True):  # padded query rows included
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    real = mask.bool()
    torch.testing.assert_close(ours.logits[real], theirs.logits[real], atol=1e-5, rtol=0)


def _attention_loss(attentions) -> torch.Tensor:
    return sum(a.pow(2).sum() for a in attentions)


@pytest.mark.parametrize("kind, arch", [("mlm", "2-32-64-2-32"), ("kd", "2-36-40-4-24"),
                                        ("layerwise", "48:mha32,ffn64,id,mha16,conv5_16,id")])
def test_gradient_flows_through_probs_to_query_and_key(kind, arch):
    net = tiny_supernet(kind, dropout=0.0).train()
    net.set_active(arch)
    ids, mask = batch(1)
    d = net.active_hidden
    _attention_loss(net(ids, mask, output_attentions=True).attentions).backward()
    model = net.extract(arch).train()
    _attention_loss(model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions).backward()
    mha_layers = [i for i, op in enumerate(net.active_ops) if isinstance(op, MHA)]
    for i in mha_layers:
        spec, elastic, plain = net.active_ops[i], net.layers[i].ops["mha"], model.raynas.layers[i]
        rows = _head_index(spec.heads, spec.head_dim, elastic.largest.head_dim)
        for name in ("query", "key"):
            grad = getattr(elastic, name).weight.grad
            active = grad.index_select(0, rows)[:, :d]
            assert active.abs().sum() > 0, (arch, i, name)
            torch.testing.assert_close(active, getattr(plain, name).weight.grad, atol=1e-6, rtol=1e-4)
            outside = grad.clone()
            outside[rows.unsqueeze(1), torch.arange(d)] = 0
            assert outside.abs().sum() == 0, (arch, i, name)
    # the probs do not depend on the last MHA's values
    last = net.layers[mha_layers[-1]].ops["mha"].value.weight.grad
    assert last is None or last.abs().sum() == 0
