"""The raynas model family on its own: config errors, padding, save/load round trip."""

from __future__ import annotations

import pytest
import torch
from conftest import batch
from transformers import AutoConfig, AutoModelForQuestionAnswering

from raynas import RaynasConfig, RaynasForMaskedLM, RaynasModel

LAYERS = [{"op": "mha", "heads": 2, "head_dim": 16}, {"op": "conv", "kernel": 5, "inner": 8},
          {"op": "id"}, {"op": "ffn", "inner": 48}]


def tiny_config(**kw) -> RaynasConfig:
    return RaynasConfig(vocab_size=100, hidden_size=32, max_position_embeddings=64, layers=LAYERS, **kw)


@pytest.mark.parametrize("layers, needle", [
    ([{"op": "rnn"}], "layers[0].op"),
    ([{"op": "ffn", "inner": -1}], "layers[0].inner"),  # 0 is allowed: a pruned-away block
    ([{"op": "conv", "kernel": 3, "inner": 0}], "layers[0].inner"),
    ([{"op": "id"}, {"op": "mha", "heads": 2}], "layers[1].head_dim"),
    ([{"op": "conv", "kernel": 4, "inner": 8}], "layers[0].kernel"),
    ([{"op": "ffn", "inner": 8, "size": 3}], "unknown field"),
    ("mha", "layers: expected a list"),
])
def test_config_errors_are_raised_at_construction(layers, needle):
    with pytest.raises(ValueError) as info:
        RaynasConfig(hidden_size=32, layers=layers)
    assert needle in str(info.value)


def test_padding_does_not_leak_into_real_tokens():
    torch.manual_seed(0)
    model = RaynasModel(tiny_config()).eval()
    ids, mask = batch()
    other = ids.clone()
    other[1, -4:] = 7  # different content under the padding
    with torch.no_grad():
        a = model(ids, mask).last_hidden_state[1, :-4]
        b = model(other, mask).last_hidden_state[1, :-4]
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_round_trip_through_auto_classes(tmp_path):
    torch.manual_seed(0)
    model = RaynasForMaskedLM(tiny_config()).eval()
    assert model.cls.decoder.weight is model.raynas.embeddings.word_embeddings.weight
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).layers == tiny_config().layers
    again = RaynasForMaskedLM.from_pretrained(tmp_path).eval()
    ids, mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids, attention_mask=mask).logits,
                                   model(input_ids=ids, attention_mask=mask).logits)
    qa = AutoModelForQuestionAnswering.from_pretrained(tmp_path)
    out = qa(input_ids=ids, attention_mask=mask, start_positions=torch.tensor([1, 2, 3]),
             end_positions=torch.tensor([2, 3, 40]))
    assert out.start_logits.shape == (3, 12) and torch.isfinite(out.loss)
