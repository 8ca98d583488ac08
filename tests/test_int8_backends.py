"""The CPU int8 backends behind one nn.Module face: each answers like the model it came from, and times like one."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from raynas.compression.encoding import compressible_modules
from raynas.compression.int8_backends import BACKENDS, OrtModule, build_backend, export_onnx, ort_quantize
from raynas.compression.quantizers import apply_encoded, encode_weights
from raynas.errors import ConfigError
from raynas.evaluation.latency import measure_modules

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def model() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2)
    return BertForSequenceClassification(config).eval()


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


@pytest.mark.parametrize("name", [b for b in BACKENDS if b != "torchao"])
def test_every_backend_answers_like_the_model(model, tmp_path, name):
    with torch.no_grad():
        ref = model(**_batch()).logits
        out = build_backend(name, model, tmp_path, "task")(**_batch()).logits
    tol = 1e-4 if name in ("torch_fp32", "ort_fp32") else 0.05  # int8 moves the logits a little, not a lot
    assert out.shape == ref.shape and torch.allclose(out, ref, atol=tol)


def test_encoder_graphs_return_the_hidden_states(model, tmp_path):
    with torch.no_grad():
        ref = model.bert(**_batch()).last_hidden_state
    out = build_backend("ort_fp32", model, tmp_path, "encoder")(**_batch()).last_hidden_state
    assert torch.allclose(out, ref, atol=1e-4)


def test_ort_int8_requantizes_raynas_int8_codes_to_the_same_weights(model, tmp_path):
    """A model dequantized from raynas' int8 codes gives ONNX Runtime the grid it computes itself (symmetric, per
    channel): running int8 kernels on it equals running them on the original to float rounding of the scales."""
    twin = BertForSequenceClassification(model.config).eval()
    twin.load_state_dict(model.state_dict())
    encoded = encode_weights(twin, "int", 8, embeddings=False)
    apply_encoded(twin, encoded)
    a = build_backend("ort_int8", model, tmp_path / "a", "task")(**_batch()).logits
    b = build_backend("ort_int8", twin, tmp_path / "b", "task")(**_batch()).logits
    assert torch.allclose(a, b, atol=2e-3)
    assert set(encoded) == set(compressible_modules(twin, embeddings=False))


def test_int8_onnx_is_smaller_and_the_module_times_like_any_other(model, tmp_path):
    fp32 = export_onnx(model, tmp_path / "m.onnx", "encoder")
    int8 = ort_quantize(fp32, tmp_path / "m.int8.onnx")
    assert int8.stat().st_size < fp32.stat().st_size
    rows = measure_modules([("fp32", model.bert), ("ort", OrtModule(int8, model.config))], seq_len=16, repeats=2,
                           warmup=1)
    assert [r["name"] for r in rows] == ["fp32", "ort"] and all(r["latency_ms"] > 0 for r in rows)


def test_an_unknown_backend_is_a_config_error(model, tmp_path):
    with pytest.raises(ConfigError, match="backend"):
        build_backend("tensorrt", model, tmp_path)


def test_torchao_when_installed(model, tmp_path):
    pytest.importorskip("torchao")
    with torch.no_grad():
        ref = model(**_batch()).logits
        out = build_backend("torchao", model, tmp_path, "task")(**_batch()).logits
    assert torch.allclose(out, ref, atol=0.05)
