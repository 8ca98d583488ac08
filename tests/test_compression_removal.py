"""Exact physical removal of pruned heads / neurons (raynas.compression.removal).

The gated reference applies the gate semantics of the design with plain hooks on ``dense`` /
``output``: a forward pre-hook scales the projection's input by the unit gates, a forward hook
scales its output by the block gate. The removed model must compute the same within 1e-5.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import batch
from transformers import AutoModelForSequenceClassification

import raynas  # noqa: F401  (registers the raynas model type with the Auto classes)
from raynas.compression.removal import layer_sizes, magnitude_scores, remove_pruned
from raynas.errors import ConfigError
from raynas.models import (
    RaynasConfig,
    RaynasForMaskedLM,
    RaynasForQuestionAnswering,
    RaynasForSequenceClassification,
    RaynasModel,
)
from raynas.models.modeling_raynas import RaynasAttention, RaynasEmptyBlock, RaynasFeedForward
from raynas.spaces.ops import FFN, MHA, Identity, SepConv, encoder_params

HIDDEN = 32
OPS = [MHA(4, 8), FFN(48), SepConv(3, 16), MHA(4, 8), FFN(48), Identity(), MHA(2, 8), FFN(48)]
GATED = [0, 1, 3, 4, 6, 7]  # the MHA / FFN op-layers


def tiny(cls=RaynasForSequenceClassification, seed: int = 0, **kw):
    """A seeded tiny model with large random weights and biases (so every gate visibly matters), eval mode."""
    labels = {"num_labels": 3, "id2label": {0: "neg", 1: "mid", 2: "pos"}, "label2id": {"neg": 0, "mid": 1, "pos": 2},
              "problem_type": "single_label_classification"} if cls is RaynasForSequenceClassification else {}
    config = RaynasConfig(vocab_size=100, hidden_size=HIDDEN, layers=[op.to_dict() for op in OPS],
                          max_position_embeddings=64, **labels)
    torch.manual_seed(seed)
    model = cls(config, **kw)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith("LayerNorm.weight") else 0.0))
    return model.eval()


def n_units(op) -> int:
    return op.heads if isinstance(op, MHA) else op.inner


def random_units(seed: int, zero_frac: float = 0.3) -> dict[int, torch.Tensor]:
    """Gate values in (0, 1] with about ``zero_frac`` exact zeros (at least one per layer)."""
    g = torch.Generator().manual_seed(seed)
    units = {}
    for i in GATED:
        n = n_units(OPS[i])
        z = torch.rand(n, generator=g) * 0.9 + 0.1
        zero = torch.rand(n, generator=g) < zero_frac
        zero[torch.randint(n, (1,), generator=g)] = True
        units[i] = torch.where(zero, torch.zeros(n), z)
    return units


@contextlib.contextmanager
def gated(model, units, block=None):
    """The design's gate semantics on ``model`` through hooks on ``dense`` / ``output``, removed on exit."""
    block = block or {}
    layers = (model if isinstance(model, RaynasModel) else model.raynas).layers
    handles = []
    for i in set(units) | set(block):
        layer = layers[i]
        proj = layer.dense if isinstance(layer, RaynasAttention) else layer.output
        if i in units:
            z = units[i].repeat_interleave(layer.spec.head_dim) if isinstance(layer, RaynasAttention) else units[i]
            handles.append(proj.register_forward_pre_hook(lambda mod, args, z=z: (args[0] * z.to(args[0].dtype),)))
        b = block.get(i, 1.0)
        handles.append(proj.register_forward_hook(lambda mod, args, out, b=b: out * b))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def outputs(model, ids, mask) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    heads = [out.logits] if hasattr(out, "logits") and out.logits is not None else [out.start_logits, out.end_logits]
    return [*heads, *out.hidden_states]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b)
    return max((x - y).abs().max().item() for x, y in zip(a, b))


CASES = {
    "random": lambda: (random_units(1), {0: 0.7, 4: 0.9}),
    "mha_layer_zero": lambda: ({**random_units(2), 3: torch.zeros(4)}, None),
    "ffn_layer_zero": lambda: ({**random_units(3), 1: torch.zeros(48)}, {1: 0.6}),
    "block_zero": lambda: (random_units(4), {0: 0.0, 7: 0.0}),
    "block_half": lambda: (random_units(5, zero_frac=0.1), {i: 0.5 for i in GATED}),
}


@pytest.mark.parametrize("cls", [RaynasForSequenceClassification, RaynasForQuestionAnswering])
@pytest.mark.parametrize("case", sorted(CASES))
def test_removed_model_computes_the_gated_model(cls, case):
    model = tiny(cls)
    units, block = CASES[case]()
    ids, mask = batch(seq=16)
    assert (mask == 0).any()
    plain = outputs(model, ids, mask)
    with gated(model, units, block):
        reference = outputs(model, ids, mask)
    assert max_diff(plain, reference) > 1e-2  # the gates change what the model computes

    removed = remove_pruned(model, units, block)
    assert type(removed) is cls and not removed.training
    assert max_diff(outputs(removed, ids, mask), reference) <= 1e-5

    block = block or {}
    for i, op in enumerate(removed.config.ops):
        if i not in units:
            assert op == OPS[i]
            continue
        kept = int((units[i] > 0).sum()) if block.get(i, 1.0) > 0 else 0
        assert n_units(op) == kept
        assert isinstance(removed.raynas.layers[i], RaynasEmptyBlock) == (kept == 0)


