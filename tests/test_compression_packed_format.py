"""The packed on-disk format (raynas.compression.packed_format) and its transformers loader (hf_quantizer).

Encodings are built here with trivial quantizers (per-row symmetric int, a linear k-means
codebook), independent of the real methods: the format must store whatever ``Encoded``
says, and ``from_pretrained`` must give back exactly ``enc.dequantize()``.
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.utils.parametrize
from conftest import batch
from safetensors import safe_open
from transformers import (
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
)

import raynas  # noqa: F401  (registers quant_method "raynas")
from raynas.compression.encoding import Encoded, compressible_modules, int_range, payload_bits
from raynas.compression.hf_quantizer import PackedEmbedding, PackedLinear
from raynas.compression.packed_format import (
    bytes_on_disk,
    load_encoded,
    pack_bits,
    save_compressed,
    unpack_bits,
)
from raynas.errors import ConfigError
from raynas.models import RaynasConfig, RaynasForQuestionAnswering, RaynasForSequenceClassification
from raynas.spaces.ops import FFN, MHA, SepConv

BERT = {"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 64}


def int_encode(w: torch.Tensor, bits: int, mask: torch.Tensor | None = None) -> Encoded:
    q = int_range(bits)
    scale = w.abs().amax(dim=1).clamp_min(1e-8) / q
    return Encoded("int", bits, torch.round(w / scale[:, None]).long().clamp(-q, q), scale=scale, mask=mask)


def kmeans_encode(w: torch.Tensor, bits: int, mask: torch.Tensor | None = None) -> Encoded:
    codebook = torch.linspace(float(w.min()), float(w.max()), 2 ** bits)
    codes = (w.unsqueeze(-1) - codebook).abs().argmin(dim=-1)
    return Encoded("kmeans", bits, codes, codebook=codebook, mask=mask)


def random_mask(w: torch.Tensor, seed: int, keep: float = 0.6) -> torch.Tensor:
    return torch.rand(w.shape, generator=torch.Generator().manual_seed(seed)) < keep


def encode_all(model: torch.nn.Module, kind: str) -> dict[str, Encoded]:
    """Every compressible weight encoded by ``kind``: int8, int4, kmeans3, masked (int8/kmeans4/float mix)."""
    out = {}
    for i, (name, module) in enumerate(compressible_modules(model).items()):
        w = module.weight.detach()
        if kind == "int8":
            out[name] = int_encode(w, 8)
        elif kind == "int4":
            out[name] = int_encode(w, 4)
        elif kind == "kmeans3":
            out[name] = kmeans_encode(w, 3)
        else:
            mask = random_mask(w, i)
            out[name] = [int_encode(w, 8, mask), kmeans_encode(w, 4, mask), Encoded("float", 32, w, mask=mask),
                         int_encode(w, 3, mask)][i % 4]
    return out


def dequantized(model: torch.nn.Module, encoded: dict[str, Encoded]) -> torch.nn.Module:
    """A copy of ``model`` computing what the saved folder should compute."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, enc in encoded.items():
            ref.get_submodule(name).weight.copy_(enc.dequantize())
    return ref.eval()


def tiny_bert(cls=BertForSequenceClassification, seed: int = 0):
    torch.manual_seed(seed)
    labels = {"num_labels": 3} if cls is BertForSequenceClassification else {}
    model = cls(BertConfig(**BERT, **labels))
    with torch.no_grad():  # weights of O(1) so that quantization error shows in the logits
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.dim() == 2:
                p.mul_(20)
    return model.eval()


