"""One compression variant, start to finish, in plain torch: what a Ray Tune trial of ``raynas quantize`` runs.

model folder --(method: post-training int8 | QAT | k-means weight sharing | mixed precision | gradual pruning,
the trained ones as hooks of the one fine-tuning loop, distilling the uncompressed model)--> :class:`Encoded`
weights --(:func:`save_compressed`)--> packed folder --(``from_pretrained``, fresh model)--> dev score on the
variant's runtime (``torch_fp32`` or ONNX Runtime ``ort_int8``) + ``compress.json``.

What a row claims is checked inside the job, not only in tests: the saved folder is
reloaded and its outputs compared with the model that was in memory
(``max_abs_diff``), and the dev logits of the in-memory model are written beside
the record so the measuring process (a different process) can check that the
reloaded folder predicts the same (``reload_agreement``).

Chains (gradual pruning, then k-means on the kept weights) are two jobs: the second
reads the first's folder, and the quantizers keep its zeros as a mask.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from raynas.atomic_io import atomic_file
from raynas.compression.encoding import Encoded, compressible_modules, payload_bits
from raynas.errors import ConfigError, require

METHODS = ("int8", "qat", "kmeans", "mixed", "sparsify")
RUNTIMES = ("auto", "torch_fp32", "ort_int8")
RECORD = "compress.json"
MODEL_DIR = "model"
LOGITS = "dev_outputs.npy"
CHECKPOINT_EVERY = 50


@dataclass
class CompressJob:
    """One variant of one model; JSON-able for a Tune trial config."""

    name: str
    task: str
    model: str  # the folder compressed (fine-tuned, pruned, or another job's model/)
    out_dir: str  # the job's folder: model/, compress.json, dev_outputs.npy
    method: str
    settings: dict[str, Any] = field(default_factory=dict)  # the method's settings (see make_hooks)
    train: dict[str, Any] = field(default_factory=dict)  # FinetuneConfig fields (lr, max_steps, data_dir, ...)
    teacher: str | None = None  # distil from this folder (None: no distillation)
    runtime: str = "auto"  # auto: ort_int8 for 8-bit int weights, else torch_fp32 (dequantized on load)

    def check(self) -> None:
        require(self.method in METHODS, f"{self.name}.method: expected one of {', '.join(METHODS)}, "
                                        f"got {self.method!r}")
        require(self.runtime in RUNTIMES, f"{self.name}.runtime: expected one of {', '.join(RUNTIMES)}, "
                                          f"got {self.runtime!r}")


def finished(job_dir: str | Path) -> dict[str, Any] | None:
    """The record of a finished job (its model folder and outputs exist), else None: a rerun skips it."""
    job_dir = Path(job_dir)
    record = job_dir / RECORD
    if record.is_file() and (job_dir / MODEL_DIR / "config.json").is_file() and (job_dir / LOGITS).is_file():
        return json.loads(record.read_text())
    return None


class _Keeping:
    """Hooks that remember the model their ``prepare`` returned (the loop does not hand it back)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.model = inner, None

    def prepare(self, model: nn.Module, total_steps: int, device: torch.device) -> nn.Module:
        self.model = self.inner.prepare(model, total_steps, device)
        return self.model

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def parse_settings(method: str, settings: dict[str, Any], name: str = "job") -> Any:
    """A trained method's settings dataclass, checked (an unknown or bad field is a ConfigError naming it)."""
    from raynas.compression import mixed_precision, quantizers, sparsity

    settings_cls = {"qat": quantizers.QATSettings, "kmeans": quantizers.KMeansSettings,
                    "mixed": mixed_precision.MixedSettings, "sparsify": sparsity.SparsifySettings}[method]
    known = {f.name for f in fields(settings_cls)}
    unknown = sorted(set(settings) - known)
    require(not unknown, f"{name}.settings: unknown field(s) {', '.join(unknown)} for {method} "
                         f"(known: {', '.join(sorted(known))})")
    try:
        parsed = settings_cls(**settings)
        parsed.check()
        return parsed
    except ConfigError as exc:
        raise ConfigError(f"{name}.settings: {exc}") from None


