"""``raynas autotinybert``: the whole AutoTinyBERT method in one resumable run folder.

Stages (each a library function of its own recipe; this module only wires them
and decides what a rerun skips, see :class:`raynas.stages.StageRun`):

1. ``supernet``: train the SuperPLM (``raynas supernet``; optionally seeded from a
   teacher first, as ``raynas init --teacher`` does) -> ``RUN/supernet-train/supernet``
2. ``latency``: measure sampled archs on this node type, fit the predictor (``raynas latency``) -> ``RUN/latency``
3. ``search``: evolutionary search on Ray Tune for every budget at once (``raynas search``) -> ``RUN/search``
4. ``extract``: the chosen arch of each budget as a transformers folder (``raynas extract``) -> ``RUN/extracted``
5. ``further``: further training of each (``raynas train``; stage 3 of the paper) -> ``RUN/further/<arch>/model``
6. ``measure``: every final model re-timed against the reference, interleaved, with the predictor's protocol
7. ``report``: ``RUN/models.parquet``, ``RUN/pareto.png``, ``RUN/report.md``

A model measured over its budget is flagged ``meets_budget = false`` and the
report says so; it is never reported as meeting it.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raynas.config_loading import FieldErrors, load_section, merge_dicts
from raynas.errors import ConfigError
from raynas.search.config import SearchConfig
from raynas.search.latency_data import LatencyConfig
from raynas.training.config import TrainConfig

BASELINE = "baseline:"  # key prefix of baseline models (a searched arch may equal a baseline's, with other weights)
STAGES = ("supernet", "latency", "search", "extract", "further", "measure", "report")


@dataclass
class InitConfig:
    """Seed the supernet from a teacher (its largest sub-model is the teacher) before training; off when null."""

    teacher: str | None = None
    strategy: str = "heads"  # heads (MLM space) | dims (KD space: all heads kept, so attention maps can be matched)


@dataclass
class PipelineConfig:
    """One ``raynas autotinybert`` run; every stage's section, checked together into one error."""

    out: str = "runs/autotinybert"
    init: InitConfig = field(default_factory=InitConfig)
    supernet: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields (its `out` is RUN/supernet-train)
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    further: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields over the supernet's; steps: 0 skips
    # with init.teacher: archs taken from the *teacher-seeded* supernet (e.g. 3-384-1536-12-384 = the teacher's
    # first 3 layers), trained and measured exactly like the winners: the "pre-trained fewer layers" baseline
    baselines: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        problems = []
        if self.baselines and not self.init.teacher:
            problems.append("baselines: need init.teacher (they are cut from the teacher-seeded supernet)")
        if self.init.strategy not in ("heads", "dims"):
            problems.append(f"init.strategy: expected heads or dims, got {self.init.strategy!r}")
        if "out" in self.supernet or "out" in self.further:
            problems.append("supernet.out / further.out: set by the pipeline (under `out`); remove them")
        if problems:
            raise FieldErrors(problems)


def run_dir(cfg: PipelineConfig) -> Path:
    return Path(cfg.out).expanduser().resolve()


def supernet_train_config(cfg: PipelineConfig) -> TrainConfig:
    """The supernet stage's TrainConfig; with ``init.teacher``, it starts from RUN/init (the teacher-seeded supernet)."""
    raw = dict(cfg.supernet)
    raw["out"] = str(run_dir(cfg) / "supernet-train")
    if cfg.init.teacher:
        if raw.get("space") or raw.get("init_from"):
            raise ConfigError("supernet.space / supernet.init_from: not with init.teacher (the space is built "
                              "around the teacher)")
        raw["init_from"] = str(run_dir(cfg) / "init")
        raw.setdefault("tokenizer", cfg.init.teacher)
    return load_section(TrainConfig, raw, "supernet")


def further_train_config(cfg: PipelineConfig, model_dir: str, out: Path) -> TrainConfig:
    """Further training of one extracted model: the supernet's data and objective, ``further`` over them."""
    base = {k: v for k, v in cfg.supernet.items() if k not in ("space", "space_overrides", "init_from", "sampler")}
    raw = merge_dicts(base, cfg.further)
    raw.pop("steps", None) if raw.get("steps") == 0 else None
    raw.update(out=str(out), model=model_dir, name="further")
    if cfg.init.teacher:
        raw.setdefault("tokenizer", cfg.init.teacher)
    return load_section(TrainConfig, raw, "further")