def tiny_raynas(cls=RaynasForSequenceClassification, seed: int = 0):
    ops = [MHA(2, 16), FFN(48), SepConv(3, 16), MHA(2, 16), FFN(48)]
    labels = {"num_labels": 3} if cls is RaynasForSequenceClassification else {}
    config = RaynasConfig(vocab_size=100, hidden_size=32, layers=[op.to_dict() for op in ops],
                          max_position_embeddings=64, **labels)
    torch.manual_seed(seed)
    model = cls(config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model.eval()


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids, mask = batch()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    return out.logits if getattr(out, "logits", None) is not None else torch.stack([out.start_logits, out.end_logits])


def hidden(model: torch.nn.Module) -> torch.Tensor:
    ids, mask = batch()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, torch.nn.Module, dict]]:
    """One saved folder per encoding kind of the same tiny BertForSequenceClassification."""
    model = tiny_bert()
    out = {}
    for kind in ("int8", "int4", "kmeans3", "masked"):
        encoded = encode_all(model, kind)
        folder = save_compressed(model, encoded, tmp_path_factory.mktemp("packed") / kind)
        out[kind] = (folder, dequantized(model, encoded), encoded)
    return out


# -- bit packing ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_unpack_round_trip(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    for count in (0, 1, 7, 13, 1001):
        codes = torch.randint(0, 2 ** bits, (count,), generator=g)
        packed = pack_bits(codes, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(count * bits / 8)
        assert torch.equal(unpack_bits(packed, bits, count), codes)


def test_pack_is_dense_little_endian() -> None:
    # 3-bit codes 1, 2, 3 -> bits (LSB first) 100 010 110 -> byte0 = 1 | 2 << 3 | (3 & 3) << 6, byte1 = 3 >> 2
    assert pack_bits(torch.tensor([1, 2, 3]), 3).tolist() == [1 | 2 << 3 | 3 << 6, 0]
    assert pack_bits(torch.tensor([True, False, True, True, False, False, False, False, True]), 1).tolist() == [13, 1]
    with pytest.raises(ConfigError, match="codes"):
        pack_bits(torch.tensor([8]), 3)
    with pytest.raises(ConfigError, match="bits"):
        pack_bits(torch.tensor([1]), 9)


# -- save / load round trips ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["int8", "int4", "kmeans3", "masked"])
def test_from_pretrained_gives_dequantized_model(folders, kind: str) -> None:
    folder, ref, encoded = folders[kind]
    loaded = AutoModelForSequenceClassification.from_pretrained(folder)
    assert type(loaded) is BertForSequenceClassification
    assert (logits(loaded) - logits(ref)).abs().max() <= 1e-6
    # an ordinary fp32 model: plain modules, no quantization config, trainable
    assert not any(isinstance(m, (PackedLinear, PackedEmbedding)) for m in loaded.modules())
    assert type(loaded.bert.encoder.layer[0].attention.self.query) is torch.nn.Linear
    assert "quantization_config" not in loaded.config.to_dict() and not getattr(loaded, "is_quantized", False)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in loaded.parameters())
    reread = load_encoded(folder)
    assert set(reread) == set(encoded)
    for name, enc in encoded.items():
        assert torch.equal(reread[name].dequantize(), enc.dequantize())
        assert (reread[name].mask is None) == (enc.mask is None)
    # base-model loading of the task folder: names lose the ``bert.`` prefix
    assert (hidden(AutoModel.from_pretrained(folder)) - hidden(ref.bert)).abs().max() <= 1e-6


def test_fresh_process_loads_after_import_raynas(folders, tmp_path: Path) -> None:
    folder, ref, _ = folders["masked"]
    ids, mask = batch()
    torch.save({"ids": ids, "mask": mask}, tmp_path / "batch.pt")
    code = (
        "import sys, torch, raynas\n"
        "from transformers import AutoModelForSequenceClassification as A\n"
        "b = torch.load(sys.argv[2])\n"
        "m = A.from_pretrained(sys.argv[1])\n"
        "with torch.no_grad():\n"
        "    torch.save(m(input_ids=b['ids'], attention_mask=b['mask']).logits, sys.argv[3])\n"
    )
    subprocess.run([sys.executable, "-c", code, str(folder), str(tmp_path / "batch.pt"), str(tmp_path / "out.pt")],
                   check=True, capture_output=True, timeout=120)
    assert (torch.load(tmp_path / "out.pt") - logits(ref)).abs().max() <= 1e-6


