"""CPU int8 inference backends, each behind an ``nn.Module`` face so one timer and one evaluator serve them all.

Which int8 path is fastest on a CPU is an empirical question with a known trap:
``torch.ao.quantization.quantize_dynamic`` is deprecated (present in torch 2.13),
torchao's ``Int8DynamicActivationInt8WeightConfig`` is its successor but its users
report it slower on CPU (pytorch/ao #3157, #4365), and ONNX Runtime's int8
``MatMulInteger`` kernels use VNNI where the CPU has it. So raynas builds every
candidate from the same model and times them side by side, interleaved, with the
family report's protocol (:func:`raynas.evaluation.latency.measure_modules`):

- ``torch_fp32``: the model itself (the reference).
- ``torch_dynamic``: ``quantize_dynamic`` on every ``nn.Linear`` (int8 weights per tensor, dynamic activations).
- ``torchao``: ``quantize_(model, Int8DynamicActivationInt8WeightConfig())``.
- ``ort_fp32``: the model exported to ONNX, run by ONNX Runtime in fp32.
- ``ort_int8``: that graph through ONNX Runtime's ``quantize_dynamic``: int8 weights per output channel
  (symmetric: a model dequantized from raynas' int8 codes requantizes to the same codes), uint8 activations
  quantized per tensor at run time.

ONNX Runtime's intra-op threads spin-wait between runs by default; interleaved with
torch models on two cores that spinning steals the other model's CPU and makes
every torch number look slow, so spinning is turned off (a real server running
one model would keep it; the bias is against ONNX Runtime, not for it).

The ONNX graphs are exported with eager attention (ONNX Runtime's fusions match
its pattern, not SDPA's). Pure torch + onnxruntime; no Ray.
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raynas.errors import ConfigError

BACKENDS = ("torch_fp32", "torch_dynamic", "torchao", "ort_fp32", "ort_int8")
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class _Graph(nn.Module):
    """What is exported: tensors in, a tuple of tensors out (ONNX wants no ModelOutput)."""

    def __init__(self, model: nn.Module, outputs: str) -> None:
        super().__init__()
        self.model, self.outputs = model, outputs

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        if self.outputs == "encoder":
            return (out.last_hidden_state,)
        if hasattr(out, "start_logits"):
            return out.start_logits, out.end_logits
        return (out.logits,)


def _eager_copy(model: nn.Module) -> nn.Module:
    """A copy that runs eager attention (the pattern ONNX Runtime fuses), in eval mode."""
    twin = copy.deepcopy(model).eval()
    if hasattr(twin, "set_attn_implementation"):
        try:
            twin.set_attn_implementation("eager")
        except (ValueError, AttributeError):  # a model without that choice (raynas' own attention) keeps its own
            pass
    return twin


def export_onnx(model: nn.Module, path: str | os.PathLike, outputs: str = "task") -> Path:
    """Export ``model`` (``outputs="task"``: its logits; ``"encoder"``: its base model's last hidden state).

    Batch and sequence axes are dynamic, so one graph serves the 1 x 128 timing and
    the length-bucketed dev evaluation.
    """
    if outputs not in ("task", "encoder"):
        raise ConfigError(f"outputs: expected task or encoder, got {outputs!r}")
    target = getattr(model, "base_model", model) if outputs == "encoder" else model
    graph = _Graph(_eager_copy(target), outputs)
    ids = torch.ones(1, 16, dtype=torch.long)
    names = ["last_hidden_state"] if outputs == "encoder" else (
        ["start_logits", "end_logits"] if hasattr(model, "qa_outputs") else ["logits"])
    axes = {name: {0: "batch", 1: "sequence"} for name in INPUTS}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, (ids, ids, torch.zeros_like(ids)), str(path), input_names=list(INPUTS),
                          output_names=names, dynamic_axes=axes, opset_version=17, dynamo=False)
    return path


def ort_quantize(fp32_path: str | os.PathLike, int8_path: str | os.PathLike) -> Path:
    """ONNX Runtime dynamic int8: per-channel symmetric int8 weights, per-tensor uint8 activations at run time."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its "consider pre-processing" advice is about static quantization
    try:
        quantize_dynamic(str(fp32_path), str(int8_path), weight_type=QuantType.QInt8, per_channel=True)
    finally:
        root.setLevel(level)
    return Path(int8_path)


class OrtModule(nn.Module):
    """An ONNX Runtime session that answers like the transformers model it was exported from.

    ``forward`` takes the tokenized batch (extra keys such as labels are ignored)
    and returns an object with ``.logits`` (or ``.start_logits`` / ``.end_logits``,
    or ``.last_hidden_state`` for an encoder graph) as torch tensors, so the
    fine-tuning code's evaluator and the latency timer use it unchanged.
    """

    def __init__(self, path: str | os.PathLike, config: Any, threads: int | None = None) -> None:
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # see the module doc
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.config = config
        self.path = Path(path)
        self.file_bytes = self.path.stat().st_size  # the session holds the graph: the file may go after this

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, **_: Any) -> Any:
        from transformers.utils import ModelOutput

        given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        if given["attention_mask"] is None:
            given["attention_mask"] = torch.ones_like(input_ids)
        if given["token_type_ids"] is None:
            given["token_type_ids"] = torch.zeros_like(input_ids)
        feed = {name: given[name].detach().cpu().long().numpy() for name in self.input_names}
        outs = self.session.run(self.output_names, feed)
        return ModelOutput({name: torch.from_numpy(out) for name, out in zip(self.output_names, outs)})


def torch_dynamic(model: nn.Module) -> nn.Module:
    """``torch.ao.quantization.quantize_dynamic`` on a copy: int8 ``nn.Linear`` weights, dynamic activations."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated in torch 2.13, which is one of the things measured
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear}, dtype=torch.qint8)


def torchao_int8(model: nn.Module) -> nn.Module:
    """torchao's int8 dynamic-activation, int8-weight quantization on a copy (raises ConfigError without torchao)."""
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError as exc:
        raise ConfigError(f"backend torchao: torchao is not installed ({exc}); pip install torchao") from None
    twin = copy.deepcopy(model).eval()
    quantize_(twin, Int8DynamicActivationInt8WeightConfig())
    return twin


def build_backend(name: str, model: nn.Module, workdir: str | os.PathLike, outputs: str = "task",
                  threads: int | None = None) -> nn.Module:
    """The module that runs ``model`` on backend ``name``; ONNX files go under ``workdir``.

    The session keeps the graph in memory, so ``workdir`` can be a temporary
    folder removed right after (the graphs are derived artifacts, ~100 MB each).

    ``outputs="encoder"`` builds the base encoder (what the latency table times),
    ``"task"`` the whole task model (what the dev metric scores).
    """
    if name not in BACKENDS:
        raise ConfigError(f"backend: expected one of {', '.join(BACKENDS)}, got {name!r}")
    target = getattr(model, "base_model", model) if outputs == "encoder" else model
    if name == "torch_fp32":
        return target.eval()
    if name == "torch_dynamic":
        return torch_dynamic(target)
    if name == "torchao":
        return torchao_int8(target)
    workdir = Path(workdir)
    fp32 = export_onnx(model, workdir / f"{outputs}.fp32.onnx", outputs)
    path = fp32 if name == "ort_fp32" else ort_quantize(fp32, workdir / f"{outputs}.int8.onnx")
    return OrtModule(path, model.config, threads)
