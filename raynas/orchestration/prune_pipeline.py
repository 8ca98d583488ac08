"""The stages of ``raynas prune``, top to bottom (see :mod:`raynas.orchestration.prune_tune` for each).

Everything lands in one run folder (``out``): ``squad-proxy/`` (a split SQuAD file,
when asked), ``finetuned/`` (stage finetune), ``latency_fit.parquet`` (the timed
shapes behind the latency model), ``jobs/NAME/`` (each job's ``model/`` and
``prune.json``), ``trials.parquet`` (one row per job), ``pruning.md`` and the
family report (``report.md``, ``report.parquet``, ``score_vs_speedup.png``).
"""

from __future__ import annotations

import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from raynas.compression.prune_run import LATENCY_FIT_SCHEMA, finished
from raynas.errors import ConfigError
from raynas.orchestration.prune_tune import PruneRunConfig, jobs, preflight, pruning_markdown, rows_for, run_jobs

STAGES = ["split", "finetune", "reference", "latency", "prune", "measure"]


def check(cfg: PruneRunConfig) -> tuple[PruneRunConfig, Any]:
    """Every check before work (a run's and a dry run's): the config as run and the folder's StageRun."""
    from raynas.stages import StageRun

    if cfg.squad_proxy is not None:  # before preflight: the split is where data_dir points
        cfg = replace(cfg, data_dir=str(Path(cfg.out) / "squad-proxy"))
    preflight(cfg, split_pending=cfg.squad_proxy is not None)
    return cfg, StageRun(Path(cfg.out).resolve(), STAGES)


def run_pruning(cfg: PruneRunConfig) -> dict[str, Any]:
    from raynas.evaluation.finetune import eval_fields

    cfg, run = check(cfg)
    out = run.root
    if cfg.squad_proxy is not None:
        run.run("split", {"source": cfg.squad_proxy}, lambda: _split(cfg))
    model = cfg.model
    if cfg.finetune_from is not None:
        ft = {"finetune_from": cfg.finetune_from, "task": cfg.task, **cfg.finetune}
        model = run.run("finetune", ft, lambda: finetune_first(cfg, out / "finetuned"))
    assert model is not None
    model = str(Path(model).resolve()) if Path(model).exists() else model  # trials run elsewhere (Ray's cwd)
    fields = eval_fields(cfg.train)
    reference = run.run("reference", {"model": model, "task": cfg.task, **fields}, lambda: _score(cfg, model, fields))
    latency = None
    if any((t.kind or cfg.prune.kind) == "speedup" for t in cfg.targets):
        latency = run.run("latency", {"model": model, **asdict(cfg.latency)}, lambda: _fit_latency(cfg, model, out))
    todo = jobs(cfg, model, latency)
    errors = run_jobs(cfg, todo)
    records = {job.name: finished(job.out_dir) for job in todo}  # None: the job did not finish
    measured = _measure(cfg, model, [r["path"] for r in records.values() if r is not None], out)
    ref_row = {**measured.get(model, {}), "score": reference["score"]}
    rows = rows_for(todo, records, errors, measured, reference["score"])
    return _write(cfg, out, model, rows, ref_row)


def _split(cfg: PruneRunConfig) -> dict[str, str]:
    from raynas.evaluation.tasks import split_squad_by_article

    assert cfg.squad_proxy is not None and cfg.data_dir is not None
    version = "2.0" if cfg.task.lower().replace("-", "_") in ("squad_v2", "squad2") else "1.1"
    train, dev = split_squad_by_article(cfg.squad_proxy, cfg.data_dir, version)
    return {"train": str(train), "dev": str(dev)}


def finetune_first(cfg: PruneRunConfig, folder: Path) -> str:
    from raynas.evaluation.finetune import FinetuneConfig, finetune

    data_dir = str(Path(cfg.data_dir).resolve()) if cfg.data_dir else None
    finetune(FinetuneConfig(task=cfg.task, model=str(cfg.finetune_from), data_dir=data_dir,
                            output_dir=str(folder), **cfg.finetune))
    return str(folder)


def _score(cfg: PruneRunConfig, model: str, fields: dict[str, Any]) -> dict[str, Any]:
    from raynas.evaluation.finetune import FinetuneConfig, evaluate_only

    data_dir = str(Path(cfg.data_dir).resolve()) if cfg.data_dir else None
    result = evaluate_only(FinetuneConfig(task=cfg.task, model=model, data_dir=data_dir, **fields))
    print(f"prune: unpruned {model}: score {result['score']:.4f}", file=sys.stderr, flush=True)
    return {k: v for k, v in result.items() if isinstance(v, (int, float, str))}