def test_bytes_on_disk_is_payload_plus_fp32_rest(folders) -> None:
    folder, ref, encoded = folders["masked"]
    rest = sum(v.numel() * 4 for k, v in ref.state_dict().items() if k.removesuffix(".weight") not in encoded)
    payload = sum(math.ceil(payload_bits(e) / 8) for e in encoded.values())
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        n_tensors = len(list(f.keys()))
    size = bytes_on_disk(folder)
    assert payload + rest <= size <= payload + rest + 8 + 160 * n_tensors  # header: ~100-150 bytes per tensor
    fp32 = sum(v.numel() * 4 for v in ref.state_dict().values())
    int4_size = bytes_on_disk(folders["int4"][0])
    assert int4_size < 0.3 * fp32 and size < fp32 < bytes_on_disk(folders["int8"][0]) * 4


def test_stored_tensors_and_config(folders) -> None:
    folder, ref, encoded = folders["masked"]
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "raynas" and qc["format"] == 1
    name = "bert.encoder.layer.0.attention.self.key"  # index 3 in encode_all: int3, masked
    assert qc["weights"][name] == {"scheme": "int", "bits": 3, "shape": [32, 32], "masked": True}
    query = "bert.encoder.layer.0.attention.self.query"  # index 2: fp32, masked
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        kept = encoded[name].kept()
        assert f.get_tensor(f"{name}.weight_codes").numel() == math.ceil(kept * 3 / 8)  # only kept entries, 3 bits
        assert f.get_tensor(f"{name}.weight_mask").numel() == math.ceil(32 * 32 / 8)
        assert f.get_tensor(f"{query}.weight_codes").dtype == torch.float32
        assert f.get_tensor(f"{query}.weight_codes").numel() == encoded[query].kept()
    assert f"{name}.weight" not in keys and f"{name}.bias" in keys and "classifier.weight" in keys
    assert "bert.embeddings.token_type_embeddings.weight" in keys
    assert "bert.embeddings.word_embeddings.weight_scale" in keys  # index 0: int8
    assert "bert.embeddings.position_embeddings.weight_codebook" in keys  # index 1: kmeans-4


def test_raynas_model_round_trip(tmp_path: Path) -> None:
    for cls, auto in ((RaynasForSequenceClassification, AutoModelForSequenceClassification),
                      (RaynasForQuestionAnswering, AutoModelForQuestionAnswering)):
        model = tiny_raynas(cls)
        encoded = encode_all(model, "masked")
        assert any(name.startswith("raynas.layers.2.") for name in encoded)  # the sep-conv's projections
        ref = dequantized(model, encoded)
        folder = save_compressed(model, encoded, tmp_path / cls.__name__)
        loaded = auto.from_pretrained(folder)
        assert type(loaded) is cls
        assert (logits(loaded) - logits(ref)).abs().max() <= 1e-6
        assert (hidden(AutoModel.from_pretrained(folder)) - hidden(ref.raynas)).abs().max() <= 1e-6


def test_tied_mlm_and_base_folder_into_task_model(tmp_path: Path, tokenizer) -> None:
    mlm = tiny_bert(BertForMaskedLM)
    encoded = encode_all(mlm, "int4")
    ref = dequantized(mlm, encoded)
    folder = save_compressed(mlm, encoded, tmp_path / "mlm", tokenizer=tokenizer, card={"method": "int4"})
    loaded = AutoModelForMaskedLM.from_pretrained(folder)
    assert loaded.cls.predictions.decoder.weight is loaded.bert.embeddings.word_embeddings.weight
    assert (logits(loaded) - logits(ref)).abs().max() <= 1e-6
    assert (folder / "tokenizer_config.json").exists() and json.loads((folder / "compression.json").read_text()) == {
        "method": "int4"}
    # a base-model folder loaded as a task model: names gain the ``bert.`` prefix (the head is new)
    base = tiny_bert(BertModel)
    encoded = encode_all(base, "kmeans3")
    folder = save_compressed(base, encoded, tmp_path / "base")
    task = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    assert (hidden(task.bert) - hidden(dequantized(base, encoded))).abs().max() <= 1e-6