def further_steps(cfg: PipelineConfig) -> int:
    """0 skips further training (the extracted models are the final ones)."""
    steps = cfg.further.get("steps", cfg.supernet.get("steps", 100))
    return int(steps) if isinstance(steps, int) else -1


def search_config(cfg: PipelineConfig) -> SearchConfig:
    """``search`` with the proxy fitness the paper prescribes: the supernet's own objective and validation data.

    The pipeline fills ``corpus``, ``objective``, ``teacher``, the KD weights and
    ``mlm_probability`` from the supernet section, so search ranks archs by the
    loss the supernet was trained to lower; FLOPs are counted at the latency
    stage's sequence length.
    """
    tcfg = supernet_train_config(cfg)
    o = tcfg.objective
    return dataclasses.replace(cfg.search, corpus=tcfg.corpus, objective=o.mode, teacher=o.teacher,
                               hidden_weight=o.hidden_weight if o.mode == "kd" else cfg.search.hidden_weight,
                               attention_weight=o.attention_weight if o.mode == "kd" else 0.0,
                               mlm_probability=o.mlm_probability, seq_len=cfg.latency.seq_len)


def stage_configs(cfg: PipelineConfig) -> dict[str, dict[str, Any]]:
    """What each stage's output depends on (a stage is refused on a rerun when this changed)."""
    sup = dataclasses.asdict(supernet_train_config(cfg))
    lat = dataclasses.asdict(cfg.latency)
    sea = dataclasses.asdict(search_config(cfg))
    fur = {"further": cfg.further}
    return {
        "supernet": {"init": dataclasses.asdict(cfg.init), "supernet": sup},
        "latency": {"latency": lat, "init": dataclasses.asdict(cfg.init), "space": cfg.supernet.get("space"),
                    "space_overrides": cfg.supernet.get("space_overrides")},
        "search": {"search": sea},  # the budgets are in it: a new budget is answered by `raynas search --answer`
        "extract": {"baselines": list(cfg.baselines)},
        "further": {**fur, "baselines": list(cfg.baselines)},
        "measure": {"latency": lat},
        "report": {},
    }


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- stages


def stage_supernet(cfg: PipelineConfig) -> dict[str, Any]:
    """Train the supernet (seeding it from ``init.teacher`` first when set); its folder and final metrics."""
    from raynas.orchestration.supernet_training import run_training

    tcfg = supernet_train_config(cfg)
    if cfg.init.teacher and not (run_dir(cfg) / "init").is_dir():
        from raynas.supernet import save_supernet
        from recipes.init import supernet_around_teacher

        net, tokenizer = supernet_around_teacher(cfg.init.teacher, cfg.init.strategy)
        net.set_active(net.space.largest())
        save_supernet(net, run_dir(cfg) / "init", tokenizer)
        say(f"supernet: seeded from {cfg.init.teacher} (space {net.space.name!r}, largest {net.space.largest()})")
    metrics = run_training(tcfg)
    return {"supernet": str(Path(tcfg.out) / "supernet"),
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}


def stage_latency(cfg: PipelineConfig, supernet_dir: str) -> dict[str, Any]:
    """Latency dataset of sampled archs timed as Ray tasks on the configured node type, and the fitted predictor."""
    from raynas.orchestration.latency_tasks import runner_from_config
    from raynas.search.latency_data import build_latency_predictor
    from raynas.supernet import load_supernet

    net = load_supernet(supernet_dir)
    out = run_dir(cfg) / "latency"
    predictor = build_latency_predictor(net.space, out, config=cfg.latency, supernet_config=net.config.to_dict(),
                                        runner=runner_from_config(cfg.latency))
    return {"predictor": str(out / "predictor"), "kind": predictor.kind, "metrics": predictor.metrics,
            "reference_ms": predictor.reference_ms}


