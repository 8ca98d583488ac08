"""Exported ``raynas`` models work with the ecosystem's tools, because their forward calls standard modules.

The model under test is heterogeneous on purpose (per-layer head counts and FFN
sizes, a separable convolution, a pruned-away MHA block with zero heads and an
FFN block with zero neurons): it cannot be exported as plain ``bert``, so every
check here runs the ``raynas`` model classes after a save / ``from_pretrained``
round trip.
"""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, batch
from torch import nn
from transformers import AutoModel, AutoModelForSequenceClassification

from raynas.export import export_model
from raynas.models import RaynasConfig, RaynasForMaskedLM, RaynasModel
from raynas.spaces.ops import encoder_params

LAYERS = [
    {"op": "mha", "heads": 4, "head_dim": 16}, {"op": "ffn", "inner": 96},
    {"op": "mha", "heads": 0, "head_dim": 16}, {"op": "ffn", "inner": 40},
    {"op": "conv", "kernel": 3, "inner": 24}, {"op": "ffn", "inner": 0},
    {"op": "mha", "heads": 1, "head_dim": 16}, {"op": "id"},
]


def _config() -> RaynasConfig:
    return RaynasConfig(vocab_size=VOCAB, hidden_size=48, max_position_embeddings=64, layers=LAYERS)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("mixed")
    result = export_model(RaynasForMaskedLM(_config(), add_pooling_layer=True).eval(), folder / "model")
    assert result.model_type == "raynas"
    return result.path


@pytest.fixture
def base(exported) -> RaynasModel:
    model = AutoModel.from_pretrained(exported).eval()
    assert isinstance(model, RaynasModel)
    return model


def _hidden(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state


def test_layer_sizes_and_analytic_params_survive_the_round_trip(base):
    assert [type(m).__name__ for m in base.layers] == [
        "RaynasAttention", "RaynasFeedForward", "RaynasEmptyBlock", "RaynasFeedForward", "RaynasSepConv",
        "RaynasEmptyBlock", "RaynasAttention", "RaynasIdentity"]
    assert sum(p.numel() for p in base.layers.parameters()) == encoder_params(48, base.config.ops)


def test_pruned_away_blocks_are_not_the_identity(base):
    """Zero heads / zero neurons keep the output bias and the residual LayerNorm."""
    ids, mask = batch(1)
    torch.manual_seed(1)
    with torch.no_grad():
        for i in (2, 5):  # trained values: fresh ones (bias 0, LayerNorm 1/0) would map normalised h to itself
            for p in base.layers[i].parameters():
                p.copy_(torch.randn_like(p))
        h = base.embeddings(ids)
    for i in (2, 5):
        with torch.no_grad():
            out = base.layers[i](h, None, mask)
            expected = base.layers[i].LayerNorm(h + base.layers[i].bias)
        assert torch.allclose(out, expected, atol=1e-6)
        assert (out - h).abs().max() > 1e-3


def test_attentions_keep_one_entry_per_mha_layer_including_the_empty_one(base):
    ids, mask = batch(1)
    with torch.no_grad():
        att = base(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    assert [tuple(a.shape) for a in att] == [(3, 4, 12, 12), (3, 0, 12, 12), (3, 1, 12, 12)]


def test_forward_hooks_fire_on_every_linear(base):
    ids, mask = batch(2)
    linears = {name: m for name, m in base.named_modules() if isinstance(m, nn.Linear)}
    assert len(linears) == 2 * 4 + 2 * 2 + 2 + 1  # 2 MHA with heads, 2 FFN with neurons, conv, pooler
    seen: list[str] = []
    handles = [m.register_forward_hook(lambda mod, args, out, n=name: seen.append(n)) for name, m in linears.items()]
    _hidden(base, ids, mask)
    for h in handles:
        h.remove()
    assert sorted(seen) == sorted(linears)
    convs = [m for m in base.modules() if isinstance(m, nn.Conv1d)]
    calls: list[int] = []
    convs[0].register_forward_hook(lambda *a: calls.append(1))
    _hidden(base, ids, mask)
    assert calls == [1]


def test_quantize_dynamic_runs_and_stays_close_to_fp32(base):
    ids, mask = batch(3)
    ref = _hidden(base, ids, mask)
    q = torch.ao.quantization.quantize_dynamic(base, {nn.Linear}, dtype=torch.qint8)
    assert not any(type(m) is nn.Linear for m in q.modules())  # every Linear was replaced
    out = _hidden(q, ids, mask)
    assert not torch.equal(out, ref)  # the int8 kernels really ran
    cos = torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1)).min()
    assert cos > 0.99, cos


def test_torch_compile_fullgraph_matches_eager(base):
    ids, mask = batch(4)
    ref = _hidden(base, ids, mask)
    compiled = torch.compile(base, fullgraph=True, backend="aot_eager")  # no graph break anywhere
    assert torch.allclose(_hidden(compiled, ids, mask), ref, atol=1e-5)


def test_torch_export_matches_eager(base):
    ids, mask = batch(5)
    ref = _hidden(base, ids, mask)
    program = torch.export.export(base, (), {"input_ids": ids, "attention_mask": mask})
    with torch.no_grad():
        out = program.module()(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.allclose(out, ref, atol=1e-5)


def test_onnx_export_runs_in_onnxruntime(base, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    ids, mask = batch(6)
    ref = _hidden(base, ids, mask)

    class Encoder(nn.Module):  # ONNX wants tensors out, not a ModelOutput
        def __init__(self, model: RaynasModel) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    path = tmp_path / "encoder.onnx"
    torch.onnx.export(Encoder(base), (ids, mask), str(path), input_names=["input_ids", "attention_mask"],
                      output_names=["last_hidden_state"], dynamo=True, verbose=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    assert torch.allclose(torch.from_numpy(out), ref, atol=1e-4)


def test_lora_adapter_changes_the_output_and_disables_cleanly(exported):
    peft = pytest.importorskip("peft")
    ids, mask = batch(7)
    model = AutoModelForSequenceClassification.from_pretrained(exported, num_labels=2).eval()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "intermediate"],
                             init_lora_weights=False)  # random B: the adapter's delta is non-zero from the start
    lora = peft.get_peft_model(model, config).eval()
    n_lora = sum(isinstance(m, peft.tuners.lora.LoraLayer) for m in lora.modules())
    assert n_lora == 2 + 2 + 2  # query / value of the 2 MHA blocks with heads, 2 FFNs with neurons
    with torch.no_grad():
        adapted = lora(input_ids=ids, attention_mask=mask).logits
        with lora.disable_adapter():
            disabled = lora(input_ids=ids, attention_mask=mask).logits
    assert (adapted - ref).abs().max() > 1e-3  # the adapter's forward really runs
    assert torch.allclose(disabled, ref, atol=1e-6)
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "classifier" in n for n in trainable)
