"""``raynas quantize`` on Ray: every compression variant of a model as a Ray Tune trial, one Parquet row each.

A variant is one method with its settings (post-training int8, QAT, k-means weight
sharing, mixed precision, gradual / block pruning), applied to the run's model or to
another variant's output (``source``): "pruned + quantized" is k-means on the
pruned variant's folder. Variants that read another variant's folder run in a later
wave, so a wave is a set of independent Tune trials a cluster runs in parallel.

A finished variant (its ``compress.json``, model folder and dev outputs exist) is
not run again: a killed run resumes with the rest.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from raynas.compression.compress_run import METHODS, MODEL_DIR, RUNTIMES, CompressJob, finished
from raynas.compression.int8_backends import BACKENDS
from raynas.errors import ConfigError, require
from raynas.orchestration.prune_tune import LatencySettings, _check_writable, check_task_head
from raynas.stages import config_diff

TRAINED = ("qat", "kmeans", "mixed", "sparsify")


@dataclass
class Variant:
    name: str = ""
    method: str = "int8"  # int8 | qat | kmeans | mixed | sparsify
    source: str | None = None  # another variant's name, or an extra_models key (default: the run's model)
    settings: dict[str, Any] = field(default_factory=dict)  # the method's settings (bits, sparsity, block, ...)
    train: dict[str, Any] = field(default_factory=dict)  # overrides of the run's train fields for this variant
    runtime: str = "auto"  # auto: ONNX Runtime int8 for all-int8 weights, else torch fp32 (dequantized on load)


@dataclass
class QuantizeRunConfig:
    task: str = ""
    model: str | None = None  # the fine-tuned model to compress (folder or hub name)
    finetune_from: str | None = None  # or: a pre-trained model to fine-tune on the task first (stage finetune)
    finetune: dict[str, Any] = field(default_factory=dict)  # FinetuneConfig fields of stage finetune
    teacher: str | None = None  # a row of the table, and what trained variants distil (default: model)
    extra_models: dict[str, str] = field(default_factory=dict)  # name -> folder: rows as they are, and sources
    data_dir: str | None = None
    out: str = "runs/quantize"
    variants: list[Variant] = field(default_factory=list)
    train: dict[str, Any] = field(default_factory=dict)  # FinetuneConfig fields of the trained variants
    distill: bool = True
    backends: list[str] | None = None  # int8 backends compared on the model (None: all installed; [] none)
    latency: LatencySettings = field(default_factory=LatencySettings)
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent_trials: int | None = None
    title: str = "further compression: pruning and quantization"


def torchao_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchao") is not None


def backends_of(cfg: QuantizeRunConfig) -> list[str]:
    """The backends to compare: as given, or every one installed (torchao is optional)."""
    if cfg.backends is not None:
        return list(cfg.backends)
    chosen = [b for b in BACKENDS if b != "torchao" or torchao_installed()]
    if "torchao" not in chosen:
        print("quantize: torchao is not installed: its int8 backend is left out of the comparison",
              file=sys.stderr, flush=True)
    return chosen


def _train_fields(cfg: QuantizeRunConfig, variant: Variant) -> dict[str, Any]:
    data_dir = str(Path(cfg.data_dir).resolve()) if cfg.data_dir else None
    return {**cfg.train, **variant.train, "data_dir": data_dir}


def _folder(path: str) -> str:
    """An absolute path for an existing folder (trials run in Ray's working directory), a hub name as is."""
    return str(Path(path).resolve()) if Path(path).exists() else path


def jobs(cfg: QuantizeRunConfig) -> list[list[CompressJob]]:
    """Every variant as a :class:`CompressJob` under ``OUT/jobs/NAME``, in waves (a wave reads only earlier ones)."""
    model = _folder(cfg.model or str(Path(cfg.out) / "finetuned"))
    teacher = _folder(cfg.teacher) if cfg.teacher else model
    out = Path(cfg.out).resolve()
    folders = {name: _folder(path) for name, path in cfg.extra_models.items()}
    by_name = {v.name: v for v in cfg.variants}
    waves: list[list[CompressJob]] = []
    placed: dict[str, int] = {}
    while len(placed) < len(cfg.variants):
        wave = []
        for v in cfg.variants:
            if v.name in placed or (v.source in by_name and v.source not in placed):
                continue
            source = model if v.source is None else folders.get(v.source) or str(out / "jobs" / v.source / MODEL_DIR)
            wave.append(CompressJob(v.name, cfg.task, source, str(out / "jobs" / v.name), v.method,
                                    dict(v.settings), _train_fields(cfg, v),
                                    teacher if cfg.distill and v.method in TRAINED else None, v.runtime))
        require(bool(wave), "variants: the sources form a cycle")
        for job in wave:
            placed[job.name] = len(waves)
        waves.append(wave)
    return waves


def preflight(cfg: QuantizeRunConfig) -> None:
    """Every check that needs no training, in the driver, before Ray starts; one message naming the field."""
    from raynas.evaluation.finetune import check_fields
    from raynas.evaluation.tasks import get_task, load_task_split

    require(bool(cfg.task), "task: which task the model is fine-tuned for (sst2, qnli, squad, ...)")
    task = get_task(cfg.task)
    require((cfg.model is None) != (cfg.finetune_from is None),
            "model / finetune_from: give exactly one (a fine-tuned model, or a pre-trained one to fine-tune first)")
    import importlib.util

    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    require(not missing, f"raynas quantize needs {' and '.join(missing)} (int8 runs on ONNX Runtime): "
                         "pip install 'raynas[int8]'")
    for b in cfg.backends or []:
        require(b in BACKENDS, f"backends: unknown backend {b!r} (expected {', '.join(BACKENDS)})")
        require(b != "torchao" or torchao_installed(), "backends: torchao is not installed (pip install torchao, "
                                                       "or leave it out of backends)")
    if cfg.finetune_from is not None:
        from raynas.teachers import resolve_teacher

        resolve_teacher(cfg.finetune_from, "finetune_from")
    for field_name, model in [("model", cfg.model), ("teacher", cfg.teacher), *(
            (f"extra_models.{k}", p) for k, p in cfg.extra_models.items())]:
        if model is not None:
            _check_model(field_name, model, task)
    check_variants(cfg, shapes=True)
    if cfg.data_dir is not None:
        for split in ("train", "validation"):
            load_task_split(task.name, split, cfg.data_dir)  # names the missing or malformed file
    if cfg.finetune_from is not None:
        check_fields("finetune", cfg.task, cfg.finetune, drop=())
    _check_writable(Path(cfg.out))


def check_variants(cfg: QuantizeRunConfig, shapes: bool) -> None:
    """The variants' names, methods, sources, settings and train fields; with ``shapes``, against the model's shapes."""
    from raynas.compression.compress_run import parse_settings
    from raynas.evaluation.finetune import check_fields

    require(bool(cfg.variants), "variants: give at least one variant (e.g. {name: int8, method: int8})")
    names = [v.name for v in cfg.variants]
    require(all(names), "variants: every variant needs a name")
    dupes = sorted({n for n in names if names.count(n) > 1} | (set(names) & set(cfg.extra_models)))
    require(not dupes, f"variants: the name(s) {', '.join(dupes)} are used twice")
    for i, v in enumerate(cfg.variants):
        where = f"variants[{i}] ({v.name})"
        require(v.method in METHODS, f"{where}.method: expected one of {', '.join(METHODS)}, got {v.method!r}")
        require(v.runtime in RUNTIMES, f"{where}.runtime: expected one of {', '.join(RUNTIMES)}, got {v.runtime!r}")
        require(v.source is None or v.source in names or v.source in cfg.extra_models,
                f"{where}.source: {v.source!r} is neither a variant nor an extra_models name")
        if v.method in TRAINED:
            settings = parse_settings(v.method, v.settings, where)  # bits outside the set, sparsity >= 1, ...
            if v.method == "sparsify" and shapes:
                try:
                    settings.check(_meta_model(_root_source(cfg, v)))  # the block must tile every weight
                except ConfigError as exc:
                    raise ConfigError(f"{where}.settings: {exc}") from None
        else:
            require(not v.settings, f"{where}.settings: int8 takes no settings (got {sorted(v.settings)})")
        check_fields(f"{where}.train", cfg.task, _train_fields(cfg, v), "-" if cfg.distill else None)
    jobs(cfg)  # a cycle of sources


def _root_source(cfg: QuantizeRunConfig, variant: Variant) -> str:
    """The folder whose shapes a variant sees: its chain of sources followed back to a model folder."""
    by_name = {v.name: v for v in cfg.variants}
    seen: set[str] = set()
    while variant.source in by_name and variant.source not in seen:
        seen.add(variant.source)
        variant = by_name[variant.source]
    if variant.source in cfg.extra_models:
        return cfg.extra_models[variant.source]
    return cfg.model or cfg.finetune_from or ""


def _meta_model(path: str) -> Any:
    """The model's modules with no weights (meta device): enough to check shapes before anything loads."""
    import torch
    from transformers import AutoConfig, AutoModel

    from raynas.teachers import resolve_teacher

    config = AutoConfig.from_pretrained(resolve_teacher(path, "model"))
    with torch.device("meta"):
        return AutoModel.from_config(config)


def _check_model(field_name: str, model: str, task: Any) -> None:
    """A folder that is not a model (or has no head for the task) is named in one line."""
    path = Path(model)
    if path.exists():
        require(path.is_dir() and (path / "config.json").is_file(),
                f"{field_name}: {model} is not a model folder (no config.json)")
    try:
        check_task_head(model, task)
    except ConfigError as exc:
        text = str(exc)
        raise ConfigError(text if text.startswith(field_name) else f"{field_name}: {text}") from None


def _comparable(job: dict[str, Any]) -> dict[str, Any]:
    """A job's config without what the trial fills in from its resources (device, threads)."""
    train = {k: v for k, v in job.get("train", {}).items() if k not in ("device", "threads")}
    return {**job, "train": train}


# ---- trials ----------------------------------------------------------------------------------
def _trial(config: dict[str, Any]) -> None:
    """One Tune trial: one compression job (runs in a Ray worker)."""
    import ray
    from ray import tune

    from raynas.compression.compress_run import run_compress_job
    from raynas.orchestration.job_trials import trial_resources

    job = CompressJob(**trial_resources(config["job"], config["cpus"], ray.get_gpu_ids()))
    record = run_compress_job(job)
    tune.report({"score": record["score"], "bytes_on_disk": record["bytes_on_disk"], "final": 1})


def run_waves(cfg: QuantizeRunConfig, waves: list[list[CompressJob]]) -> dict[str, str]:
    """Run the unfinished jobs wave by wave as Tune trials; job name -> error line of those that failed.

    A job whose source failed is not started (its error names the source).
    """
    from raynas.orchestration.job_trials import run_job_trials

    errors: dict[str, str] = {}
    records = {j.name: finished(j.out_dir) for w in waves for j in w}  # running a wave finishes none of the later
    done = sum(r is not None for r in records.values())
    print(f"quantize: {len(records)} variant(s) in {len(waves)} wave(s), {done} finished earlier", file=sys.stderr,
          flush=True)
    model_of = {j.name: str(Path(j.out_dir) / MODEL_DIR) for w in waves for j in w}
    for i, wave in enumerate(waves):
        pending = []
        for job in wave:
            record = records[job.name]
            if record is not None:
                changed = config_diff(_comparable(record["job"]), _comparable(asdict(job)))
                require(not changed, f"variants: {job.name} finished in {job.out_dir} with a different config "
                                     f"({'; '.join(changed[:4])}); use a new out folder or delete that job folder")
                continue
            broken = next((name for name in errors if job.model == model_of.get(name)), None)
            if broken is not None:
                errors[job.name] = f"not run: its source {broken} failed"
                continue
            pending.append(asdict(job))
        if pending:
            print(f"quantize: wave {i + 1}/{len(waves)}: {', '.join(j['name'] for j in pending)}",
                  file=sys.stderr, flush=True)
        errors.update(run_job_trials("quantize", _trial, pending, Path(cfg.out), cfg.cpus_per_trial,
                                     cfg.gpus_per_trial, cfg.max_concurrent_trials))
    return errors
