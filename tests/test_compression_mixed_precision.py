"""Mixed precision: groups, measured per-group sensitivity, and the greedy bit plan under a budget."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import BertConfig, BertForQuestionAnswering, BertForSequenceClassification

from raynas.compression.encoding import compressible_modules
from raynas.compression.mixed_precision import (
    choose_bits,
    group_entries,
    layer_groups,
    measure_sensitivity,
    plan_per_module,
)
from raynas.compression.quantizers import KMeansSettings, KMeansSharing
from raynas.errors import ConfigError

CONFIG = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
              initializer_range=0.2)  # weights as large as a trained model's: quantization visibly changes logits


def tiny(cls=BertForSequenceClassification, seed: int = 0):
    torch.manual_seed(seed)
    return cls(BertConfig(**CONFIG))


def batches(n: int = 2) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(1, 100, (4, 10), generator=g),
             "attention_mask": torch.ones(4, 10, dtype=torch.long)} for _ in range(n)]


def test_layer_groups_bert_and_raynas_names():
    groups = layer_groups(compressible_modules(tiny()))
    assert list(groups) == ["embeddings", "layer.0", "layer.1", "pooler"]
    assert len(groups["layer.0"]) == 6 and groups["pooler"] == ["bert.pooler.dense"]
    raynas = layer_groups(["raynas.embeddings.word_embeddings", "raynas.layers.0.query", "raynas.layers.0.value",
                           "raynas.layers.11.dense", "raynas.pooler.dense", "other.proj"])
    assert raynas == {"embeddings": ["raynas.embeddings.word_embeddings"],
                      "layer.0": ["raynas.layers.0.query", "raynas.layers.0.value"],
                      "layer.11": ["raynas.layers.11.dense"], "pooler": ["raynas.pooler.dense"],
                      "other.proj": ["other.proj"]}


@pytest.mark.parametrize("scheme", ["kmeans", "int"])
def test_sensitivity_rows_for_every_group_and_width_and_weights_restored(scheme):
    model = tiny().train()
    before = copy.deepcopy(model.state_dict())
    rows = measure_sensitivity(model, batches(), [2, 4, 8], scheme=scheme)
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    groups = ["embeddings", "layer.0", "layer.1", "pooler"]
    assert sorted((r["group"], r["bits"]) for r in rows) == sorted((g, b) for g in groups for b in (2, 4, 8))
    for g in groups:
        mine = sorted((r for r in rows if r["group"] == g), key=lambda r: r["bits"])
        assert all(r["kl"] >= 0 for r in mine)
        assert mine[0]["kl"] > mine[-1]["kl"]  # 2 bits hurt more than 8
        assert mine[0]["bytes"] < mine[1]["bytes"] < mine[2]["bytes"]


def test_sensitivity_of_a_qa_model_uses_start_and_end_logits():
    rows = measure_sensitivity(tiny(BertForQuestionAnswering), batches(1), [3], embeddings=False)
    assert {r["group"] for r in rows} == {"layer.0", "layer.1"}  # the QA base model has no pooler
    assert all(r["kl"] > 0 for r in rows)


def test_bad_candidate_bits_raise():
    with pytest.raises(ConfigError, match="quantize.candidate_bits"):
        measure_sensitivity(tiny(), batches(1), [1], scheme="int")


def test_chosen_plan_fits_the_budget():
    model = tiny()
    rows = measure_sensitivity(model, batches(1), [2, 3, 4, 8])
    widest = sum(r["bytes"] for r in rows if r["bits"] == 8) * 8
    narrowest = sum(r["bytes"] for r in rows if r["bits"] == 2) * 8
    budget = (widest + narrowest) / 2
    plan = choose_bits(rows, None, budget)
    cost = {(r["group"], r["bits"]): r["bytes"] * 8 for r in rows}
    assert sum(cost[g, b] for g, b in plan.items()) <= budget
    assert choose_bits(rows, None, widest) == {g: 8 for g in plan}
    groups = layer_groups(compressible_modules(model))
    sizes = group_entries(model, groups)
    plan = choose_bits(rows, sizes, 4 * sum(sizes.values()))  # 4 bits per weight on average
    assert sum(sizes[g] * b for g, b in plan.items()) <= 4 * sum(sizes.values())
    per_module = plan_per_module(plan, groups)
    assert set(per_module) == set(compressible_modules(model))
    hooks = KMeansSharing(KMeansSettings(bits=per_module))
    hooks.prepare(model, 1, torch.device("cpu"))
    assert {n: e.bits for n, e in hooks.encoded().items()} == per_module


def test_the_more_sensitive_group_keeps_more_bits():
    def rows_for(group, damage):  # KL grows as bits shrink, scaled by the group's damage
        return [{"group": group, "bits": b, "kl": damage / b ** 2, "bytes": 100 * b} for b in (2, 4, 8)]

    rows = rows_for("fragile", 10.0) + rows_for("robust", 0.1)
    plan = choose_bits(rows, None, 8 * 100 * (8 + 2))  # room for 10 bits per entry in total
    assert plan == {"fragile": 8, "robust": 2}
    plan = choose_bits(rows, None, 8 * 100 * (4 + 4))
    assert plan["fragile"] >= plan["robust"]
    assert choose_bits(rows, {"fragile": 800, "robust": 800}, 800 * 10) == {"fragile": 8, "robust": 2}


def test_impossible_budget_raises():
    rows = [{"group": g, "bits": b, "kl": 1.0 / b, "bytes": 10 * b} for g in ("a", "b") for b in (2, 4)]
    with pytest.raises(ConfigError, match="quantize.budget_bits"):
        choose_bits(rows, None, 8 * 10 * 2 * 2 - 1)
    with pytest.raises(ConfigError, match="sizes"):
        choose_bits(rows, {"a": 1}, 1000)
    with pytest.raises(ConfigError, match="unknown groups"):
        plan_per_module({"c": 4}, {"a": ["x"]})
