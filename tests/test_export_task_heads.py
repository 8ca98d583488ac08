"""Task models (sequence classification, QA) convert exactly between bert and raynas and export in both formats.

Every parameter is perturbed after construction, so zero biases / unit norms do not
hide a tensor that a conversion drops or misnames: a missed tensor changes the logits.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForMaskedLM,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertModel,
)

import raynas  # noqa: F401  (registers model type raynas with the Auto classes)
from raynas.errors import ConfigError
from raynas.export import export_model, from_bert, to_bert
from raynas.models import RaynasConfig, RaynasForQuestionAnswering, RaynasForSequenceClassification, RaynasModel

LABELS = {0: "negative", 1: "neutral", 2: "positive"}
TASK = {  # head -> (bert class, raynas class, Auto class, config fields)
    "cls": (BertForSequenceClassification, RaynasForSequenceClassification, AutoModelForSequenceClassification,
            {"id2label": LABELS, "label2id": {v: k for k, v in LABELS.items()},
             "problem_type": "multi_label_classification", "classifier_dropout": 0.25}),
    "qa": (BertForQuestionAnswering, RaynasForQuestionAnswering, AutoModelForQuestionAnswering, {}),
}
# per-layer head counts, a q width below hidden and an emptied FFN: no BertConfig expresses this
NON_UNIFORM = [{"op": "mha", "heads": 3, "head_dim": 8}, {"op": "ffn", "inner": 40},
               {"op": "mha", "heads": 1, "head_dim": 8}, {"op": "ffn", "inner": 0}]


def _scramble(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


def _bert(head: str, seed: int = 0) -> torch.nn.Module:
    bert_cls, _, _, fields = TASK[head]
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=32, **fields)
    return _scramble(bert_cls(config), seed)


def _raynas(head: str, layers: list[dict], seed: int = 0) -> torch.nn.Module:
    _, raynas_cls, _, fields = TASK[head]
    torch.manual_seed(seed)
    config = RaynasConfig(vocab_size=100, hidden_size=32, layers=layers, max_position_embeddings=32, **fields)
    return _scramble(raynas_cls(config), seed)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Three sequences, two of them right-padded (pad id 0)."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 100, (3, 10), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _logits(model: torch.nn.Module, padded: bool = True) -> torch.Tensor:
    """Classifier logits ``[B, labels]`` or QA ``[B, 2, T]``; ``padded=False`` attends to the pad tokens too."""
    ids, mask = _batch()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask if padded else torch.ones_like(mask))
    return torch.stack([out.start_logits, out.end_logits], 1) if hasattr(out, "start_logits") else out.logits


def _labels(config: object) -> tuple:
    return (config.num_labels, config.id2label, config.label2id, config.problem_type,
            getattr(config, "classifier_dropout", None))


@pytest.mark.parametrize("head", ["cls", "qa"])
def test_from_bert_and_back_is_exact(head):
    bert = _bert(head)
    ours = from_bert(bert)
    assert type(ours) is TASK[head][1]
    assert _labels(ours.config) == _labels(bert.config)
    ref = _logits(bert)
    assert torch.allclose(_logits(ours), ref, atol=1e-5, rtol=0)
    back, state = to_bert(ours)
    assert type(back) is TASK[head][0] and _labels(back.config) == _labels(bert.config)
    assert state.keys() == bert.state_dict().keys()
    assert torch.allclose(_logits(back), ref, atol=1e-5, rtol=0)
    # the mask reaches the attention: unmasked, the padded rows (1, 2) change and the full row 0 does not
    unmasked = _logits(ours, padded=False)
    assert torch.allclose(unmasked[0], ref[0], atol=1e-5, rtol=0)
    assert not torch.allclose(unmasked[1], ref[1], atol=1e-3) and not torch.allclose(unmasked[2], ref[2], atol=1e-3)


def test_classifier_labels_are_carried_and_not_defaults():
    ours = from_bert(_bert("cls"))
    assert ours.config.num_labels == 3 and ours.classifier.out_features == 3
    assert ours.config.id2label == LABELS and ours.config.label2id["positive"] == 2
    assert ours.config.problem_type == "multi_label_classification" and ours.dropout.p == 0.25


@pytest.mark.parametrize("head", ["cls", "qa"])
@pytest.mark.parametrize("bert_if_possible", [True, False])
def test_export_reloads_with_auto_classes(tmp_path, head, bert_if_possible):
    bert_cls, raynas_cls, auto_cls, _ = TASK[head]
    ours = from_bert(_bert(head))
    exported = export_model(ours, tmp_path / "m", bert_if_possible=bert_if_possible)
    assert exported.model_type == ("bert" if bert_if_possible else "raynas")
    assert json.loads((exported.path / "config.json").read_text())["model_type"] == exported.model_type
    reloaded = auto_cls.from_pretrained(exported.path).eval()
    assert type(reloaded) is (bert_cls if bert_if_possible else raynas_cls)
    assert _labels(reloaded.config) == _labels(ours.config)
    assert torch.allclose(_logits(reloaded), _logits(ours), atol=1e-5, rtol=0)


@pytest.mark.parametrize("head", ["cls", "qa"])
def test_per_layer_heads_export_as_raynas_and_reload(tmp_path, head):
    _, raynas_cls, auto_cls, _ = TASK[head]
    ours = _raynas(head, NON_UNIFORM)
    assert to_bert(ours) is None
    exported = export_model(ours, tmp_path / "m")  # bert_if_possible, yet not expressible
    assert exported.model_type == "raynas"
    assert json.loads((exported.path / "config.json").read_text())["layers"] == NON_UNIFORM
    reloaded = auto_cls.from_pretrained(exported.path).eval()
    assert type(reloaded) is raynas_cls and _labels(reloaded.config) == _labels(ours.config)
    assert torch.allclose(_logits(reloaded), _logits(ours), atol=1e-5, rtol=0)
    encoder = AutoModel.from_pretrained(exported.path).eval()
    assert type(encoder) is RaynasModel
    ids, mask = _batch()
    with torch.no_grad():
        want, got = ours.raynas(ids, mask), encoder(ids, mask)
    assert torch.allclose(got.last_hidden_state, want.last_hidden_state, atol=1e-5, rtol=0)
    if head == "cls":  # the classifier's pooler is in the checkpoint
        assert torch.allclose(got.pooler_output, want.pooler_output, atol=1e-5, rtol=0)


def test_bert_exports_load_without_raynas(tmp_path):
    """The plain-bert exports of both heads load in a process that never imports raynas."""
    cases = {}
    for head in TASK:
        ours = _raynas(head, [{"op": "mha", "heads": 4, "head_dim": 8}, {"op": "ffn", "inner": 48}] * 2, seed=3)
        exported = export_model(ours, tmp_path / head)
        assert exported.model_type == "bert"
        torch.save(_logits(ours), exported.path / "ref.pt")
        cases[head] = str(exported.path)
    ids, mask = _batch()
    torch.save({"ids": ids, "mask": mask}, tmp_path / "batch.pt")
    script = textwrap.dedent(f"""
        import json, sys, torch
        from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification
        b = torch.load({str(tmp_path / "batch.pt")!r})
        cases = json.loads(sys.argv[1])
        result = {{}}
        for head, auto in (("cls", AutoModelForSequenceClassification), ("qa", AutoModelForQuestionAnswering)):
            model = auto.from_pretrained(cases[head]).eval()
            with torch.no_grad():
                out = model(input_ids=b["ids"], attention_mask=b["mask"])
            got = out.logits if head == "cls" else torch.stack([out.start_logits, out.end_logits], 1)
            result[head] = [type(model).__name__, (got - torch.load(cases[head] + "/ref.pt")).abs().max().item(),
                            model.config.id2label.get(2)]
        result["raynas_imported"] = any(m.startswith("raynas") for m in sys.modules)
        print(json.dumps(result))
    """)
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(cases)], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["raynas_imported"] is False
    assert result["cls"][0] == "BertForSequenceClassification" and result["cls"][2] == "positive"
    assert result["qa"][0] == "BertForQuestionAnswering"
    assert result["cls"][1] < 1e-5 and result["qa"][1] < 1e-5


@pytest.mark.parametrize("bert_cls", [BertModel, BertForMaskedLM])
def test_encoder_and_mlm_still_become_masked_lm(bert_cls):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=32)
    bert = _scramble(bert_cls(config))
    ours = from_bert(bert)
    assert type(ours).__name__ == "RaynasForMaskedLM"
    assert (ours.raynas.pooler is not None) == (bert_cls is BertModel)  # BertForMaskedLM has no pooler
    ids, mask = _batch()
    with torch.no_grad():
        want, got = bert(input_ids=ids, attention_mask=mask), ours(ids, mask)
    if bert_cls is BertModel:
        encoded = ours.raynas(ids, mask)
        assert torch.allclose(encoded.last_hidden_state, want.last_hidden_state, atol=1e-5, rtol=0)
        assert torch.allclose(encoded.pooler_output, want.pooler_output, atol=1e-5, rtol=0)
    else:
        assert torch.allclose(got.logits, want.logits, atol=1e-5, rtol=0)


def test_to_bert_refuses_a_class_without_a_bert_twin():
    model = RaynasModel(RaynasConfig(vocab_size=100, hidden_size=32, max_position_embeddings=32,
                                     layers=[{"op": "mha", "heads": 4, "head_dim": 8}, {"op": "ffn", "inner": 48}]))
    with pytest.raises(ConfigError, match="RaynasModel"):
        to_bert(model)
