"""``raynas pipeline``: one family from one teacher -- search family -> task fine-tuning -> L0 pruning -> quantization.

Each stage reads the previous stage's model folders, so a user enters wherever
they have models: an AutoTinyBERT / NAS-BERT run folder (its ``models.parquet`` /
``family.parquet``), a recipe run here first, or a list of folders of their own.

1. ``family``: the members' folders (and the teacher, unless ``family.include_teacher`` is false).
2. ``finetune``: every member fine-tuned on the task (the teacher first; members may distil it).
3. ``prune`` (optional): ``raynas prune`` on the models named in ``prune.models`` (default: the teacher).
4. ``quantize`` (optional): ``raynas quantize`` on each model named in ``quantize.models`` (default: every
   pruned model and every member), one run folder each.
5. ``pareto``: every model of every stage timed interleaved in one group on its runtime (batch 1 x 128),
   with its bytes on disk and dev score; the rows no other row beats on size, latency and score together are the
   Pareto family. ``pareto.parquet``, ``pareto.md``, ``pareto.png``.

Stages 2-4 reuse the recipes' own code (``finetune``, ``run_pruning``, ``run_quantize``), so a pipeline row
and a recipe row of the same model are the same measurement.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from raynas.errors import require
from raynas.orchestration.prune_tune import LatencySettings

STAGES = ["family", "finetune"]  # prune / quantize: their recipes' own run folders skip what is done
FAMILY_TABLES = ("models.parquet", "family.parquet")  # raynas autotinybert / raynas nasbert


@dataclass
class FamilySource:
    models: dict[str, str] = field(default_factory=dict)  # name -> pre-trained folder (your own models)
    run: str | None = None  # an autotinybert / nasbert run folder: the folders its table lists
    recipe: str | None = None  # autotinybert | nasbert: run it first (its config + overrides), then read its table
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    include_teacher: bool = True  # the teacher is a member too (fine-tuned, pruned, quantized like the others)
    max_models: int | None = None  # the first N rows of the run's table


@dataclass
class PipelineRunConfig:
    task: str = ""
    teacher: str = ""  # the pre-trained teacher the family came from (folder, packaged or hub name)
    data_dir: str | None = None
    out: str = "runs/pipeline"
    family: FamilySource = field(default_factory=FamilySource)
    finetune: dict[str, Any] = field(default_factory=dict)  # FinetuneConfig fields of stage finetune
    distill_members: bool = True  # members distil the fine-tuned teacher (logits; finetune.kd_* set the weights)
    prune: dict[str, Any] | None = None  # PruneRunConfig fields (targets, prune, train, ...) + models: [names]
    quantize: dict[str, Any] | None = None  # QuantizeRunConfig fields (variants, train, ...) + models: [names]
    latency: LatencySettings = field(default_factory=LatencySettings)
    title: str = "one family: search -> fine-tuning -> pruning -> quantization"


def _slug(path: str) -> str:
    return Path(path.rstrip("/")).name.replace("/", "-") or "model"


def family_models(cfg: PipelineRunConfig, out: Path) -> dict[str, str]:
    """Name -> pre-trained folder of every member (stage family)."""
    import pandas as pd

    src = cfg.family
    members: dict[str, str] = {}
    if src.include_teacher:
        members["teacher"] = cfg.teacher
    run = src.run
    if src.recipe is not None:  # a known recipe name (_check_family, before any stage)
        import importlib

        from raynas.cli import RECIPES

        run = str(out / "family-run")
        argv = (["--config", src.config] if src.config else []) + [*src.overrides, f"out={run}"]
        code = importlib.import_module(RECIPES[src.recipe][0]).main(argv)
        require(code == 0, f"family.recipe: raynas {src.recipe} exited {code}")
    if run is not None:
        table = next((Path(run) / t for t in FAMILY_TABLES if (Path(run) / t).is_file()), None)
        require(table is not None, f"family.run: {run} has no {' or '.join(FAMILY_TABLES)} (not a family run)")
        rows = pd.read_parquet(table)
        paths = [p for p in rows["path"].tolist() if isinstance(p, str) and p][: src.max_models]
        for p in paths:
            path = p if Path(p).is_absolute() else str((Path(run) / p).resolve())
            members[_slug(str(Path(path).parent) if Path(path).name == "model" else path)] = path
    members.update(src.models)
    require(len(members) > 0, "family: no models (give family.models, family.run or family.recipe)")
    return members


def _check_family(src: FamilySource) -> None:
    require(src.recipe in (None, "autotinybert", "nasbert"),
            f"family.recipe: expected autotinybert or nasbert, got {src.recipe!r}")
    require(src.recipe is None or src.run is None, "family.run / family.recipe: give one (a run folder, or a recipe "
                                                   "to run)")
    if src.run is not None:
        require(any((Path(src.run) / t).is_file() for t in FAMILY_TABLES),
                f"family.run: {src.run} has no {' or '.join(FAMILY_TABLES)} (not a family run)")
    for name, path in src.models.items():
        require(not Path(path).exists() or (Path(path) / "config.json").is_file(),
                f"family.models.{name}: {path} is not a model folder (no config.json)")


def _finetune_all(cfg: PipelineRunConfig, members: dict[str, str], out: Path) -> dict[str, dict[str, Any]]:
    """Every member fine-tuned on the task: the teacher first, so the others can distil it."""
    import json

    from raynas.evaluation.finetune import FinetuneConfig, finetune

    data_dir = str(Path(cfg.data_dir).resolve()) if cfg.data_dir else None
    done: dict[str, dict[str, Any]] = {}
    order = sorted(members, key=lambda n: n != "teacher")
    for name in order:
        folder = out / "finetuned" / name
        record = folder / "finetune.json"
        if not record.is_file():
            teacher = str(out / "finetuned" / "teacher") if (
                cfg.distill_members and name != "teacher" and "teacher" in done) else None
            finetune(FinetuneConfig(task=cfg.task, model=members[name], data_dir=data_dir, output_dir=str(folder),
                                    teacher=teacher, **cfg.finetune))
        results = json.loads(record.read_text())["results"]
        done[name] = {"path": str(folder), "score": float(results["score"])}
        print(f"pipeline: fine-tuned {name}: score {results['score']:.4f}", file=sys.stderr, flush=True)
    return done


def check(cfg: PipelineRunConfig) -> dict[str, Any]:
    """Every section validated before the first stage trains (a run's and a dry run's checks).

    Returns the run folder's StageRun (``run``), the prune and quantize sections as their recipes' configs
    (``prune_cfg`` / ``quant_cfg``, None when off) and the models each applies to (``prune_on`` / ``quant_on``).
    """
    from raynas.atomic_io import check_writable
    from raynas.config_loading import load_section
    from raynas.orchestration.prune_tune import PruneRunConfig
    from raynas.orchestration.quantize_tune import QuantizeRunConfig
    from raynas.stages import StageRun

    require(bool(cfg.task), "task: which task the family is fine-tuned for (sst2, qnli, squad, ...)")
    require(bool(cfg.teacher), "teacher: the pre-trained teacher the family came from")
    out = check_writable(cfg.out, "out").resolve()
    prune_section = dict(cfg.prune or {})
    prune_on = prune_section.pop("models", ["teacher"])
    quant_section = dict(cfg.quantize or {})
    quant_on = quant_section.pop("models", None)
    common = {"task": cfg.task, "data_dir": cfg.data_dir}
    for section in (prune_section, quant_section):  # one measurement protocol unless a section sets its own
        section.setdefault("latency", asdict(cfg.latency))
    prune_cfg = load_section(PruneRunConfig, {**prune_section, **common, "model": "-"}, "prune") if cfg.prune else None
    quant_cfg = (load_section(QuantizeRunConfig, {**quant_section, **common, "model": "-"}, "quantize")
                 if cfg.quantize else None)  # every field checked before any stage runs
    _check_family(cfg.family)
    if prune_cfg is not None:  # the sections' own checks, before the first stage trains anything
        from raynas.orchestration.prune_tune import preflight as prune_preflight

        prune_preflight(replace(prune_cfg, model=None, finetune_from="(stage finetune)", out=str(out / "prune")))
    if quant_cfg is not None:
        from raynas.orchestration.quantize_tune import check_variants

        check_variants(quant_cfg, shapes=False)
    return {"run": StageRun(out, STAGES), "prune_cfg": prune_cfg, "quant_cfg": quant_cfg, "prune_on": prune_on,
            "quant_on": quant_on}


def run_compression_pipeline(cfg: PipelineRunConfig) -> dict[str, Any]:
    from raynas.orchestration.prune_pipeline import run_pruning
    from raynas.orchestration.quantize_pipeline import run_quantize

    checked = check(cfg)
    run, prune_cfg, quant_cfg = checked["run"], checked["prune_cfg"], checked["quant_cfg"]
    prune_on, quant_on, out = checked["prune_on"], checked["quant_on"], run.root
    members = run.run("family", asdict(cfg.family), lambda: family_models(cfg, out))
    tuned = run.run("finetune", {"members": members, "finetune": cfg.finetune, "task": cfg.task,
                                 "distill_members": cfg.distill_members}, lambda: _finetune_all(cfg, members, out))
    rows: list[dict[str, Any]] = [{"name": f"{n} (fine-tuned)", "stage": "finetune", "path": r["path"],
                                   "runtime": "torch_fp32", "score": r["score"], "bits": "fp32"}
                                  for n, r in sorted(tuned.items(), key=lambda kv: kv[0] != "teacher")]
    pruned: dict[str, str] = {}
    if prune_cfg is not None:
        for name in prune_on:
            require(name in tuned, f"prune.models: {name!r} is not a family member ({', '.join(tuned)})")
            for r in _prune(run_pruning, prune_cfg, tuned[name]["path"], out / "prune" / name):
                pruned[f"{name}-{r['name']}"] = r["path"]
                rows.append({"name": f"{name} pruned {r['name']}", "stage": "prune", "path": r["path"],
                             "runtime": "torch_fp32", "score": r["score"], "bits": "fp32"})
    if quant_cfg is not None:
        sources = {**pruned, **{n: r["path"] for n, r in tuned.items()}}
        for name in quant_on or [*pruned, *(n for n in tuned if n != "teacher")]:
            require(name in sources, f"quantize.models: {name!r} is neither a member nor a pruned model "
                                     f"({', '.join(sources)})")
            qcfg = replace(quant_cfg, model=sources[name], out=str(out / "quantize" / name), backends=[],
                           extra_models={}, teacher=None)
            result = run_quantize(qcfg)
            for r in result["rows"]:
                if r.get("kind") == "variant" and r.get("status") == "ok":
                    rows.append({"name": f"{name} {r['name']}", "stage": "quantize", "path": r["path"],
                                 "runtime": r["runtime"], "score": r["score"], "bits": r["bits"]})
    return _pareto(cfg, rows, out)


def _prune(run_pruning: Any, prune_cfg: Any, model: str, out: Path) -> list[dict[str, Any]]:
    result = run_pruning(replace(prune_cfg, model=model, finetune_from=None, out=str(out)))
    return [{"name": r["name"], "path": r["path"], "score": r["score"]} for r in result["rows"] if r["status"] == "ok"]


def pareto_front(rows: list[dict[str, Any]]) -> list[bool]:
    """True for every row that no other row matches or beats on bytes, latency and score, beating it on one."""
    def beats(a: dict[str, Any], b: dict[str, Any]) -> bool:
        le = a["bytes_on_disk"] <= b["bytes_on_disk"] and a["latency_ms"] <= b["latency_ms"] and a["score"] >= b["score"]
        lt = a["bytes_on_disk"] < b["bytes_on_disk"] or a["latency_ms"] < b["latency_ms"] or a["score"] > b["score"]
        return le and lt

    return [not any(beats(o, r) for o in rows if o is not r) for r in rows]


def _pareto(cfg: PipelineRunConfig, rows: list[dict[str, Any]], out: Path) -> dict[str, Any]:
    """Every model timed interleaved on its runtime; bytes; the Pareto front; table, markdown and plot."""
    import tempfile

    from raynas.compression.int8_backends import build_backend
    from raynas.compression.packed_format import bytes_on_disk
    from raynas.evaluation.compression_report import PIPELINE_SCHEMA, pareto_markdown, plot_size_latency
    from raynas.evaluation.latency import measure_modules
    from raynas.evaluation.task_models import load_task_model
    from raynas.tables import to_table, write_parquet

    timed = []
    with tempfile.TemporaryDirectory() as onnx_dir:  # the sessions hold the graphs; the files may go
        for i, r in enumerate(rows):
            model = load_task_model(cfg.task, r["path"])
            timed.append((r["name"], build_backend(r["runtime"], model, Path(onnx_dir) / str(i), "encoder")))
            r["bytes_on_disk"] = bytes_on_disk(r["path"])  # a folder without model.safetensors: one line
            r["params"] = sum(p.numel() for p in model.parameters())
    lat = cfg.latency
    measured = {m["name"]: m for m in measure_modules(timed, lat.seq_len, lat.batch_size, lat.threads,
                                                      repeats=lat.repeats, device=lat.device)}
    ref = next((r for r in rows if r["name"] == "teacher (fine-tuned)"), rows[0])
    for r in rows:
        r["latency_ms"] = measured[r["name"]]["latency_ms"]
        r["speedup"] = measured[ref["name"]]["latency_ms"] / r["latency_ms"]
        r["size_ratio"] = r["bytes_on_disk"] / ref["bytes_on_disk"]
        r["delta_score"] = r["score"] - ref["score"]
        r.update(kind={"finetune": "reference" if r is ref else "extra"}.get(r["stage"], "variant"), status="ok")
    for r, front in zip(rows, pareto_front(rows)):
        r["pareto"] = front
    table = write_parquet(to_table(rows, PIPELINE_SCHEMA), out / "pareto.parquet")
    text = pareto_markdown(rows, cfg.title, cfg.task, ref["name"])
    from raynas.atomic_io import atomic_file

    with atomic_file(out / "pareto.md") as tmp:
        tmp.write_text(text, encoding="utf-8")
    plot = plot_size_latency(rows, out / "pareto.png", cfg.title, cfg.task)
    return {"rows": rows, "table": str(table), "markdown": str(out / "pareto.md"), "plot": str(plot) if plot else None,
            "text": text}
