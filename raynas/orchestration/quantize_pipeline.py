"""The stages of ``raynas quantize``, top to bottom (see :mod:`raynas.orchestration.quantize_tune` for the trials).

1. ``reference``: dev scores of the fp32 model, the teacher and the extra models, by the evaluation code every
   variant is scored with.
2. ``compress``: the variants as Tune trials, wave by wave (``OUT/jobs/NAME/{model, compress.json,
   dev_outputs.npy}``); finished ones are skipped on a rerun.
3. ``measure`` (always rerun: it is the table, and it must be taken on a quiet machine): every variant's folder
   reloaded in this process with ``from_pretrained`` and scored on its runtime, its dev outputs compared with those
   the job saved before writing the folder; then every model's encoder -- fp32, teacher, extras, variants on their
   runtimes and the fp32 model on each int8 backend -- timed interleaved in one group (batch 1 x 128).

Outputs: ``compression.parquet``, ``int8_backends.parquet``, ``compression.md``, ``compression.png``.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from raynas.compression.compress_run import LOGITS, finished
from raynas.orchestration.quantize_tune import QuantizeRunConfig, _folder, jobs, preflight, run_waves

STAGES = ["finetune", "reference"]  # compress: per-job records; measure: always rerun (see the module doc)


def check(cfg: QuantizeRunConfig) -> Any:
    """Every check before work (a run's and a dry run's); the run folder's StageRun."""
    from raynas.stages import StageRun

    preflight(cfg)
    return StageRun(Path(cfg.out).resolve(), STAGES)


def run_quantize(cfg: QuantizeRunConfig) -> dict[str, Any]:
    from raynas.evaluation.finetune import eval_fields

    run = check(cfg)
    out = run.root
    model = cfg.model
    if cfg.finetune_from is not None:
        from raynas.orchestration.prune_pipeline import finetune_first

        ft = {"finetune_from": cfg.finetune_from, "task": cfg.task, **cfg.finetune}
        model = run.run("finetune", ft, lambda: finetune_first(cfg, out / "finetuned"))
        cfg = replace(cfg, model=model, finetune_from=None)
    assert model is not None
    model = _folder(model)
    fixed = {"model": model, "teacher": _folder(cfg.teacher) if cfg.teacher else None,
             **{f"extra:{k}": _folder(v) for k, v in cfg.extra_models.items()}}
    references = run.run("reference", {"task": cfg.task, **fixed, **eval_fields(cfg.train)},
                         lambda: {k: _score(cfg, p) for k, p in fixed.items() if p is not None})
    waves = jobs(cfg)
    errors = run_waves(cfg, waves)
    todo = [job for wave in waves for job in wave]
    records = {job.name: finished(job.out_dir) for job in todo}
    rows, backends = _measure(cfg, fixed, references, records, errors)
    from raynas.evaluation.compression_report import write_compression_report

    files = write_compression_report(rows, backends, out, cfg.title, cfg.task, reference="fp32")
    return {"rows": rows, "backends": backends, **files}


def _eval_cfg(task: str, model: str, train: dict[str, Any], data_dir: str | None) -> Any:
    """How ``model`` is scored: the evaluation fields of ``train`` (the run's, or a job's own)."""
    from raynas.evaluation.finetune import FinetuneConfig, eval_fields

    return FinetuneConfig(task=task, model=model, data_dir=data_dir, **eval_fields(train))


def _data_dir(cfg: QuantizeRunConfig) -> str | None:
    return str(Path(cfg.data_dir).resolve()) if cfg.data_dir else None


def _score(cfg: QuantizeRunConfig, model: str) -> float:
    from raynas.evaluation.finetune import evaluate_only

    score = float(evaluate_only(_eval_cfg(cfg.task, model, cfg.train, _data_dir(cfg)))["score"])
    print(f"quantize: {model}: score {score:.4f}", file=sys.stderr, flush=True)
    return score


def _bytes(folder: str) -> int | None:
    """Bytes on disk of a local folder's weights; None for a hub name (nothing on this disk to measure)."""
    path = Path(folder) / "model.safetensors"
    return path.stat().st_size if path.is_file() else None


def _reload_check(cfg: QuantizeRunConfig, record: dict[str, Any], job_dir: Path,
                  onnx_dir: Path) -> tuple[Any, dict[str, Any]]:
    """The reloaded folder on its runtime (task model), its dev score and agreement with the saved outputs.

    Scored with the job's own evaluation fields (a variant may override max_seq_len), so
    the outputs compared are of the same inputs.
    """
    from raynas.compression.compress_run import stack_outputs
    from raynas.compression.int8_backends import build_backend
    from raynas.evaluation.finetune import evaluate_module
    from raynas.evaluation.task_models import load_task_model

    model = load_task_model(cfg.task, record["path"])
    runner = build_backend(record["runtime"], model, onnx_dir / record["name"], "task")
    outputs: list[Any] = []
    # the job's inputs (its own max_seq_len, ...) on this process's device, not the trial's
    train = {**{k: v for k, v in record["job"]["train"].items() if k not in ("device", "precision")},
             **{k: v for k, v in cfg.train.items() if k in ("device", "precision")}}
    scored = evaluate_module(_eval_cfg(cfg.task, record["path"], train, train.get("data_dir")), runner,
                             outputs=outputs)
    now, before = stack_outputs(outputs), np.load(job_dir / LOGITS)
    same_shape = now.shape == before.shape
    agree = float(np.mean(np.nanargmax(now, -1) == np.nanargmax(before, -1))) if same_shape else 0.0
    diff = float(np.nanmax(np.abs(now - before))) if same_shape else float("inf")
    return model, {"score": float(scored["score"]), "reload_agreement": agree, "reload_max_diff": diff}