def make_hooks(method: str, settings: dict[str, Any], name: str = "job") -> Any:
    """The training hooks of qat, kmeans or sparsify, from their settings."""
    from raynas.compression import quantizers, sparsity

    hooks_cls = {"qat": quantizers.QAT, "kmeans": quantizers.KMeansSharing, "sparsify": sparsity.Sparsifier}[method]
    return hooks_cls(parse_settings(method, settings, name))


def runtime_of(job: CompressJob, encoded: dict[str, Encoded]) -> str:
    """``auto`` resolves to ONNX Runtime int8 when every weight is 8-bit int (its kernels run those codes)."""
    if job.runtime != "auto":
        return job.runtime
    if encoded and all(e.scheme == "int" and e.bits == 8 for e in encoded.values()):
        return "ort_int8"
    return "torch_fp32"


def _train(job: CompressJob, hooks: Any, model_dir: str) -> tuple[nn.Module, dict[str, Any]]:
    from raynas.evaluation.finetune import FinetuneConfig, finetune

    train = {"checkpoint_every": CHECKPOINT_EVERY, **job.train, "checkpoint_dir": job.out_dir}  # a retry resumes
    cfg = FinetuneConfig(task=job.task, model=model_dir, teacher=job.teacher, **train)
    keeping = _Keeping(hooks)
    results = finetune(cfg, hooks=keeping)
    assert keeping.model is not None
    return keeping.model, results


def _mixed_plan(job: CompressJob, s: Any, model: nn.Module) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """Bits per module from measured sensitivity under the size budget (``s.size_fraction`` of fp32)."""
    from raynas.compression import mixed_precision as mp
    from raynas.evaluation.finetune import FinetuneConfig, calibration_batches

    cfg = FinetuneConfig(task=job.task, model=job.model, **{k: v for k, v in job.train.items()
                                                            if k in ("data_dir", "max_seq_len", "train_split")})
    batches = calibration_batches(cfg, s.calibration_samples)
    rows = mp.measure_sensitivity(model, batches, s.candidate_bits)
    groups = mp.layer_groups(list(compressible_modules(model)))
    sizes = mp.group_entries(model, groups)
    plan = mp.choose_bits(rows, sizes, s.size_fraction * 32 * sum(sizes.values()))
    per_module = mp.plan_per_module(plan, groups)
    print(f"compress {job.name}: mixed precision plan {plan} (budget {s.size_fraction:g} of fp32)", file=sys.stderr,
          flush=True)
    return per_module, [{**r, "chosen": plan.get(r["group"]) == r["bits"]} for r in rows]


def compress(job: CompressJob, model_dir: str) -> tuple[nn.Module, dict[str, Encoded], dict[str, Any], list]:
    """Run the method: the model as it computes after compression, its encodings, training results, extras."""
    from raynas.evaluation.task_models import load_task_model

    extras: list[dict[str, Any]] = []
    if job.method == "int8":
        from raynas.compression.quantizers import apply_encoded, encode_weights

        model = load_task_model(job.task, model_dir)
        encoded = encode_weights(model, "int", 8)  # zeros of a pruned weight kept as a mask where that is smaller
        apply_encoded(model, encoded)
        return model.eval(), encoded, {}, extras
    if job.method == "mixed":
        from raynas.compression.quantizers import KMeansSettings, KMeansSharing

        s = parse_settings("mixed", job.settings, job.name)
        plan, extras = _mixed_plan(job, s, load_task_model(job.task, model_dir))
        hooks: Any = KMeansSharing(KMeansSettings(bits=plan, iters=s.iters, train_codebook=s.train_codebook))
    else:
        hooks = make_hooks(job.method, job.settings, job.name)
    model, results = _train(job, hooks, model_dir)
    model.eval()
    # quantizers: parametrizations off, the module weights keep the dequantized values
    encoded = hooks.encoded(model) if job.method == "sparsify" else hooks.remove()
    return model, encoded, results, extras


