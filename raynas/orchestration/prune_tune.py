"""``raynas prune`` on Ray: a family of pruning targets as parallel Ray Tune trials, one Parquet row each.

Stages (a :class:`raynas.stages.StageRun`, so a rerun of the same folder skips what
is done and refuses a changed config):

1. ``finetune`` (only with ``finetune_from``): fine-tune a pre-trained model on the
   task first; the result is what gets pruned and what the pruned models distil from.
2. ``reference``: the unpruned model's dev score, by the same evaluation code.
3. ``latency`` (only with a ``speedup`` target): time pruned shapes of the model on
   this machine and fit the affine latency model the speedup targets are fractions of.
4. ``prune``: one Tune trial per (target, method): :func:`run_prune_job` (plain
   torch) with its own CPUs/GPUs. A finished job (its ``prune.json`` and model
   folder exist) is not run again, so a killed run resumes with the rest.
5. ``measure``: every pruned model timed interleaved with the unpruned one (batch 1 x
   128 on CPU: the family report's measurement); then ``trials.parquet``,
   ``pruning.md`` and the family report with its score-vs-speedup plot.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from raynas.compression.prune_run import PruneJob, finished
from raynas.compression.pruner import PruneSettings
from raynas.errors import ConfigError, require

DEV_METRICS = ("accuracy", "f1", "mcc", "pearson", "spearmanr", "exact_match", "exact")  # as the task reports them
ROWS_SCHEMA = pa.schema([
    ("name", pa.string()), ("method", pa.string()), ("kind", pa.string()), ("target", pa.float64()),
    ("target_fraction", pa.float64()), ("expected_fraction", pa.float64()), ("achieved_fraction", pa.float64()),
    ("params_sparsity", pa.float64()), ("flops_sparsity", pa.float64()), ("encoder_params", pa.int64()),
    ("encoder_flops", pa.int64()), ("params", pa.int64()), ("latency_ms", pa.float64()), ("speedup", pa.float64()),
    ("speedup_same_format", pa.float64()), ("predicted_speedup", pa.float64()), ("score", pa.float64()), ("delta_score", pa.float64()),
    *((m, pa.float64()) for m in DEV_METRICS),
    ("heads", pa.list_(pa.int32())), ("ffn", pa.list_(pa.int32())), ("max_abs_diff", pa.float64()),
    ("model_type", pa.string()), ("path", pa.string()), ("train_time_s", pa.float64()), ("status", pa.string()),
    ("error", pa.string()),
])


@dataclass
class TargetSpec:
    kind: str | None = None  # default: prune.kind
    target: float = 0.5
    name: str | None = None  # default: e.g. speedup-2x, params-0.6


@dataclass
class LatencySettings:
    """The measurement (AutoTinyBERT's protocol: CPU, batch 1 x 128, interleaved) and the latency-model fit."""

    device: str = "cpu"
    seq_len: int = 128
    batch_size: int = 1
    threads: int | None = None
    repeats: int = 20
    fit_samples: int = 24  # pruned shapes timed for the latency model (speedup targets)
    fit_repeats: int = 10
    min_r2: float = 0.9  # a poorer fit (a busy or noisy machine) stops the run instead of steering to wrong speedups


@dataclass
class PruneRunConfig:
    task: str = ""
    model: str | None = None  # a model fine-tuned on the task (folder or hub name)
    finetune_from: str | None = None  # or: a pre-trained model to fine-tune on the task first (stage finetune)
    data_dir: str | None = None
    squad_proxy: str | None = None  # a SQuAD file to split by article into OUT/squad-proxy/{train,dev} (the data)
    out: str = "runs/prune"
    targets: list[TargetSpec] = field(default_factory=lambda: [TargetSpec()])
    baselines: list[str] = field(default_factory=list)  # magnitude: the same targets without L0
    prune: PruneSettings = field(default_factory=PruneSettings)
    train: dict[str, Any] = field(default_factory=dict)  # FinetuneConfig fields of the pruning runs
    finetune: dict[str, Any] = field(default_factory=dict)  # FinetuneConfig fields of stage finetune
    distill: bool = True  # distil the unpruned model (logits; train.kd_* set the weights)
    latency: LatencySettings = field(default_factory=LatencySettings)
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent_trials: int | None = None
    title: str = "structured pruning (L0 heads + FFN)"


def _job_name(spec: TargetSpec, kind: str, method: str) -> str:
    base = spec.name or (f"{kind}-{spec.target:g}x" if kind == "speedup" else f"{kind}-{spec.target:g}")
    return base if method == "l0" else f"{base}-{method}"


def jobs(cfg: PruneRunConfig, model: str, latency: dict[str, float] | None) -> list[PruneJob]:
    """Every (target, method) as a :class:`PruneJob` under ``OUT/jobs/NAME``."""
    out = []
    for spec in cfg.targets:
        kind = spec.kind or cfg.prune.kind
        for method in ("l0", *cfg.baselines):
            settings = {**asdict(cfg.prune), "kind": kind, "target": spec.target, "method": method}
            name = _job_name(spec, kind, method)
            out.append(PruneJob(name, cfg.task, model, str((Path(cfg.out) / "jobs" / name).resolve()), settings,
                                _train_fields(cfg), cfg.distill, latency if kind == "speedup" else None))
    return out


def _train_fields(cfg: PruneRunConfig) -> dict[str, Any]:
    data_dir = str(Path(cfg.data_dir).resolve()) if cfg.data_dir else None
    return {**cfg.train, "data_dir": data_dir}


def preflight(cfg: PruneRunConfig, split_pending: bool = False) -> None:
    """Every check that needs no training, in the driver, before Ray starts; one message naming the field.

    ``split_pending``: ``data_dir`` is the SQuAD proxy split still to be made; its source is checked instead.
    """
    from raynas.compression.targets import TARGET_KINDS
    from raynas.evaluation.finetune import check_fields
    from raynas.evaluation.tasks import get_task, load_task_split

    require(bool(cfg.task), "task: which task to prune for (sst2, qnli, squad, ...)")
    task = get_task(cfg.task)
    require((cfg.model is None) != (cfg.finetune_from is None),
            "model / finetune_from: give exactly one (a fine-tuned model, or a pre-trained one to fine-tune first)")
    require(bool(cfg.targets), "targets: give at least one target")
    cfg.prune.check()
    for i, spec in enumerate(cfg.targets):
        kind = spec.kind or cfg.prune.kind
        require(kind in TARGET_KINDS, f"targets[{i}].kind: expected one of {', '.join(TARGET_KINDS)}, got {kind!r}")
        if kind == "speedup":
            require(spec.target > 1.0, f"targets[{i}].target: a speedup must be > 1, got {spec.target!r}")
        else:
            require(0.0 < spec.target < 1.0, f"targets[{i}].target: a {kind} sparsity must be in (0, 1), got {spec.target!r}")
    for method in cfg.baselines:
        require(method == "magnitude", f"baselines: unknown baseline {method!r} (magnitude)")
    names = [j.name for j in jobs(cfg, "-", None)]
    dupes = sorted({n for n in names if names.count(n) > 1})
    require(not dupes, f"targets: two jobs named {', '.join(dupes)}; give them distinct names")
    for section in ("train", "finetune") if cfg.finetune_from is not None else ("train",):  # finetune: only then used
        fields = getattr(cfg, section)
        teacher = "-" if section == "train" and cfg.distill else fields.get("teacher")  # jobs distil the source
        check_fields(section, cfg.task, fields, teacher, drop=("data_dir", "teacher"))
    if cfg.squad_proxy is not None:
        from raynas.evaluation.tasks import load_squad_articles

        require(task.kind == "extractive_qa", f"squad_proxy: task {task.name} is not SQuAD")
        load_squad_articles(cfg.squad_proxy)  # names a missing or malformed file
    if cfg.data_dir is not None and not split_pending:
        for split in ("train", "validation"):
            load_task_split(task.name, split, cfg.data_dir)  # names the missing or malformed file
    if cfg.model is not None:
        check_task_head(cfg.model, task)
    _check_writable(Path(cfg.out))


def check_task_head(model: str, task: Any) -> None:
    """The model to prune must carry a head trained on the task: pruning keeps what it predicts."""
    from transformers import AutoConfig

    from raynas.teachers import resolve_teacher

    where = resolve_teacher(model, "model")
    try:
        config = AutoConfig.from_pretrained(where)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model {model!r}: cannot read its config ({str(exc).splitlines()[0]})") from None
    want = "ForQuestionAnswering" if task.kind == "extractive_qa" else "ForSequenceClassification"
    archs = list(getattr(config, "architectures", None) or [])
    require(any(a.endswith(want) for a in archs),
            f"model {model!r}: no {want[3:]} head (architectures {archs}); fine-tune it on {task.name} first "
            f"(or give it as finetune_from)")
    if task.kind != "extractive_qa":
        require(config.num_labels == task.num_labels,
                f"model {model!r}: {config.num_labels} label(s), task {task.name} has {task.num_labels}")


def _check_writable(out: Path) -> None:
    from raynas.atomic_io import check_writable

    check_writable(out, "out")


# ---- trials ----------------------------------------------------------------------------------
def _trial(config: dict[str, Any]) -> None:
    """One Tune trial: one pruning job (runs in a Ray worker)."""
    import ray
    from ray import tune

    from raynas.compression.prune_run import run_prune_job
    from raynas.orchestration.finetune_sweep import numeric_metrics
    from raynas.orchestration.job_trials import trial_resources

    job = PruneJob(**trial_resources(config["job"], config["cpus"], ray.get_gpu_ids()))
    record = run_prune_job(job, on_eval=lambda r: tune.report(numeric_metrics(r)))
    tune.report({**numeric_metrics(record["results"]), "achieved_fraction": record["achieved_fraction"], "final": 1})


def run_jobs(cfg: PruneRunConfig, todo: list[PruneJob]) -> dict[str, str]:
    """Run the unfinished jobs as Tune trials; job name -> error line for those that failed."""
    from raynas.orchestration.job_trials import run_job_trials

    pending = [j for j in todo if finished(j.out_dir) is None]
    done = len(todo) - len(pending)
    print(f"prune: {len(todo)} job(s), {done} finished earlier, {len(pending)} to run", file=sys.stderr, flush=True)
    return run_job_trials("prune", _trial, [asdict(j) for j in pending], Path(cfg.out), cfg.cpus_per_trial,
                          cfg.gpus_per_trial, cfg.max_concurrent_trials)


# ---- rows and report -------------------------------------------------------------------------
def rows_for(todo: list[PruneJob], records: dict[str, dict[str, Any] | None], errors: dict[str, str],
             measured: dict[str, dict[str, Any]], reference_score: float) -> list[dict[str, Any]]:
    """One row per job from its record (None: it did not finish) and its measured latency."""
    rows = []
    for job in todo:
        record = records.get(job.name)
        if record is None:
            rows.append({"name": job.name, "method": job.settings.get("method"), "kind": job.settings.get("kind"),
                         "target": job.settings.get("target"), "status": "error",
                         "error": errors.get(job.name, "no record (the trial did not finish)")})
            continue
        m = measured.get(record["path"], {})
        score = float(record["results"]["score"])
        rows.append({
            **{k: record[k] for k in ("name", "method", "kind", "target", "target_fraction", "expected_fraction",
                                      "achieved_fraction", "params_sparsity", "flops_sparsity", "encoder_params",
                                      "encoder_flops", "predicted_speedup", "max_abs_diff", "model_type", "path")},
            "params": m.get("params"), "latency_ms": m.get("latency_ms"), "speedup": m.get("speedup"),
            "speedup_same_format": m.get("speedup_same_format"),
            "score": score, "delta_score": score - reference_score,
            **{k: float(record["results"][k]) for k in DEV_METRICS if record["results"].get(k) is not None},
            "heads": [layer["heads"] for layer in record["layers"] if layer["op"] == "mha"],
            "ffn": [layer["inner"] for layer in record["layers"] if layer["op"] == "ffn"],
            "train_time_s": record["results"].get("train_time_s"), "status": "ok", "error": None,
        })
    return rows


def pruning_markdown(rows: list[dict[str, Any]], reference: dict[str, Any], title: str, task: str) -> str:
    """The per-target table: what was asked, what was achieved, what it costs and scores."""
    from raynas.evaluation.report import fmt_number, score_scale

    scale = score_scale(task)
    head = ("| job | method | target | achieved | params sparsity | FLOPs sparsity | latency (ms) | speedup "
            "(measured / same format / predicted) | score | vs unpruned | gated vs removed |")
    lines = [f"# {title}", "", head, "|" + "---|" * 11,
             f"| unpruned | - | - | - | 0.0% | 0.0% | {reference.get('latency_ms', math.nan):.1f} | 1.00x / "
             f"{fmt_number(reference.get('speedup_same_format'), '.2f')}x | {scale * reference['score']:.2f} | - | - |"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['name']} | {r['method']} | {r['target']:g} | failed: {r['error']} |" + " |" * 7)
            continue
        asked = f"{r['target']:g}x" if r["kind"] == "speedup" else f"{100 * r['target']:.0f}% {r['kind']}"
        achieved = (f"{1 / r['achieved_fraction']:.2f}x pred." if r["kind"] == "speedup"
                    else f"{100 * (1 - r['achieved_fraction']):.1f}% {r['kind']}")
        pred = f"{r['predicted_speedup']:.2f}x" if r.get("predicted_speedup") else "-"
        lines.append(f"| {r['name']} | {r['method']} | {asked} | {achieved} | {100 * r['params_sparsity']:.1f}% | "
                     f"{100 * r['flops_sparsity']:.1f}% | {fmt_number(r['latency_ms'], '.1f')} | "
                     f"{fmt_number(r['speedup'], '.2f')}x / {fmt_number(r.get('speedup_same_format'), '.2f')}x / {pred} | "
                     f"{scale * r['score']:.2f} | "
                     f"{scale * r['delta_score']:+.2f} | {r['max_abs_diff']:.1e} |")
    lines += ["", "achieved: the remaining size of the exported model against the target's measure (sparsity = 1 - "
              "remaining fraction; speedups: the fitted latency model's prediction). Latency: base encoder, batch "
              "1 x 128, timed interleaved with the unpruned model; same format: against the unpruned model converted to "
              "raynas' modules (what the latency model was fitted on). gated vs removed: the largest difference between "
              "the gated model's and the exported model's outputs on a padded batch."]
    return "\n".join(lines) + "\n"