def test_empty_blocks_hold_the_scaled_bias_and_are_not_the_identity():
    model = tiny()
    units = {3: torch.zeros(4), 1: torch.zeros(48), 4: torch.ones(48)}
    removed = remove_pruned(model, units, {1: 0.25, 4: 0.0})
    assert [removed.config.ops[i] for i in (1, 3, 4)] == [FFN(0), MHA(0, 8), FFN(0)]
    torch.testing.assert_close(removed.raynas.layers[1].bias, 0.25 * model.raynas.layers[1].output.bias)
    torch.testing.assert_close(removed.raynas.layers[3].bias, model.raynas.layers[3].dense.bias)
    assert removed.raynas.layers[4].bias.abs().max() == 0  # block 0: LayerNorm(x)
    x = torch.randn(2, 5, HIDDEN)
    with torch.no_grad():
        for i in (1, 3, 4):  # LayerNorm(x + b), which is not x
            assert (removed.raynas.layers[i](x, None, None) - x).abs().max() > 0.1


def test_all_ones_leaves_the_model_unchanged():
    model = tiny(RaynasForQuestionAnswering)
    removed = remove_pruned(model, {i: torch.ones(n_units(OPS[i])) for i in GATED}, {i: 1.0 for i in GATED})
    assert removed is not model and removed.config.layers == model.config.layers
    before, after = model.state_dict(), removed.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
        assert after[key].data_ptr() != value.data_ptr(), key  # a copy, not shared storage
    ids, mask = batch()
    assert max_diff(outputs(removed, ids, mask), outputs(model, ids, mask)) == 0


def test_analytic_encoder_params_count_the_removed_model():
    model = tiny()
    units = {**random_units(6), 3: torch.zeros(4), 7: torch.zeros(48)}
    removed = remove_pruned(model, units, {0: 0.0})
    counted = sum(p.numel() for p in removed.raynas.layers.parameters())
    assert counted == encoder_params(HIDDEN, removed.config.ops)
    assert counted < sum(p.numel() for p in model.raynas.layers.parameters())
    assert sum(isinstance(layer, RaynasEmptyBlock) for layer in removed.raynas.layers) == 3


def test_save_and_reload_with_auto_classes(tmp_path):
    model = tiny()
    units, block = CASES["random"]()
    removed = remove_pruned(model, units, {**block, 3: 0.0})
    removed.save_pretrained(tmp_path)
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert type(again) is RaynasForSequenceClassification
    assert again.config.layers == removed.config.layers != model.config.layers
    assert again.config.id2label == {0: "neg", 1: "mid", 2: "pos"} and again.config.num_labels == 3
    assert again.config.problem_type == "single_label_classification"
    ids, mask = batch()
    assert max_diff(outputs(again, ids, mask), outputs(removed, ids, mask)) == 0


@pytest.mark.parametrize("cls, pooler", [(RaynasModel, True), (RaynasModel, False),
                                         (RaynasForMaskedLM, False), (RaynasForMaskedLM, True)])
def test_base_and_mlm_models_keep_their_class_pooler_and_tied_weights(cls, pooler):
    model = tiny(cls, add_pooling_layer=pooler)
    base = model if cls is RaynasModel else model.raynas
    units = random_units(7)
    ids, mask = batch()

    def run(m):
        b = m if cls is RaynasModel else m.raynas
        with torch.no_grad():
            out = m(input_ids=ids, attention_mask=mask)
            pooled = b(input_ids=ids, attention_mask=mask).pooler_output if pooler else None
        return [out.last_hidden_state if cls is RaynasModel else out.logits] + ([pooled] if pooler else [])

    with gated(model, units):
        reference = run(model)
    removed = remove_pruned(model, units)
    removed_base = removed if cls is RaynasModel else removed.raynas
    assert type(removed) is cls and (removed_base.pooler is not None) == (base.pooler is not None) == pooler
    if cls is RaynasForMaskedLM:
        assert removed.cls.decoder.weight is removed.raynas.embeddings.word_embeddings.weight
    assert max_diff(run(removed), reference) <= 1e-5