def run_compress_job(job: CompressJob) -> dict[str, Any]:
    """Compress, save packed, reload, score on the runtime; returns (and writes) the job's record."""
    from raynas.compression.int8_backends import build_backend
    from raynas.compression.packed_format import bytes_on_disk, save_compressed
    from raynas.compression.prune_run import max_output_diff
    from raynas.evaluation.finetune import FinetuneConfig, eval_fields, evaluate_module
    from raynas.evaluation.task_models import load_task_model, load_tokenizer
    from raynas.teachers import resolve_teacher

    job.check()
    started = time.perf_counter()
    model_dir = resolve_teacher(job.model, "model")
    out = Path(job.out_dir)
    model, encoded, results, extras = compress(job, model_dir)
    tokenizer = load_tokenizer(model_dir)
    folder = save_compressed(model, encoded, out / MODEL_DIR, tokenizer)
    reloaded = load_task_model(job.task, str(folder)).eval()
    diff = max_output_diff(model, reloaded)
    runtime = runtime_of(job, encoded)
    eval_cfg = FinetuneConfig(task=job.task, model=model_dir, data_dir=job.train.get("data_dir"),
                              **eval_fields(job.train))
    before: list[Any] = []
    with tempfile.TemporaryDirectory() as onnx_dir:
        runner = build_backend(runtime, model, onnx_dir, "task")
    scored = evaluate_module(eval_cfg, runner, tokenizer, outputs=before)
    with atomic_file(out / LOGITS) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, stack_outputs(before))
    total = sum(m.weight.numel() for m in compressible_modules(model).values())
    record = {
        "name": job.name, "task": job.task, "source": job.model, "method": job.method, "runtime": runtime,
        "bits": describe_bits(encoded), "payload_bits": int(sum(payload_bits(e) for e in encoded.values())),
        "encoded_weights": int(total), "bytes_on_disk": bytes_on_disk(folder),
        "sparsity": pruned_fraction(model, encoded),
        "score": scored["score"], "metrics": {k: v for k, v in scored.items() if k != "score"},
        "max_abs_diff": diff, "path": str(folder.resolve()), "train": results, "extras": extras,
        "job": asdict(job), "wall_s": round(time.perf_counter() - started, 1),
    }
    with atomic_file(out / RECORD) as tmp:
        tmp.write_text(json.dumps(record, indent=2, default=float) + "\n")
    print(f"compress {job.name}: {job.method} {record['bits']} on {runtime}: score {scored['score']:.4f}, "
          f"{record['bytes_on_disk'] / 1e6:.2f} MB on disk, saved vs in-memory {diff:.2e}; {folder}",
          file=sys.stderr, flush=True)
    return record


def pruned_fraction(model: nn.Module, encoded: dict[str, Encoded]) -> float:
    """The share of the encoder's Linear weights that a mask prunes (what gradual pruning removes; 0 without masks)."""
    linear = compressible_modules(model, embeddings=False)
    total = sum(m.weight.numel() for m in linear.values())
    pruned = sum(e.codes.numel() - e.kept() for n, e in encoded.items() if n in linear and e.mask is not None)
    return pruned / max(total, 1)


def stack_outputs(outputs: list[Any]) -> np.ndarray:
    """Per-example outputs as one array (QA: start and end logits concatenated, padded with NaN)."""
    if outputs and isinstance(outputs[0], tuple):
        width = max(len(o[0]) + len(o[1]) for o in outputs)
        rows = np.full((len(outputs), width), np.nan, dtype=np.float32)
        for i, (s, e) in enumerate(outputs):
            rows[i, :len(s) + len(e)] = np.concatenate([s, e])
        return rows
    return np.stack(outputs).astype(np.float32)


def describe_bits(encoded: dict[str, Encoded]) -> str:
    """``int8``, ``kmeans4``, ``fp32+mask``, or ``mixed(kmeans2:10,kmeans4:29)`` for a plan."""
    kinds: dict[str, int] = {}
    for e in encoded.values():
        key = "fp32" if e.scheme == "float" else f"{e.scheme}{e.bits}"
        kinds[key] = kinds.get(key, 0) + 1
    if not kinds:
        return "fp32"
    text = next(iter(kinds)) if len(kinds) == 1 else "mixed(" + ",".join(f"{k}:{v}" for k, v in sorted(
        kinds.items())) + ")"
    return text + ("+mask" if any(e.mask is not None for e in encoded.values()) else "")
