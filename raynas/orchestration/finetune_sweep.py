"""Ray Tune adapter for fine-tuning sweeps: one trial per (model, task, setting, seed).

The trial body is :func:`raynas.evaluation.finetune.finetune` (pure torch); this
module only builds the search space, runs one ``Tuner`` per task (tasks have
their own grids: SQuAD's differs from GLUE's), and turns Tune's results into
rows of one declared Arrow schema. Every trial lands in the table, failed ones
with their error, so a sweep is auditable afterwards.

Devices: a trial given GPUs (``gpus_per_trial``) fine-tunes on ``cuda`` -- Ray makes
exactly its GPUs visible to it -- and one without runs on ``cpu``; an explicit
``fixed.device`` wins. The device a trial ran on is in its row (``device``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from raynas.errors import ConfigError

# The papers' grid (AutoTinyBERT / NAS-BERT appendix): GLUE lr x epochs at batch 32; SQuAD one setting.
PAPER_GRID: dict[str, Any] = {"lr": [1e-5, 2e-5, 3e-5], "epochs": [4, 5, 10], "batch_size": [32]}
PAPER_TASK_GRIDS: dict[str, dict[str, Any]] = {
    "squad": {"lr": [3e-5], "epochs": [4], "batch_size": [16], "max_seq_len": [384]},
    "squad_v2": {"lr": [3e-5], "epochs": [4], "batch_size": [16], "max_seq_len": [384]},
}
METRICS = ("score", "accuracy", "f1", "mcc", "pearson", "spearmanr", "combined", "exact_match", "exact")
TRIAL_SCHEMA = pa.schema([
    ("model", pa.string()), ("task", pa.string()), ("lr", pa.float64()), ("epochs", pa.float64()),
    ("batch_size", pa.int32()), ("seed", pa.int32()), ("max_seq_len", pa.int32()), ("teacher", pa.string()),
    *((m, pa.float64()) for m in METRICS),
    ("train_time_s", pa.float64()), ("eval_time_s", pa.float64()), ("steps", pa.int64()), ("device", pa.string()),
    ("status", pa.string()), ("error", pa.string()), ("trial_id", pa.string()),
])


@dataclass
class SweepConfig:
    """What to fine-tune on what, and how to search.

    ``search`` maps a FinetuneConfig field to a list (grid) or to
    ``{"loguniform": [lo, hi]}``, ``{"uniform": [lo, hi]}``, ``{"choice": [...]}``
    (random, ``num_samples`` draws per grid point). ``task_search`` replaces it
    per task. ``fixed`` sets other FinetuneConfig fields for every trial.
    """

    models: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    data_dir: str | None = None
    search: dict[str, Any] = field(default_factory=lambda: dict(PAPER_GRID))
    task_search: dict[str, dict[str, Any]] = field(default_factory=lambda: dict(PAPER_TASK_GRIDS))
    num_samples: int = 1
    seeds: list[int] = field(default_factory=lambda: [42])
    fixed: dict[str, Any] = field(default_factory=dict)
    teachers: dict[str, str] = field(default_factory=dict)  # task -> fine-tuned teacher (task distillation)
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent_trials: int | None = None
    storage: str | None = None  # Ray Tune results folder (default: <out>/ray_results)

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"num_samples: expected >= 1, got {self.num_samples}")
        if self.cpus_per_trial <= 0:
            raise ValueError(f"cpus_per_trial: expected > 0, got {self.cpus_per_trial}")
        if self.gpus_per_trial < 0:
            raise ValueError(f"gpus_per_trial: expected >= 0, got {self.gpus_per_trial}")
        device = str(self.fixed.get("device", "auto"))
        if self.gpus_per_trial > 0 and device == "cpu":
            raise ValueError("fixed.device: cpu, but gpus_per_trial > 0 reserves GPUs no trial would use")
        if self.gpus_per_trial == 0 and device.startswith("cuda"):
            raise ValueError(f"fixed.device: {device} needs gpus_per_trial > 0 (a trial sees no GPU without one)")


def _finetune_fields() -> set[str]:
    from raynas.evaluation.finetune import FinetuneConfig

    return {f.name for f in dataclasses.fields(FinetuneConfig)}


def _space(spec: dict[str, Any], where: str) -> dict[str, Any]:
    from ray import tune

    out: dict[str, Any] = {}
    allowed = _finetune_fields()
    for key, value in spec.items():
        if key not in allowed:
            raise ConfigError(f"{where}.{key}: not a fine-tuning setting (one of {sorted(allowed)})")
        if isinstance(value, list):
            out[key] = tune.grid_search(value)
        elif isinstance(value, dict) and len(value) == 1:
            (kind, args), = value.items()
            makers = {"loguniform": tune.loguniform, "uniform": tune.uniform, "choice": tune.choice}
            if kind not in makers:
                raise ConfigError(f"{where}.{key}: unknown distribution {kind!r} (loguniform, uniform, choice)")
            out[key] = makers[kind](args) if kind == "choice" else makers[kind](*args)
        else:
            out[key] = value
    return out


def _trial(config: dict[str, Any]) -> None:
    """One Tune trial: fine-tune and report after each evaluation (runs in a Ray worker)."""
    import ray
    from ray import tune

    from raynas.evaluation.finetune import FinetuneConfig, finetune

    cfg = FinetuneConfig(**{k: v for k, v in config.items() if k in _finetune_fields()})
    cfg.device = trial_device(cfg.device, ray.get_gpu_ids())
    on_gpu = {"cuda": int(cfg.device.startswith("cuda"))}  # Tune metrics are numbers; the row names the device
    result = finetune(cfg, on_eval=lambda r: tune.report({**numeric_metrics(r), **on_gpu}))
    tune.report({**numeric_metrics(result), **on_gpu, "final": 1})


def trial_device(requested: str, gpu_ids: list[Any]) -> str:
    """The device a trial fine-tunes on: ``auto`` means cuda when Ray assigned this trial a GPU, else cpu.

    Decided from Ray's assignment rather than ``torch.cuda.is_available()`` alone, so
    a trial without GPUs stays on cpu even where a GPU is visible to the process
    (``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES``). Ray exposes exactly the
    assigned GPUs, so ``cuda`` is the first of them.
    """
    if requested != "auto":
        return requested
    return "cuda" if gpu_ids else "cpu"


def numeric_metrics(result: dict[str, Any]) -> dict[str, float]:
    """Tune metrics must be numbers; names and paths live in the trial config."""
    return {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def run_sweep(cfg: SweepConfig, out_dir: str | os.PathLike, tasks: list[str] | None = None) -> list[dict[str, Any]]:
    """Run every task's sweep on the current Ray cluster (or a local one); one row per trial.

    ``tasks``: :func:`preflight`'s result when the caller has already run it (checked before it took the folder's
    lock, so bad input leaves no folder behind).
    """
    from ray import tune

    from raynas.orchestration.cluster import connect

    tasks = tasks if tasks is not None else preflight(cfg)
    check_same_sweep(cfg, out_dir, write=True)  # before Ray starts: a changed config never mixes into old rows
    connect(log_to_driver=False)
    storage = Path(cfg.storage or Path(out_dir) / "ray_results").resolve()
    trainable = tune.with_resources(_trial, {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial})
    rows: list[dict[str, Any]] = []
    for task in tasks:
        search = cfg.task_search.get(task, cfg.search)
        space = {
            **{k: v for k, v in cfg.fixed.items()},
            **_space(search, f"task_search.{task}" if task in cfg.task_search else "search"),
            "model": tune.grid_search([str(Path(m).resolve()) if Path(m).exists() else m for m in cfg.models]),
            "task": task,
            "data_dir": str(Path(cfg.data_dir).resolve()) if cfg.data_dir else None,
            "threads": max(1, int(cfg.cpus_per_trial)),
        }
        if "seed" not in search:  # an explicit search.seed grid wins over `seeds`
            space["seed"] = tune.grid_search(list(cfg.seeds))
        if task in cfg.teachers:
            space["teacher"] = str(Path(cfg.teachers[task]).resolve())
        seeds = 1 if "seed" in search else len(cfg.seeds)
        print(f"sweep {task}: {len(cfg.models)} model(s) x {_grid_size(search) * cfg.num_samples * seeds} "
              f"setting(s)", file=sys.stderr, flush=True)
        experiment = storage / f"finetune-{task}"
        if tune.Tuner.can_restore(str(experiment)):  # a killed run: its finished trials are kept, never rerun
            tuner = tune.Tuner.restore(str(experiment), trainable, resume_unfinished=True, resume_errored=True,
                                       param_space=space)
            earlier = [r for r in tuner.get_results() if (r.metrics or {}).get("final")]
            print(f"sweep {task}: resuming {experiment}: {len(earlier)} trial(s) finished earlier, kept",
                  file=sys.stderr, flush=True)
        else:
            tuner = tune.Tuner(
                trainable, param_space=space,
                tune_config=tune.TuneConfig(metric="score", mode="max", num_samples=cfg.num_samples,
                                            max_concurrent_trials=cfg.max_concurrent_trials),
                run_config=tune.RunConfig(name=f"finetune-{task}", storage_path=str(storage), verbose=1),
            )
        rows += [_row(r, task) for r in tuner.fit()]
    return rows


SWEEP_FILE = "sweep.json"
_NOT_TRIAL_KEYS = ("max_concurrent_trials", "storage")  # how trials are scheduled, not what they compute


def check_same_sweep(cfg: SweepConfig, out_dir: str | os.PathLike, write: bool = False) -> None:
    """Refuse a sweep whose trial-defining config differs from the one recorded in ``OUT/sweep.json``.

    A rerun restores Tune's experiment, whose trials were drawn from the recorded config:
    mixing a changed grid into it would give a table no single config describes. With
    ``write``, record the config (atomically) for the next run.
    """
    import json

    from raynas.atomic_io import atomic_file
    from raynas.stages import config_diff

    record = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(SweepConfig) if f.name not in _NOT_TRIAL_KEYS}
    record = json.loads(json.dumps(record))
    path = Path(out_dir) / SWEEP_FILE
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: unreadable sweep record ({exc}); move it away to start the sweep afresh") \
                from None
        changed = config_diff(old, record)
        if changed:
            raise ConfigError(f"out: {Path(out_dir)} holds a sweep with a different config ({'; '.join(changed[:6])}"
                              f"{' ...' if len(changed) > 6 else ''}); use a new out, or remove {path} and its "
                              "ray_results to start over")
    elif write:
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def preflight(cfg: SweepConfig) -> list[str]:
    """Check tasks, data files and models in the driver, before any Ray worker starts; canonical task names."""
    from raynas.evaluation.tasks import canonical_task, load_task_split
    from raynas.teachers import hub_offline, hub_reachable, resolve_teacher

    if not cfg.models or not cfg.tasks:
        raise ConfigError("models and tasks: give at least one of each")
    tasks = [canonical_task(t) for t in cfg.tasks]
    splits = (cfg.fixed.get("train_split", "train"), cfg.fixed.get("eval_split", "validation"))
    offline = hub_offline("HF_DATASETS_OFFLINE")
    if cfg.data_dir is None and not offline:
        if not hub_reachable():  # else every trial would find out, after Ray started, minutes later
            raise ConfigError("data_dir: not given, so the tasks would come from the Hugging Face hub, which is "
                              "unreachable: give data_dir (GLUE TSV folders / SQuAD JSON), or set HF_HUB_OFFLINE=1 "
                              "to use datasets cached earlier")
    if cfg.data_dir is not None or offline:  # offline: the cache is read now, a miss is one line here
        for task in tasks:
            for split in splits:
                load_task_split(task, split, cfg.data_dir)  # names the file on a missing file, bad layout or label
    for model in [*cfg.models, *cfg.teachers.values()]:
        resolve_teacher(model)
    return tasks


def _grid_size(search: dict[str, Any]) -> int:
    return math.prod(len(v) for v in search.values() if isinstance(v, list)) or 1


def _row(result: Any, task: str) -> dict[str, Any]:
    from raynas.evaluation.finetune import FinetuneConfig

    defaults = {f.name: f.default for f in dataclasses.fields(FinetuneConfig)}
    c, m = {**defaults, **(result.config or {})}, result.metrics or {}
    error = result.error
    row: dict[str, Any] = {
        "model": c.get("model"), "task": task, "lr": c.get("lr"), "epochs": c.get("epochs"),
        "batch_size": c.get("batch_size"), "seed": c.get("seed"), "max_seq_len": c.get("max_seq_len"),
        "teacher": c.get("teacher"), "train_time_s": m.get("train_time_s"), "eval_time_s": m.get("eval_time_s"),
        "steps": m.get("steps"), "device": _device_name(m, c), "status": "error" if error else ("ok" if m.get("final") else "incomplete"),
        "error": (str(error).strip().splitlines() or [""])[-1][:500] if error else None,
        "trial_id": m.get("trial_id"),
    }
    row.update({k: (float(m[k]) if m.get(k) is not None else None) for k in METRICS})
    return row


def _device_name(metrics: dict[str, Any], config: dict[str, Any]) -> str | None:
    """cuda / cpu as the trial reported it; the configured device when it reported nothing (failed early)."""
    if "cuda" in metrics:
        return "cuda" if metrics["cuda"] else "cpu"
    return config.get("device")


def best_per_task(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best-of-grid: the highest-scoring finished trial per (model, task); nan scores lose."""
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        score = row.get("score")
        if row.get("status") != "ok" or score is None or math.isnan(score):
            continue
        key = (row["model"], row["task"])
        if key not in best or score > best[key]["score"]:
            best[key] = row
    return list(best.values())
