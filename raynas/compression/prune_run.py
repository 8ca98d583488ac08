"""One pruning job, start to finish, in plain torch: what a Ray Tune trial of ``raynas prune`` runs.

fine-tuned model --(finetune loop + :class:`Pruner` hooks, distilling the unpruned model)--> gated model
--(:func:`remove_pruned`, checked against the gated model)--> exported folder + ``prune.json``.

The exactness check is part of the job, not only of the tests: every exported model
records the largest difference between its outputs and the gated model's on a
seeded padded batch (``max_abs_diff``), so a table row cannot claim a pruned model
that computes something else. The latency model for speedup targets is fitted
here too (:func:`fit_latency_model`): pruned shapes of the same model, timed
interleaved with the full one on this machine.
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import torch
from torch import nn

from raynas.atomic_io import atomic_file
from raynas.compression.pruner import Pruner, PruneSettings
from raynas.compression.removal import layer_sizes, remove_pruned
from raynas.compression.targets import LatencyModel, analytic_cost, kept_counts
from raynas.models.configuration_raynas import RaynasConfig
from raynas.spaces.ops import FFN, MHA

LATENCY_FIT_SCHEMA = pa.schema([("shape", pa.int32()), ("heads", pa.int32()), ("ffn", pa.int32()),
                                ("latency_ms", pa.float64()), ("predicted_ms", pa.float64())])
RECORD = "prune.json"
MODEL_DIR = "model"
CHECKPOINT_EVERY = 50  # steps; train.checkpoint_every overrides (0: none)


@dataclass
class PruneJob:
    """One target (or baseline) pruned from one fine-tuned model; JSON-able for a Tune trial config."""

    name: str
    task: str
    model: str  # the fine-tuned model folder: the starting point and, with distill, the teacher
    out_dir: str  # the job's folder: model/ and prune.json
    settings: dict[str, Any] = field(default_factory=dict)  # PruneSettings fields
    train: dict[str, Any] = field(default_factory=dict)  # FinetuneConfig fields (lr, epochs, data_dir, ...)
    distill: bool = True
    latency: dict[str, float] | None = None  # LatencyModel fields (speedup targets)


def source_config(model_dir: str) -> RaynasConfig:
    """The raynas config of a fine-tuned folder (bert or raynas)."""
    from transformers import AutoConfig

    from raynas.export import raynas_config_from_bert

    config = AutoConfig.from_pretrained(model_dir)
    return raynas_config_from_bert(config) if config.model_type == "bert" else config


def finished(job_dir: str | Path) -> dict[str, Any] | None:
    """The record of a finished job (its model folder exists), else None: a rerun skips it."""
    record = Path(job_dir) / RECORD
    if record.is_file() and (Path(job_dir) / MODEL_DIR / "config.json").is_file():
        return json.loads(record.read_text())
    return None


def run_prune_job(job: PruneJob, on_eval: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Prune, remove, check, export; returns (and writes) the job's record."""
    from raynas.evaluation.finetune import FinetuneConfig, finetune
    from raynas.export import export_model
    from raynas.teachers import resolve_teacher

    started = time.perf_counter()
    settings = PruneSettings(**job.settings)
    latency = LatencyModel(**job.latency) if job.latency else None
    pruner = Pruner(settings, latency)
    model_dir = resolve_teacher(job.model, "model")
    train = {"checkpoint_every": CHECKPOINT_EVERY, **job.train, "checkpoint_dir": job.out_dir}  # a retry resumes
    cfg = FinetuneConfig(task=job.task, model=model_dir, teacher=model_dir if job.distill else None, **train)
    results = finetune(cfg, on_eval, hooks=pruner)
    gated = pruner.model
    assert gated is not None and pruner.cost is not None
    gated.eval()
    removed = remove_pruned(gated, pruner.unit_values())
    diff = max_output_diff(gated, removed, seed=cfg.seed)
    tokenizer = _tokenizer(model_dir)
    full = gated.config  # the unpruned model, gated: its config is the source's
    kept = kept_counts(pruner.masks or {})
    params_cost, flops_cost = analytic_cost(full, "params"), analytic_cost(full, "flops", settings.flops_seq_len)
    facts = {
        "method": settings.method, "kind": settings.kind, "target": settings.target,
        "achieved_fraction": pruner.achieved_fraction(), "params_sparsity": 1.0 - params_cost.fraction(kept),
        "flops_sparsity": 1.0 - flops_cost.fraction(kept), "score": results.get("score"), "source": job.model,
    }
    predicted = (latency.predict(full) / latency.predict(removed.config)) if latency else None
    exported = export_model(removed, Path(job.out_dir) / MODEL_DIR, tokenizer, overwrite=True,
                            provenance=_pruned_provenance(model_dir, job.task, facts),
                            latency={"predicted_speedup": predicted} if predicted else None)
    record = {
        "name": job.name, "task": job.task, "source": job.model, "method": settings.method, "kind": settings.kind,
        "target": settings.target, "target_fraction": pruner.fraction,
        "expected_fraction": pruner.expected_at_fix, "achieved_fraction": facts["achieved_fraction"],
        "params_sparsity": facts["params_sparsity"], "flops_sparsity": facts["flops_sparsity"],
        "encoder_params": int(params_cost.cost(kept)), "encoder_flops": int(flops_cost.cost(kept)),
        "predicted_speedup": predicted,
        "layers": layer_sizes(removed), "max_abs_diff": diff, "model_type": exported.model_type,
        "path": str(exported.path.resolve()), "results": results, "job": asdict(job),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    with atomic_file(Path(job.out_dir) / RECORD) as tmp:
        tmp.write_text(json.dumps(record, indent=2, default=float) + "\n")
    print(f"prune {job.name}: {settings.kind} target {settings.target:g} -> remaining {pruner.achieved_fraction():.4f} "
          f"of {pruner.fraction:.4f} asked; score {results['score']:.4f}; gated vs removed {diff:.2e}; "
          f"saved {exported.path} ({exported.model_type})", file=sys.stderr, flush=True)
    return record


@torch.no_grad()
def max_output_diff(a: nn.Module, b: nn.Module, seed: int = 0, batch: int = 4, length: int = 48) -> float:
    """Largest |a - b| over the task outputs on a seeded batch with padding (both in eval mode)."""
    g = torch.Generator().manual_seed(seed)
    vocab = a.config.vocab_size
    ids = torch.randint(5, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(batch):
        mask[row, length - 1 - row * (length // (2 * batch)):] = 0  # every row padded differently
    device = next(a.parameters()).device
    ins = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    out_a, out_b = a(**ins), b.to(device)(**ins)
    keys = [k for k in ("logits", "start_logits", "end_logits", "last_hidden_state") if getattr(out_a, k, None) is not None]
    return max(float((getattr(out_a, k) - getattr(out_b, k)).abs().max()) for k in keys)


def _pruned_provenance(model_dir: str, task: str, facts: dict[str, Any]) -> dict[str, Any]:
    """The fine-tuned source's provenance (its config.json's, if any) plus the task and this pruning."""
    from transformers import AutoConfig

    from raynas.model_card import provenance_of, with_step

    return with_step(with_step(provenance_of(AutoConfig.from_pretrained(model_dir)), "task", task), "pruning", facts)


def _tokenizer(model_dir: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


# ---- the latency model for speedup targets ------------------------------------------------------
def pruned_shapes(config: RaynasConfig, samples: int, seed: int) -> list[RaynasConfig]:
    """Random per-layer head / FFN counts of ``config`` (some blocks emptied), for timing."""
    rng = random.Random(seed)
    shapes = []
    for _ in range(samples):
        keep = rng.uniform(0.05, 1.0)  # spread the shapes from tiny to full

        def size(full: int, keep: float = keep) -> int:
            if rng.random() < 0.1:  # an emptied block
                return 0
            return min(full, max(1, round(full * keep * rng.uniform(0.6, 1.4))))

        layers = []
        for op in config.ops:
            if isinstance(op, MHA) and op.heads > 0:
                layers.append(MHA(size(op.heads), op.head_dim).to_dict())
            elif isinstance(op, FFN) and op.inner > 0:
                layers.append(FFN(size(op.inner)).to_dict())
            else:
                layers.append(op.to_dict())
        shapes.append(RaynasConfig(**{**config.to_dict(), "layers": layers}))
    return shapes


def fit_latency_model(model_dir: str, samples: int = 24, seq_len: int = 128, batch_size: int = 1,
                      threads: int | None = None, repeats: int = 10, seed: int = 0, device: str = "cpu",
                      group: int = 8) -> tuple[LatencyModel, list[dict[str, Any]]]:
    """Time ``samples`` pruned shapes of the model (random weights) interleaved with the full one; fit.

    Returns the model and the measured rows (``predicted_ms`` beside ``latency_ms``),
    the full model's first. Groups of ``group`` shapes share one interleaved round
    with the full model, so drift on a noisy machine hits them alike.
    """
    from raynas.evaluation.latency import measure_modules
    from raynas.models.modeling_raynas import RaynasModel

    full = source_config(model_dir)
    shapes = pruned_shapes(full, samples, seed)
    reference = RaynasModel(full)  # timed in every group, built once
    configs, ms = [], []
    for begin in range(0, len(shapes), group):
        named = [("full", reference)] + [(f"shape-{begin + k}", RaynasModel(c))
                                                  for k, c in enumerate(shapes[begin:begin + group])]
        rows = measure_modules(named, seq_len, batch_size, threads, repeats=repeats, seed=seed, device=device)
        configs += [full] + shapes[begin:begin + group]
        ms += [r["latency_ms"] for r in rows]
        print(f"latency model: timed {min(begin + group, len(shapes))}/{len(shapes)} pruned shapes",
              file=sys.stderr, flush=True)
    fitted = LatencyModel.fit(configs, ms)
    measured = [{"shape": i, "heads": sum(op.heads for op in c.ops if isinstance(op, MHA)),
                 "ffn": sum(op.inner for op in c.ops if isinstance(op, FFN)), "latency_ms": t,
                 "predicted_ms": fitted.predict(c)} for i, (c, t) in enumerate(zip(configs, ms))]
    return fitted, measured