def test_load_in_bfloat16(folders) -> None:
    loaded = AutoModelForSequenceClassification.from_pretrained(folders["int4"][0], dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


# -- bad input -----------------------------------------------------------------------------------------------------


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_not_a_model_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_encoded(tmp_path)
    assert "not a saved model folder" in one_line(exc)
    with pytest.raises(ConfigError):
        bytes_on_disk(tmp_path)


@pytest.mark.parametrize("corrupt, field", [
    ({"format": 2}, "quantization_config.format"),
    ({"weights": {}}, "quantization_config.weights"),
    ({"weights": {"bert.pooler.dense": {"scheme": "int", "bits": 9, "shape": [32, 32], "masked": False}}},
     "quantization_config.weights.bert.pooler.dense.bits"),
    ({"weights": {"bert.pooler.dense": {"scheme": "zip", "bits": 8, "shape": [32, 32], "masked": False}}},
     "quantization_config.weights.bert.pooler.dense.scheme"),
    ({"weights": {"bert.pooler.dense": {"scheme": "int", "bits": 8, "shape": [32], "masked": False}}},
     "quantization_config.weights.bert.pooler.dense.shape"),
])
def test_corrupt_quantization_config(folders, tmp_path: Path, corrupt: dict, field: str) -> None:
    folder = tmp_path / "corrupt"
    folder.mkdir()
    config = json.loads((folders["int8"][0] / "config.json").read_text())
    config["quantization_config"].update(corrupt)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").symlink_to(folders["int8"][0] / "model.safetensors")
    with pytest.raises(ConfigError) as exc:
        load_encoded(folder)
    assert one_line(exc).startswith(field + ":")
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        AutoModelForSequenceClassification.from_pretrained(folder)


def test_bad_encodings_on_save(tmp_path: Path) -> None:
    model = tiny_bert()
    name = "bert.pooler.dense"
    w = model.get_submodule(name).weight.detach()
    with pytest.raises(ConfigError, match="not a module with a weight"):
        save_compressed(model, {"bert.nope": int_encode(w, 8)}, tmp_path / "a")
    with pytest.raises(ConfigError, match="shape"):
        save_compressed(model, {name: int_encode(w[:4], 8)}, tmp_path / "b")
    bad = int_encode(w, 4)
    bad.codes[0, 0] = 9
    with pytest.raises(ConfigError, match=f"encoded.{name}: codes"):
        save_compressed(model, {name: bad}, tmp_path / "c")
    assert not (tmp_path / "c").exists()  # atomic: nothing half-written


def test_parametrized_model_is_refused(tmp_path: Path) -> None:
    model = tiny_bert()
    name = "bert.pooler.dense"
    module = model.get_submodule(name)
    torch.nn.utils.parametrize.register_parametrization(module, "weight", torch.nn.Identity())
    with pytest.raises(ConfigError, match="parametrizations"):
        save_compressed(model, {name: int_encode(module.weight.detach(), 8)}, tmp_path / "p")


def test_incomplete_file_is_refused(folders, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    source = folders["int8"][0]
    folder = tmp_path / "incomplete"
    folder.mkdir()
    (folder / "config.json").write_text((source / "config.json").read_text())
    tensors = load_file(str(source / "model.safetensors"))
    del tensors["bert.pooler.dense.weight_scale"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    for load in (load_encoded, AutoModelForSequenceClassification.from_pretrained):
        with pytest.raises(ConfigError, match="bert.pooler.dense lacks weight_scale"):
            load(folder)