def _fit_latency(cfg: PruneRunConfig, model: str, out: Path) -> dict[str, float]:
    from raynas.compression.prune_run import fit_latency_model
    from raynas.tables import to_table, write_parquet

    lat = cfg.latency
    fitted, measured = fit_latency_model(model, lat.fit_samples, lat.seq_len, lat.batch_size, lat.threads,
                                         lat.fit_repeats, device=lat.device)
    write_parquet(to_table(measured, LATENCY_FIT_SCHEMA), out / "latency_fit.parquet")
    print(f"prune: latency model fitted on {len(measured)} timings (R^2 {fitted.r2:.3f}): {fitted}",
          file=sys.stderr, flush=True)
    if not fitted.r2 >= lat.min_r2:
        raise ConfigError(f"latency.min_r2: the latency model explains the timings poorly (R^2 {fitted.r2:.3f} < "
                          f"{lat.min_r2}; {out / 'latency_fit.parquet'}): the machine is busy or noisy. Rerun when it "
                          "is quiet, raise latency.fit_repeats, or give params / flops targets")
    return asdict(fitted)


def _measure(cfg: PruneRunConfig, model: str, paths: list[str], out: Path) -> dict[str, dict[str, Any]]:
    """Every finished pruned model timed interleaved with the unpruned one: path -> row.

    A bert source is also timed as the same unpruned model in the raynas format
    (``OUT/unpruned-raynas``, written once): the pruned models run raynas' modules,
    so ``speedup_same_format`` isolates what pruning gained from what the format
    gains or loses against transformers' BertModel (``speedup``, the user's truth).
    """
    from raynas.evaluation.latency import compare_latency

    same_format = _raynas_twin(model, out / "unpruned-raynas")
    lat = cfg.latency
    rows = compare_latency(paths + ([str(same_format)] if same_format else []), reference=model,
                           seq_len=lat.seq_len, batch_size=lat.batch_size, threads=lat.threads,
                           repeats=lat.repeats, device=lat.device)
    by_model = {r["model"]: r for r in rows}
    twin_ms = by_model[str(same_format)]["latency_ms"] if same_format else by_model[model]["latency_ms"]
    for row in by_model.values():
        row["speedup_same_format"] = twin_ms / row["latency_ms"]
    return by_model


def _raynas_twin(model: str, folder: Path) -> Path | None:
    """The unpruned model exported in the raynas format (None when it already is one)."""
    from transformers import AutoConfig, AutoModel

    from raynas.export import export_model, from_bert
    from raynas.teachers import resolve_teacher

    where = resolve_teacher(model, "model")
    if AutoConfig.from_pretrained(where).model_type != "bert":
        return None
    if not (folder / "config.json").is_file():
        export_model(from_bert(AutoModel.from_pretrained(where)), folder, overwrite=True, bert_if_possible=False)
    return folder


def _write(cfg: PruneRunConfig, out: Path, model: str, rows: list[dict[str, Any]],
           reference: dict[str, Any]) -> dict[str, Any]:
    from raynas.atomic_io import atomic_file
    from raynas.evaluation.report import family_report, score_scale
    from raynas.orchestration.prune_tune import ROWS_SCHEMA
    from raynas.tables import to_table, write_parquet

    table = write_parquet(to_table(rows, ROWS_SCHEMA), out / "trials.parquet")
    text = pruning_markdown(rows, reference, cfg.title, cfg.task)
    with atomic_file(out / "pruning.md") as tmp:
        tmp.write_text(text, encoding="utf-8")
    scale = score_scale(cfg.task)
    family = [{"model": f"unpruned ({Path(model).name})", "params": reference.get("params"),
               "latency_ms": reference.get("latency_ms"), "speedup": 1.0, cfg.task: scale * reference["score"]}]
    family += [{"model": r["name"], "params": r["params"], "latency_ms": r["latency_ms"], "speedup": r["speedup"],
                cfg.task: scale * r["score"]} for r in rows if r["status"] == "ok"]
    files = family_report(family, out, title=cfg.title, reference=family[0]["model"])
    return {"rows": rows, "table": str(table), "markdown": str(out / "pruning.md"), "report": files, "text": text}
