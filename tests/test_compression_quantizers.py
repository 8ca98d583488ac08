"""Quantizers: the int grid, fake quantization's STE, k-means sharing, and the QAT / k-means training hooks."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from raynas.compression.encoding import compressible_modules, int_range
from raynas.compression.quantizers import (
    QAT,
    KMeansSettings,
    KMeansSharing,
    QATSettings,
    apply_encoded,
    encode_weights,
    fake_quant_activation,
    fake_quant_int,
    kmeans_encode,
    quantize_int,
    zero_mask,
)
from raynas.errors import ConfigError

CPU = torch.device("cpu")


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


def data(seed: int = 0, size: int = 4, seq: int = 10) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1, 100, (size, seq), generator=g),
            "labels": torch.randint(0, 2, (size,), generator=g)}


def logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"]).logits
    model.train()
    return out


def train(model, hooks, steps: int, start: int = 0, optimizer=None):
    optimizer = optimizer or torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(start, steps):
        model(**data(step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        hooks.after_step(step + 1)
    return optimizer


def prune(model, fraction: float = 0.6) -> None:
    """Zero the smallest ``fraction`` of the first FFN weight, as a pruned checkpoint has it."""
    w = model.bert.encoder.layer[0].intermediate.dense.weight
    with torch.no_grad():
        w.mul_(w.abs() > w.abs().flatten().kthvalue(int(fraction * w.numel())).values)


# ---- int ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_int_codes_in_range_and_error_within_half_a_step(bits):
    w = torch.randn(16, 24)
    w[3] = 0.0
    enc = quantize_int(w, bits)
    q = int_range(bits)
    assert enc.codes.dtype == torch.int8 and enc.codes.abs().max() <= q
    assert enc.scale is not None and enc.scale.dtype == torch.float32 and enc.scale[3] == 1.0
    assert torch.allclose(enc.scale[:3], w[:3].abs().amax(1) / q)
    err = (enc.dequantize() - w).abs()
    assert (err <= enc.scale[:, None] / 2 + 1e-6).all()
    assert (enc.dequantize()[3] == 0).all()


def test_int8_of_a_dequantized_int8_weight_gives_the_same_codes():
    w = torch.randn(32, 40)
    first = quantize_int(w, 8)
    again = quantize_int(first.dequantize(), 8)
    assert torch.equal(first.codes, again.codes)
    assert torch.allclose(first.scale, again.scale, rtol=1e-6)


def test_int_mask_zeroes_pruned_entries_and_scales_from_kept_ones():
    w = torch.randn(8, 12)
    mask = torch.rand(8, 12) > 0.5
    enc = quantize_int(w, 4, mask)
    assert (enc.codes[~mask] == 0).all() and torch.equal(enc.mask, mask)
    assert (enc.dequantize()[~mask] == 0).all()
    assert torch.allclose(enc.scale, (w * mask).abs().amax(1) / int_range(4))


def test_fake_quant_equals_quantize_int_and_its_gradient_is_the_identity():
    w = torch.randn(12, 20, requires_grad=True)
    for bits in (2, 4, 8):
        out = fake_quant_int(w, bits)
        assert torch.equal(out, quantize_int(w, bits).dequantize())
        g = torch.randn_like(out)
        (grad,) = torch.autograd.grad(out, w, g)
        assert torch.equal(grad, g)


def test_activation_fake_quant_is_on_a_256_level_grid_with_exact_zero():
    x = torch.randn(4, 7, 16) + 0.5
    x[0, 0, 0] = 0.0
    x.requires_grad_(True)
    out = fake_quant_activation(x, 8)
    step = (x.max().clamp(min=0) - x.min().clamp(max=0)) / 255
    assert out[0, 0, 0] == 0 and out.unique().numel() <= 256
    assert ((out - x).abs() <= step / 2 + 1e-6).all()
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(grad, torch.ones_like(x))


# ---- k-means -------------------------------------------------------------------------------------
def test_kmeans_values_error_and_determinism():
    w = torch.randn(64, 48)
    errors = []
    for bits in (1, 2, 3, 4, 6):
        enc = kmeans_encode(w, bits)
        assert enc.codes.dtype == torch.uint8 and int(enc.codes.max()) < 2 ** bits
        assert enc.dequantize().unique().numel() <= 2 ** bits
        assert torch.all(enc.codebook[1:] >= enc.codebook[:-1])  # sorted
        errors.append(float((enc.dequantize() - w).pow(2).mean()))
    assert all(a > b for a, b in zip(errors, errors[1:]))
    again = kmeans_encode(w, 3)
    assert torch.equal(again.codes, kmeans_encode(w, 3).codes) and torch.equal(again.codebook, kmeans_encode(w, 3).codebook)


def test_kmeans_lloyd_improves_on_the_linear_init_and_codes_are_the_nearest_centroid():
    w = torch.randn(40, 50)
    init = kmeans_encode(w, 3, iters=0)
    assert torch.allclose(init.codebook, torch.linspace(float(w.min()), float(w.max()), 8))
    fit = kmeans_encode(w, 3)
    assert (fit.dequantize() - w).pow(2).mean() < (init.dequantize() - w).pow(2).mean()
    nearest = (w[..., None] - fit.codebook).abs().argmin(-1)
    assert torch.equal(fit.codebook[nearest], fit.dequantize())


def test_kmeans_mask_keeps_zeros_and_empty_clusters_keep_their_centroid():
    w = torch.randn(20, 30)
    mask = torch.rand(20, 30) > 0.4
    w_big = w.clone()
    w_big[~mask] = 100.0  # pruned entries must not pull a centroid
    enc = kmeans_encode(w_big, 2, mask)
    assert (enc.dequantize()[~mask] == 0).all() and enc.codebook.abs().max() < 10
    # two tight groups at +-1 with 3 bits: the linear init leaves the middle centroids empty
    two = torch.tensor([-1.0, -1.0, 1.0, 1.0]).repeat(5, 1)
    enc = kmeans_encode(two, 3)
    assert enc.codebook[0] == -1 and enc.codebook[-1] == 1
    assert torch.allclose(enc.codebook[1:-1], torch.linspace(-1, 1, 8)[1:-1])


def test_zero_mask_only_when_it_pays_for_itself():
    w = torch.randn(10, 10)
    w[0, :5] = 0  # 5 zeros x 4 bits < 100 entries
    assert zero_mask(w, 4) is None
    w[:3] = 0  # 30 zeros x 4 bits > 100
    assert torch.equal(zero_mask(w, 4), w != 0)


def test_apply_encoded_gives_what_the_dequantized_weights_compute():
    model = tiny_bert()
    prune(model)
    encs = encode_weights(model, "kmeans", 3)
    assert set(encs) == set(compressible_modules(model))
    ffn = "bert.encoder.layer.0.intermediate.dense"
    assert encs[ffn].mask is not None and encs["bert.pooler.dense"].mask is None
    apply_encoded(model, encs)
    for name, module in compressible_modules(model).items():
        assert torch.equal(module.weight, encs[name].dequantize())
    with pytest.raises(ConfigError, match="no module"):
        apply_encoded(model, {"bert.nope": encs[ffn]})


# ---- QAT -----------------------------------------------------------------------------------------
def test_qat_trains_and_encoded_computes_what_the_parametrized_model_computes():
    model = tiny_bert()
    prune(model)
    ffn = model.bert.encoder.layer[0].intermediate.dense
    zeros = ffn.weight == 0
    pooler = model.bert.pooler.dense
    with torch.no_grad():
        pooler.weight[0, :3] = 0  # a few zeros: kept in training, stored as code 0 (a mask would cost more)
    hooks = QAT(QATSettings(bits=4))
    assert hooks.prepare(model, 5, CPU) is model
    before = copy.deepcopy(model.state_dict())
    train(model, hooks, 3)
    assert not torch.equal(before["bert.pooler.dense.parametrizations.weight.original"],
                           model.state_dict()["bert.pooler.dense.parametrizations.weight.original"])
    assert (ffn.weight[zeros] == 0).all()  # the pruned entries stay pruned
    encs = hooks.encoded()
    assert encs["bert.encoder.layer.0.intermediate.dense"].mask is not None
    assert encs["bert.pooler.dense"].mask is None and (encs["bert.pooler.dense"].codes[0, :3] == 0).all()
    assert (pooler.weight[0, :3] == 0).all()
    assert all(e.scheme == "int" and e.bits == 4 for e in encs.values())
    plain = tiny_bert()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if ".parametrizations." not in k}, strict=False)
    apply_encoded(plain, encs)
    batch = data(9)
    expected = logits(model, batch)
    assert torch.equal(logits(plain, batch), expected)
    removed = hooks.remove()
    assert not hasattr(ffn, "parametrizations") and ffn.weight.requires_grad
    assert torch.equal(logits(model, batch), expected)
    assert all(torch.equal(removed[n].codes, encs[n].codes) for n in encs)
    assert hooks.status()["weight_bits"] == 4


def test_qat_activation_quantization_changes_the_forward_until_removed():
    model = tiny_bert()
    batch = data(1)
    weights_only = QAT(QATSettings(bits=8))
    plain = weights_only.prepare(copy.deepcopy(model), 1, CPU)
    hooks = QAT(QATSettings(bits=8, activation_bits=8, embeddings=False))
    model = hooks.prepare(model, 1, CPU)
    assert "bert.embeddings.word_embeddings" not in hooks.encoded()
    with_act = logits(model, batch)
    assert not torch.equal(with_act, logits(plain, batch))
    assert torch.allclose(with_act, logits(plain, batch), atol=0.05)
    train(model, hooks, 1)
    hooks.remove()
    assert not model.bert.pooler.dense._forward_pre_hooks


# ---- k-means sharing hooks -----------------------------------------------------------------------
def test_kmeans_sharing_trains_only_the_codebook():
    model = tiny_bert()
    prune(model)
    hooks = KMeansSharing(KMeansSettings(bits=3))
    model = hooks.prepare(model, 5, CPU)
    param = model.bert.encoder.layer[0].intermediate.dense.parametrizations.weight
    assert not param.original.requires_grad and param[0].codebook.requires_grad
    assert param[0].mask is not None
    codes = {n: m.parametrizations.weight[0].codes.clone() for n, m in hooks.modules.items()}
    books = {n: m.parametrizations.weight[0].codebook.detach().clone() for n, m in hooks.modules.items()}
    train(model, hooks, 3)
    for name, module in hooks.modules.items():
        p = module.parametrizations.weight[0]
        assert torch.equal(p.codes, codes[name])
        assert not torch.equal(p.codebook, books[name])
        assert module.weight.unique().numel() <= 2 ** 3 + 1  # + the pruned zeros
    dense = model.bert.encoder.layer[0].intermediate.dense
    assert (dense.weight[~param[0].mask] == 0).all()
    plain = tiny_bert()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if ".parametrizations." not in k}, strict=False)
    apply_encoded(plain, hooks.encoded())
    batch = data(7)
    assert torch.equal(logits(plain, batch), logits(model, batch))
    expected = logits(model, batch)
    hooks.remove()
    assert torch.equal(logits(model, batch), expected) and dense.weight.requires_grad


def test_codebook_gradient_is_the_sum_of_its_entries_gradients():
    layer = torch.nn.Linear(6, 5)
    hooks = KMeansSharing(KMeansSettings(bits=2))

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dense = layer

    model = hooks.prepare(Wrap(), 1, CPU)
    p = model.dense.parametrizations.weight[0]
    x = torch.randn(3, 6)
    model.dense(x).pow(2).sum().backward()
    w = p.codebook.detach()[p.codes.long()].requires_grad_(True)
    torch.nn.functional.linear(x, w, model.dense.bias).pow(2).sum().backward()
    expected = torch.zeros(4).index_add_(0, p.codes.long().flatten(), w.grad.flatten())
    assert torch.allclose(p.codebook.grad, expected, atol=1e-6)


def test_kmeans_plan_and_frozen_codebook():
    model = tiny_bert()
    names = list(compressible_modules(model))
    plan = {names[0]: 2, names[1]: 5}
    hooks = KMeansSharing(KMeansSettings(bits=plan, train_codebook=False))
    model = hooks.prepare(model, 1, CPU)
    encs = hooks.encoded()
    assert {n: e.bits for n, e in encs.items()} == plan
    assert not any(p.requires_grad for n, p in model.named_parameters() if "codebook" in n)
    assert not hasattr(compressible_modules(model)[names[2]], "parametrizations")  # not in the plan: fp32


@pytest.mark.parametrize("make", [lambda: QAT(QATSettings(bits=4, activation_bits=8)),
                                  lambda: KMeansSharing(KMeansSettings(bits=3))], ids=["qat", "kmeans"])
def test_state_round_trip_resumes_identically(make):
    straight = tiny_bert()
    hooks = make()
    straight = hooks.prepare(straight, 4, CPU)
    train(straight, hooks, 4)

    first = tiny_bert()
    hooks = make()
    first = hooks.prepare(first, 4, CPU)
    opt = train(first, hooks, 2)
    saved = copy.deepcopy({"model": first.state_dict(), "opt": opt.state_dict(), "hooks": hooks.state_dict()})

    resumed = tiny_bert(seed=1)  # different init: everything must come from the checkpoint...
    resumed.load_state_dict(tiny_bert().state_dict())  # ...except the loaded base model, as the loop has it
    hooks = make()
    resumed = hooks.prepare(resumed, 4, CPU)
    resumed.load_state_dict(saved["model"])
    opt = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad], lr=1e-2)
    opt.load_state_dict(saved["opt"])
    hooks.load_state_dict(saved["hooks"])
    assert hooks.step == 2
    train(resumed, hooks, 4, start=2, optimizer=opt)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_bad_settings_raise_config_errors():
    with pytest.raises(ConfigError, match="quantize.bits"):
        QAT(QATSettings(bits=5))
    with pytest.raises(ConfigError, match="quantize.activation_bits"):
        QAT(QATSettings(activation_bits=16))
    with pytest.raises(ConfigError, match="quantize.bits"):
        KMeansSharing(KMeansSettings(bits=9))
    with pytest.raises(ConfigError, match="quantize.bits"):
        KMeansSharing(KMeansSettings(bits={"a": 0}))
    with pytest.raises(ConfigError, match="quantize.bits"):
        KMeansSharing(KMeansSettings(bits={"bert.nope": 4})).prepare(tiny_bert(), 1, CPU)
    with pytest.raises(ConfigError, match="quantize.bits"):
        quantize_int(torch.randn(2, 2), 1)
    model = QAT(QATSettings()).prepare(tiny_bert(), 1, CPU)
    with pytest.raises(ConfigError, match="already has a parametrization"):
        KMeansSharing(KMeansSettings()).prepare(model, 1, CPU)