def test_dtype_and_input_model_are_preserved():
    model = tiny().double().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    units = random_units(8)
    removed = remove_pruned(model, units)
    assert model.training and not removed.training
    assert all(p.dtype == torch.float64 for p in removed.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    model.eval()
    ids, mask = batch()
    with gated(model, units):
        reference = outputs(model, ids, mask)
    assert max_diff(outputs(removed, ids, mask), reference) <= 1e-10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_device_is_preserved():
    model = tiny().cuda()
    units = random_units(9)
    removed = remove_pruned(model, units)
    assert all(p.device == model.device for p in removed.parameters())
    ids, mask = (t.cuda() for t in batch())
    with gated(model, {i: z.cuda() for i, z in units.items()}):
        reference = outputs(model, ids, mask)
    assert max_diff(outputs(removed, ids, mask), reference) <= 1e-4  # TF32 / SDPA kernels differ by head count


@pytest.mark.parametrize("units, block, needle", [
    ({0: torch.ones(3)}, None, "units[0]: expected a vector of 4"),
    ({1: torch.ones(4, 12)}, None, "units[1]: expected a vector of 48"),
    ({0: torch.tensor([0.0, 0.5, 1.5, 1.0])}, None, "units[0]: gate values must lie in [0, 1]"),
    ({6: torch.tensor([-0.1, 1.0])}, None, "units[6]: gate values must lie in [0, 1]"),
    ({6: torch.tensor([float("nan"), 1.0])}, None, "units[6]: gate values must lie in [0, 1]"),
    ({2: torch.ones(16)}, None, "op-layer 2 is RaynasSepConv"),
    ({5: torch.ones(1)}, None, "op-layer 5 is RaynasIdentity"),
    ({8: torch.ones(4)}, None, "units[8]: op-layer index out of range"),
    ({-1: torch.ones(48)}, None, "units[-1]: op-layer index out of range"),
    ({"0": torch.ones(4)}, None, "keys are op-layer indices"),
    ({0: torch.ones(4)}, {0: 1.5}, "block[0]: the block gate must lie in [0, 1]"),
    ({0: torch.ones(4)}, {0: torch.ones(2)}, "block[0]: expected one number"),
    ({}, {2: 0.5}, "block[2]: op-layer 2 is RaynasSepConv"),
])
def test_bad_gates_raise_config_errors(units, block, needle):
    with pytest.raises(ConfigError) as info:
        remove_pruned(tiny(), units, block)
    assert needle in str(info.value)


def test_an_empty_block_is_not_gated_again_and_non_raynas_models_are_refused():
    removed = remove_pruned(tiny(), {0: torch.zeros(4)})
    with pytest.raises(ConfigError, match="op-layer 0 is RaynasEmptyBlock"):
        remove_pruned(removed, {0: torch.zeros(0)})
    with pytest.raises(ConfigError, match="expected a raynas model"):
        remove_pruned(torch.nn.Linear(2, 2), {})


def test_block_gate_without_units_keeps_every_unit():
    model = tiny(RaynasForQuestionAnswering)
    ids, mask = batch()
    with gated(model, {}, {4: 0.3}):
        reference = outputs(model, ids, mask)
    removed = remove_pruned(model, {}, {4: 0.3})
    assert removed.config.ops[4] == FFN(48)
    assert max_diff(outputs(removed, ids, mask), reference) <= 1e-5


def test_layer_sizes_is_a_valid_layers_list():
    removed = remove_pruned(tiny(), {0: torch.tensor([0.0, 1.0, 0.5, 0.0]), 4: torch.zeros(48)})
    sizes = layer_sizes(removed)
    assert sizes[:6] == [{"op": "mha", "heads": 2, "head_dim": 8}, {"op": "ffn", "inner": 48},
                         {"op": "conv", "kernel": 3, "inner": 16}, {"op": "mha", "heads": 4, "head_dim": 8},
                         {"op": "ffn", "inner": 0}, {"op": "id"}]
    assert RaynasConfig(hidden_size=HIDDEN, layers=sizes).layers == removed.config.layers == sizes


def test_magnitude_scores_are_l2_norms_of_each_units_weights():
    model = tiny()
    scores = magnitude_scores(model)
    assert sorted(scores) == GATED
    assert all(scores[i].shape == (n_units(OPS[i]),) and scores[i].dtype == torch.float32 for i in GATED)
    att, ffn = model.raynas.layers[3], model.raynas.layers[1]
    assert isinstance(att, RaynasAttention) and isinstance(ffn, RaynasFeedForward)
    rows = slice(16, 24)  # head 2 of 4 x 8
    head = torch.cat([att.query.weight[rows].flatten(), att.key.weight[rows].flatten(),
                      att.value.weight[rows].flatten(), att.dense.weight[:, rows].flatten()])
    torch.testing.assert_close(scores[3][2], head.norm().detach())
    neuron = torch.cat([ffn.intermediate.weight[5], ffn.output.weight[:, 5]])
    torch.testing.assert_close(scores[1][5], neuron.norm().detach())
    with torch.no_grad():  # zeroing one head's weights zeroes its score and only its score
        for proj in (att.query, att.key, att.value):
            proj.weight[rows] = 0
        att.dense.weight[:, rows] = 0
    again = magnitude_scores(model)[3]
    assert again[2] == 0 and torch.equal(again[[0, 1, 3]], scores[3][[0, 1, 3]])
    assert sorted(magnitude_scores(remove_pruned(model, {3: torch.zeros(4)}))) == [0, 1, 4, 6, 7]