def _measure(cfg: QuantizeRunConfig, fixed: dict[str, str | None], references: dict[str, float],
             records: dict[str, dict[str, Any] | None],
             errors: dict[str, str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Reload, re-score and time everything; the ONNX graphs it builds live in a temporary folder."""
    import tempfile

    with tempfile.TemporaryDirectory() as onnx_dir:
        return _measure_in(cfg, fixed, references, records, errors, Path(onnx_dir))


def _measure_in(cfg: QuantizeRunConfig, fixed: dict[str, str | None], references: dict[str, float],
                records: dict[str, dict[str, Any] | None], errors: dict[str, str],
                onnx_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    from raynas.compression.int8_backends import build_backend
    from raynas.evaluation.finetune import evaluate_module
    from raynas.evaluation.latency import measure_modules
    from raynas.evaluation.task_models import load_task_model
    from raynas.orchestration.quantize_tune import backends_of

    fp32_bytes = _bytes(fixed["model"] or "")
    base = references["model"]
    rows: list[dict[str, Any]] = []
    timed: list[tuple[str, Any]] = []
    for key, path in fixed.items():
        if path is None:
            continue
        kind = "reference" if key == "model" else "teacher" if key == "teacher" else "extra"
        name = "fp32" if key == "model" else "teacher" if key == "teacher" else key.split(":", 1)[1]
        model = load_task_model(cfg.task, path)
        if key == "model":
            fp32 = model  # the int8 backends quantize this one
        timed.append((name, model.base_model))
        rows.append({"name": name, "kind": kind, "method": None, "source": path, "bits": "fp32",
                     "runtime": "torch_fp32", "bytes_on_disk": _bytes(path), "score": references[key],
                     "path": path, "status": "ok"})
    for name, record in records.items():
        if record is None:
            rows.append({"name": name, "kind": "variant", "status": "error",
                         "error": errors.get(name, "no record (the trial did not finish)")})
            continue
        job_dir = Path(record["path"]).parent
        model, check = _reload_check(cfg, record, job_dir, onnx_dir)
        timed.append((name, build_backend(record["runtime"], model, onnx_dir / name, "encoder")))
        bsr = _block_sparse(record, model)
        if bsr is not None:
            timed.append((f"{name}:bsr", bsr))
        rows.append({**{k: record[k] for k in ("name", "method", "source", "bits", "runtime", "bytes_on_disk",
                                                "payload_bits", "sparsity", "max_abs_diff", "path")},
                     "kind": "variant", **check, "score_in_job": record["score"],
                     "train_time_s": (record.get("train") or {}).get("train_time_s"), "status": "ok"})
        print(f"quantize: {name}: reloaded score {check['score']:.4f}, agreement {check['reload_agreement']:.4f}",
              file=sys.stderr, flush=True)
    backend_names = [b for b in backends_of(cfg) if b != "torch_fp32"]
    backend_modules = [(f"backend:{b}", build_backend(b, fp32, onnx_dir / "backends", "encoder")) for b in backend_names]
    lat = cfg.latency
    measured = measure_modules(timed + backend_modules, lat.seq_len, lat.batch_size, lat.threads,
                               repeats=lat.repeats, device=lat.device)
    by_name = {m["name"]: m for m in measured}
    ref_ms = by_name["fp32"]["latency_ms"]
    for r in rows:
        m = by_name.get(r["name"])
        if m is not None:
            r.update(latency_ms=m["latency_ms"], speedup=ref_ms / m["latency_ms"])
        bsr_row = by_name.get(f"{r['name']}:bsr")
        if bsr_row is not None:
            r.update(bsr_latency_ms=bsr_row["latency_ms"], bsr_speedup=ref_ms / bsr_row["latency_ms"])
        if r.get("score") is not None:
            r["delta_score"] = r["score"] - base
        if r.get("bytes_on_disk") is not None and fp32_bytes:
            r["size_ratio"] = r["bytes_on_disk"] / fp32_bytes
    backends = [{"backend": "torch_fp32", **_latency(by_name["fp32"], ref_ms), "score": base, "delta_score": 0.0,
                 "bytes": fp32_bytes}] if backend_names else []
    for b in backend_names:
        task_runner = build_backend(b, fp32, onnx_dir / "backends", "task")
        score = float(evaluate_module(_eval_cfg(cfg.task, fixed["model"] or "", cfg.train, _data_dir(cfg)),
                                      task_runner)["score"])
        backends.append({"backend": b, **_latency(by_name[f"backend:{b}"], ref_ms), "score": score,
                         "delta_score": score - base, "bytes": getattr(task_runner, "file_bytes", None)})
    return rows, backends


def _block_sparse(record: dict[str, Any], model: Any) -> Any:
    """For a block-pruned variant, its encoder with BSR sparse kernels (None for other variants).

    Block sparsity counts as a speedup only where it is measured as one: the dense
    model with zero blocks is timed as every variant is, and this copy beside it.
    """
    from raynas.compression.encoding import compressible_modules
    from raynas.compression.sparsity import block_shape, block_sparse_copy

    job = record.get("job", {})
    if record["method"] != "sparsify":
        return None
    block = job.get("settings", {}).get("block", "1x1")
    encoder = model.base_model
    modules = compressible_modules(encoder, embeddings=False)
    bh, bw = block_shape(block, next(iter(modules.values())).weight.shape)
    if bh != bw or bh == 1:
        return None
    return block_sparse_copy(encoder, {n: m.weight != 0 for n, m in modules.items()}, block)


def _latency(row: dict[str, Any], ref_ms: float) -> dict[str, Any]:
    return {"latency_ms": row["latency_ms"], "latency_p90_ms": row["latency_p90_ms"],
            "speedup": ref_ms / row["latency_ms"], "threads": row["threads"]}