def stage_extract(cfg: PipelineConfig, supernet_dir: str, chosen: list[dict[str, Any]]) -> dict[str, Any]:
    """Export each chosen arch (deduplicated: one arch may win several budgets) as a transformers folder."""
    from raynas.supernet import load_supernet, load_supernet_tokenizer
    from recipes.extract import extract_family, folder_name

    net = load_supernet(supernet_dir)
    tokenizer = load_supernet_tokenizer(supernet_dir)
    archs = sorted({r["arch"] for r in chosen if r.get("arch")})
    out = run_dir(cfg) / "extracted"
    todo = [a for a in archs if not (out / folder_name(a)).is_dir()]
    extract_family(net, tokenizer, todo, out, overwrite=True)
    models = {a: str(out / folder_name(a)) for a in archs}
    if cfg.baselines:  # from the teacher-seeded supernet, before any supernet training
        init = run_dir(cfg) / "init"
        teacher_net = load_supernet(init)
        base_out = run_dir(cfg) / "baselines"
        archs = [teacher_net.space.format(teacher_net.space.validate(a)) for a in cfg.baselines]
        extract_family(teacher_net, load_supernet_tokenizer(init),
                       [a for a in archs if not (base_out / folder_name(a)).is_dir()], base_out, overwrite=True)
        models.update({BASELINE + a: str(base_out / folder_name(a)) for a in archs})
    return {"models": models}


def stage_further(cfg: PipelineConfig, extracted: dict[str, str]) -> dict[str, Any]:
    """Further training of every extracted model (same data and objective as the supernet); final folders."""
    from raynas.orchestration.supernet_training import run_training
    from recipes.extract import folder_name

    if further_steps(cfg) == 0:
        say("further: steps 0, the extracted models are the final ones")
        return {"models": dict(extracted), "metrics": {}}
    finals, metrics = {}, {}
    for i, (arch, path) in enumerate(sorted(extracted.items()), 1):
        out = run_dir(cfg) / "further" / folder_name(arch)
        say(f"further: model {i}/{len(extracted)} {arch}")
        got = run_training(further_train_config(cfg, path, out))
        finals[arch] = str(out / "model")
        metrics[arch] = {k: v for k, v in got.items() if isinstance(v, (int, float))}
    return {"models": finals, "metrics": metrics}


def stage_search(cfg: PipelineConfig, supernet_dir: str, predictor_dir: str) -> dict[str, Any]:
    """Evolutionary search for every budget at once on Ray Tune; the chosen arch per budget and the cost figures."""
    from raynas.orchestration.search_tune import run_search, summary_dict
    from raynas.search.constraints import Constraint
    from raynas.search.predictor import LatencyPredictor
    from raynas.supernet import load_supernet

    scfg = search_config(cfg)
    net = load_supernet(supernet_dir)
    predictor = LatencyPredictor.load(predictor_dir)
    constraint = Constraint(net.space, scfg.constraint, predictor, seq_len=scfg.seq_len)
    run = run_search(scfg, supernet_dir, constraint, run_dir(cfg) / "search", progress=say)
    if not run.done:
        raise RuntimeError("search stopped before its last generation; rerun to resume it")
    return {**summary_dict(run), "chosen": run.chosen, "reference_ms": predictor.reference_ms}


def _models_schema() -> Any:
    """One row per budget: the final model, its predicted and re-measured latency, and whether it meets the budget."""
    import pyarrow as pa

    f64 = pa.float64()
    return pa.schema([
        ("budget", pa.string()), ("budget_value", f64), ("unit", pa.string()), ("arch", pa.string()),
        ("path", pa.string()), ("params", pa.int64()), ("proxy_loss", f64),
        ("val_loss_before", f64), ("val_loss_after", f64),  # further training's validation loss, first and last
        ("predicted_latency_ms", f64), ("measured_latency_ms", f64), ("measured_latency_p90_ms", f64),
        ("reference_latency_ms", f64), ("predicted_speedup", f64), ("measured_speedup", f64),
        ("meets_budget", pa.bool_()), ("note", pa.string()),
    ])


def _reference_folder(cfg: PipelineConfig, supernet_dir: str) -> str:
    """What final models are timed against: the latency stage's reference, as a folder or a model name."""
    ref = cfg.latency.reference or "largest"
    if ref != "largest":
        return ref
    from raynas.supernet import load_supernet, load_supernet_tokenizer
    from recipes.extract import extract_family, folder_name

    net = load_supernet(supernet_dir)
    largest = net.space.format(net.space.largest())
    target = run_dir(cfg) / "reference" / folder_name(largest)
    if not target.is_dir():
        extract_family(net, load_supernet_tokenizer(supernet_dir), [largest], target.parent, overwrite=True)
    return str(target)


def stage_measure(cfg: PipelineConfig, supernet_dir: str, search: dict[str, Any], finals: dict[str, str],
                  further_metrics: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Re-time every final model interleaved with the reference (the predictor's protocol); one row per budget.

    A model whose measured latency is over its budget gets ``meets_budget = false``
    (speedup budgets are checked against the reference timed in this same run).
    """
    from raynas.evaluation.latency import compare_latency
    from raynas.orchestration.supernet_training import first_metric

    lat = cfg.latency
    reference = _reference_folder(cfg, supernet_dir)
    paths = sorted(set(finals.values()))
    say(f"measure: {len(paths)} final model(s) against {reference}, {lat.repeats} repeats each, interleaved")
    timed = compare_latency(paths, reference, seq_len=lat.seq_len, batch_size=lat.batch_size, threads=lat.threads,
                            warmup=lat.warmup, repeats=lat.repeats, seed=lat.seed, device=lat.device)
    key = "latency_min_ms" if lat.statistic == "min" else "latency_ms"  # the statistic the predictor was fitted on
    by_path = {r["model"]: {**r, "latency_ms": r[key]} for r in timed}
    ref_ms = by_path[reference]["latency_ms"]
    speedups = _budget_speedups(search)
    rows = []
    for c in search["chosen"]:
        row: dict[str, Any] = {"budget": c["budget"], "budget_value": c["budget_value"], "unit": c["unit"],
                               "arch": c.get("arch"), "note": c.get("note") or ""}
        if not c.get("arch"):
            rows.append({**row, "meets_budget": False})
            continue
        path = finals[c["arch"]]
        t = by_path[path]
        m = further_metrics.get(c["arch"], {})
        speedup = ref_ms / t["latency_ms"]
        if speedups.get(c["budget"]) is not None:
            meets = speedup >= speedups[c["budget"]]
        elif c["unit"] == "ms":
            meets = t["latency_ms"] <= c["budget_value"]
        else:
            meets = c["cost"] <= c["budget_value"]  # params / FLOPs are exact counts
        note = row["note"] or ("" if meets else "measured over its budget after export")
        rows.append({**row, "path": path, "params": t["params"], "proxy_loss": c["proxy_loss"],
                     "val_loss_before": first_metric(m, "initial_val_loss"),
                     "val_loss_after": first_metric(m, "val_loss"),
                     "predicted_latency_ms": c.get("predicted_latency_ms"), "measured_latency_ms": t["latency_ms"],
                     "measured_latency_p90_ms": t["latency_p90_ms"], "reference_latency_ms": ref_ms,
                     "predicted_speedup": c.get("predicted_speedup"), "measured_speedup": speedup,
                     "meets_budget": bool(meets), "note": note})
    for key in sorted(k for k in finals if k.startswith(BASELINE)):
        t, m = by_path[finals[key]], further_metrics.get(key, {})
        rows.append({"budget": "baseline", "unit": "ms", "arch": key[len(BASELINE):], "path": finals[key],
                     "params": t["params"], "val_loss_before": first_metric(m, "initial_val_loss"),
                     "val_loss_after": first_metric(m, "val_loss"), "measured_latency_ms": t["latency_ms"],
                     "measured_latency_p90_ms": t["latency_p90_ms"], "reference_latency_ms": ref_ms,
                     "measured_speedup": ref_ms / t["latency_ms"], "note": "cut from the teacher, trained the same way"})
    _cards_with_latency(rows, reference, ref_ms, lat)
    return {"reference": reference, "reference_ms": ref_ms, "models": rows}


def _cards_with_latency(rows: list[dict[str, Any]], reference: str, ref_ms: float, lat: LatencyConfig) -> None:
    """Each measured model's card (README.md) gets its measured latency and speedup over the reference."""
    from raynas.model_card import set_card_latency

    for r in rows:
        if r.get("path") and r.get("measured_latency_ms") is not None:
            set_card_latency(r["path"], {
                "latency_ms": r["measured_latency_ms"], "latency_p90_ms": r.get("measured_latency_p90_ms"),
                "speedup": r.get("measured_speedup"), "reference": reference, "reference_ms": ref_ms,
                "batch_size": lat.batch_size, "seq_len": lat.seq_len, "threads": lat.threads, "device": lat.device})


def _budget_speedups(search: dict[str, Any]) -> dict[str, float | None]:
    """Budget label -> the N of an ``Nx`` budget (None for absolute ones), as the search parsed it."""
    return {b["label"]: b["speedup"] for b in search["budgets"]}


def stage_report(cfg: PipelineConfig, records: dict[str, Any], latency: dict[str, Any], search: dict[str, Any],
                 measured: dict[str, Any]) -> dict[str, Any]:
    """``RUN/models.parquet``, ``RUN/pareto.png`` and ``RUN/report.md`` from the stages' stored results."""
    from raynas.search.constraints import Budget
    from raynas.search.pareto import pareto_front
    from raynas.search.report import markdown_table, pareto_plot, write_report
    from raynas.search.results import EVALUATED_FILE, ResultStore
    from raynas.tables import to_table, write_parquet

    root = run_dir(cfg)
    models = measured["models"]
    table = write_parquet(to_table(models, _models_schema()), root / "models.parquet")
    evaluated = ResultStore(Path(search["out_dir"]) / EVALUATED_FILE).rows()
    budgets = [Budget(**{k: b[k] for k in ("label", "value", "unit", "speedup")}) for b in search["budgets"]]
    unit = budgets[0].unit if budgets else "ms"
    front = pareto_front(evaluated, unit) if unit == "ms" else []
    ref_ms = latency.get("reference_ms")
    # speedup budgets are judged by measured speedup over the reference timed with the models, so the measured
    # point is that speedup on the predictor's scale (its reference / measured speedup): comparable with the lines
    searched = [r for r in models if r["budget"] != "baseline" and r.get("arch")]
    speedups = _budget_speedups(search)
    marks = [{**r, "plot_measured_ms": ref_ms / r["measured_speedup"]} if ref_ms and r.get("measured_speedup")
             and speedups.get(r["budget"]) is not None else r for r in searched]
    plot = pareto_plot(evaluated, front, marks, {b.label: b.value for b in budgets if b.unit == "ms"},
                       root / "pareto.png", title=f"raynas autotinybert: {len(evaluated)} archs evaluated",
                       reference_ms=latency.get("reference_ms"))
    m = latency.get("metrics") or {}
    timing = search.get("timing") or {}
    stages = "\n".join(f"| {name} | {records.get(name, {}).get('seconds', '–')} |" for name in STAGES[:-1])
    over = [r for r in searched if not r.get("meets_budget")]
    sections = [
        ("Models", markdown_table(models, ["budget", "arch", "params", "proxy_loss", "val_loss_after",
                                           "predicted_latency_ms", "measured_latency_ms", "predicted_speedup",
                                           "measured_speedup", "meets_budget"])
         + f"\n\nReference: `{measured['reference']}`, {measured['reference_ms']:.2f} ms measured in the same "
           f"run (interleaved). Speedups are reference / model latency; a speedup budget (`Nx`) is met when "
           f"the measured speedup is at least N, an `ms` budget when the measured latency is within it; "
         + ("**over budget after export: " + ", ".join(f"{r['budget']} ({r['arch']})" for r in over) + "** — these "
            "models do not meet their budget; take the next candidate with `raynas search --answer`."
            if over else "every model meets its budget as measured.")),
        ("Latency predictor", f"kind `{latency.get('kind')}`; held-out MAPE {m.get('mape', float('nan')):.2f} %, "
                              f"RMSE {m.get('rmse_ms', float('nan')):.3f} ms, Kendall τ "
                              f"{m.get('kendall_tau', float('nan')):.3f}; re-measurement noise MAPE "
                              f"{m.get('noise_mape') if m.get('noise_mape') is not None else float('nan'):.2f} %."),
        ("Search", f"{search.get('evaluated')} archs evaluated; {timing.get('eval_s_per_arch', float('nan')):.3f} s "
                   f"per arch evaluation; Ray Tune overhead {timing.get('tune_overhead_s_per_trial', float('nan')):.2f}"
                   f" s per trial ({int(timing.get('trials', 0))} trials). Plot: "
                   + ("`pareto.png`" if plot else "skipped (pip install matplotlib)")),
        ("Stages (seconds)", "| stage | seconds |\n|---|---|\n" + stages),
    ]
    report = write_report(root / "report.md", f"raynas autotinybert: {root.name}", sections)
    return {"models": str(table), "plot": str(plot) if plot else None, "report": str(report)}


class _ParseOnly:
    """Stands in for the predictor while only the *syntax* of latency budgets can be checked (no data yet)."""

    reference_ms = 1.0
    space_name = None

    def predict(self, archs: Any) -> list[float]:
        return [0.0 for _ in archs]


def preflight(cfg: PipelineConfig) -> dict[str, dict[str, Any]]:
    """Every check possible before Ray starts; returns the per-stage configs (refused if a recorded one changed).

    Budgets are fully checked (against the smallest arch) here when the
    constraint is params/FLOPs or the predictor already exists; a latency budget
    on a first run is checked for syntax now and for range right after the
    latency stage, before search spends anything.
    """
    from raynas.search.constraints import Constraint
    from raynas.search.latency_data import check_reference
    from raynas.spaces import load_space
    from raynas.teachers import resolve_teacher

    tcfg = supernet_train_config(cfg)
    scfg = search_config(cfg)
    configs = stage_configs(cfg)
    if cfg.init.teacher:
        resolve_teacher(cfg.init.teacher, "init.teacher")
        space = None
    else:
        from raynas.orchestration.supernet_training import preflight as train_preflight

        train_preflight(tcfg)
        space = load_space(tcfg.space, tcfg.space_overrides or None) if tcfg.space else None
    check_reference(cfg.latency.reference)
    if space is not None:
        if scfg.constraint != "latency":
            Constraint(space, scfg.constraint, seq_len=scfg.seq_len).budgets(scfg.budgets)
        else:
            predictor_dir = run_dir(cfg) / "latency" / "predictor"
            if predictor_dir.is_dir():
                from raynas.search.predictor import LatencyPredictor

                Constraint(space, "latency", LatencyPredictor.load(predictor_dir), scfg.seq_len).budgets(scfg.budgets)
            else:
                probe = Constraint(space, "latency", _ParseOnly(), seq_len=scfg.seq_len)  # type: ignore[arg-type]
                for text in scfg.budgets:
                    probe.parse_budget(text)
    return configs


def check(cfg: PipelineConfig) -> tuple[Any, dict[str, dict[str, Any]]]:
    """:func:`preflight` plus the run folder's recorded stages (a changed config refused): what a run, and a dry
    run, does before any work. Returns the folder's :class:`~raynas.stages.StageRun` and the stage configs."""
    from raynas.atomic_io import check_writable
    from raynas.stages import StageRun

    check_writable(run_dir(cfg), "out")
    configs = preflight(cfg)
    stages = StageRun(run_dir(cfg), list(STAGES), log=say)
    stages.check(configs)
    return stages, configs


def run_pipeline(cfg: PipelineConfig) -> dict[str, Any]:
    """All seven stages in ``cfg.out``; each skipped when done, refused when its config changed (checked first)."""
    stages, configs = check(cfg)
    say(f"autotinybert: run folder {run_dir(cfg)}")
    sup = stages.run("supernet", configs["supernet"], lambda: stage_supernet(cfg))
    lat = stages.run("latency", configs["latency"], lambda: stage_latency(cfg, sup["supernet"]))
    sea = stages.run("search", configs["search"], lambda: stage_search(cfg, sup["supernet"], lat["predictor"]))
    ext = stages.run("extract", configs["extract"], lambda: stage_extract(cfg, sup["supernet"], sea["chosen"]))
    fur = stages.run("further", configs["further"], lambda: stage_further(cfg, ext["models"]))
    mea = stages.run("measure", configs["measure"],
                     lambda: stage_measure(cfg, sup["supernet"], sea, fur["models"], fur["metrics"]))
    rep = stages.run("report", configs["report"], lambda: stage_report(cfg, stages.records, lat, sea, mea))
    return {"models": mea["models"], "table": rep["models"], "plot": rep["plot"], "report": rep["report"],
            "run": str(run_dir(cfg))}
