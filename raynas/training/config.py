"""What a training run is: the ``TrainConfig`` dataclasses and every check that needs no file.

Pure (no Ray, no torch): the driver loads a ``TrainConfig`` from YAML plus
dotted overrides (:func:`raynas.config_loading.load_config`), the workers
rebuild it from the driver's dict. All static checks live in
:func:`config_errors`, run from ``TrainConfig.__post_init__``: one
:class:`~raynas.config_loading.FieldErrors` names every bad field, whether the
config came from YAML or was built in code (``dataclasses.replace`` included).
Checks that read files (the teacher's head count, the model folder) are the
driver's ``preflight``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from raynas.config_loading import FieldErrors, load_config
from raynas.data.corpus import CorpusConfig
from raynas.errors import ConfigError

MODES = ("mlm", "kd")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
STUDENTS = ("space", "init_from", "model")
CHECKPOINT_DIR = "checkpoints"  # OUT/checkpoints/step-N, the one copy of each checkpoint (Ray Train's run folder)
COUNTS = ("steps", "batch_size", "num_workers", "checkpoint_every", "eval_every", "eval_batches", "log_every")


@dataclass
class ObjectiveConfig:
    """MLM (pre-training) or task-agnostic distillation from ``teacher`` (hub name or local folder)."""

    mode: str = "mlm"  # mlm | kd
    mlm_probability: float = 0.15
    teacher: str | None = None  # kd: any BERT-family encoder / masked LM
    hidden_weight: float = 1.0  # kd: last-layer hidden-state MSE (through a projection when widths differ)
    attention_weight: float = 0.0  # kd: last-layer attention KL; needs the teacher's head count
    logits_weight: float = 0.0  # kd: MLM-distribution KL against the teacher's MLM head
    mlm_weight: float | None = None  # default: 1 for mlm, 0 for kd
    temperature: float = 1.0
    project: bool | None = None  # hidden-state projection; default: when the widths differ
    inplace_weight: float = 1.0  # mlm + sandwich: logits KD from the largest sub-model of the same batch


@dataclass
class SamplerConfig:
    """Which sub-models a worker trains per batch; ``name`` is a key of :data:`raynas.training.sampling.SAMPLERS`."""

    name: str = "batchwise"  # batchwise | uniform | sandwich (ignored by raynas train: one plain model)
    per_worker: int = 2  # sub-models per batch per worker (batchwise / uniform)
    n_random: int = 1  # sandwich: random archs besides largest and smallest


@dataclass
class DeepSpeedConfig:
    enabled: bool = True  # false: DDP
    zero_stage: int = 2  # 0-3; at 3 every rank trains the same archs
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16 (fp16: DeepSpeed only)
    config: dict[str, Any] = field(default_factory=dict)  # merged over the generated DeepSpeed config


@dataclass
class TrainConfig:
    """One training run. The student is one of: ``space`` (+ ``space_overrides``) -> a fresh supernet,
    ``init_from`` -> a saved supernet, ``model`` -> a plain model folder (``raynas train``)."""

    out: str = "runs/supernet-train"
    space: str | None = None
    space_overrides: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None
    model: str | None = None
    tokenizer: str | None = None  # default: init_from's tokenizer/, or model's folder
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    steps: int = 100
    batch_size: int = 16  # global: split across workers
    lr: float = 1e-4
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    seed: int = 0
    dropout: float = 0.1  # only for supernets made from a space
    num_workers: int = 2
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    gpus_per_worker: float = 1.0  # with use_gpu
    checkpoint_every: int = 50
    eval_every: int = 50
    eval_batches: int = 4
    log_every: int = 10
    max_failures: int = 0  # Ray Train restarts of a failed worker group, from the last checkpoint
    # Ray Train's run folder is OUT/checkpoints whatever the name (one copy of each checkpoint, see
    # supernet_training.run_config); the name only finds an older version's OUT/ray_results/<name>, which
    # preflight refuses to resume rather than restart over. Kept so configs and callers that set it still load.
    name: str = "supernet"

    def __post_init__(self) -> None:
        problems = config_errors(self)
        if problems:
            raise FieldErrors(problems)

    @property
    def precision(self) -> str:
        """``deepspeed.precision`` with ``auto`` resolved for this run's device."""
        return resolve_precision(self.deepspeed.precision, self.use_gpu)


def config_from_dict(raw: dict[str, Any]) -> TrainConfig:
    """The config the driver checked and sent as a dict (``dataclasses.asdict``), rebuilt in a worker."""
    return load_config(TrainConfig, None, defaults=raw)


def resolve_precision(precision: str, use_gpu: bool) -> str:
    """``auto``: bf16 on GPU, fp32 on CPU (DeepSpeed's CPU path trains in fp32)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"deepspeed.precision: expected one of {list(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "bf16" if use_gpu else "fp32"
    if precision != "fp32" and not use_gpu:
        raise ConfigError(f"deepspeed.precision: {precision} needs use_gpu=true (CPU training runs in fp32)")
    return precision


def config_errors(cfg: TrainConfig) -> list[str]:
    """Every problem of ``cfg`` that shows without reading a file, one message per field, named by its dotted path."""
    from raynas.training.sampling import SAMPLER_NAMES

    errors: list[str] = []

    def check(ok: bool, message: str) -> None:
        if not ok:
            errors.append(message)

    given = [k for k in STUDENTS if getattr(cfg, k)]
    check(len(given) == 1, f"{'/'.join(STUDENTS)}: give exactly one of space, init_from and model "
                           f"(got {', '.join(given) or 'none'})")
    for name in COUNTS:
        check(getattr(cfg, name) >= 1, f"{name}: expected >= 1, got {getattr(cfg, name)}")
    if cfg.num_workers >= 1:
        check(cfg.batch_size % cfg.num_workers == 0,
              f"batch_size: {cfg.batch_size} is not a multiple of num_workers {cfg.num_workers}")
    check(cfg.lr > 0, f"lr: expected > 0, got {cfg.lr}")
    check(0.0 <= cfg.warmup_ratio <= 1.0, f"warmup_ratio: expected in [0, 1], got {cfg.warmup_ratio}")
    check(cfg.weight_decay >= 0, f"weight_decay: expected >= 0, got {cfg.weight_decay}")
    check(0.0 <= cfg.dropout < 1.0, f"dropout: expected in [0, 1), got {cfg.dropout}")
    check(cfg.cpus_per_worker > 0, f"cpus_per_worker: expected > 0, got {cfg.cpus_per_worker}")
    check(cfg.gpus_per_worker > 0, f"gpus_per_worker: expected > 0, got {cfg.gpus_per_worker}")
    check(cfg.max_failures >= -1, f"max_failures: expected >= -1 (-1: retry forever), got {cfg.max_failures}")
    try:
        cfg.corpus.validate()
    except ConfigError as exc:
        errors.append(str(exc))

    s = cfg.sampler
    check(s.name in SAMPLER_NAMES, f"sampler.name: expected one of {list(SAMPLER_NAMES)}, got {s.name!r}")
    check(s.per_worker >= 1, f"sampler.per_worker: expected >= 1, got {s.per_worker}")
    check(s.n_random >= 0, f"sampler.n_random: expected >= 0, got {s.n_random}")

    ds = cfg.deepspeed
    check(0 <= ds.zero_stage <= 3, f"deepspeed.zero_stage: expected 0-3, got {ds.zero_stage}")
    try:
        precision = resolve_precision(ds.precision, cfg.use_gpu)
        check(ds.enabled or precision != "fp16",
              "deepspeed.precision: fp16 needs deepspeed.enabled (DDP trains in fp32 or bf16 autocast)")
    except ConfigError as exc:
        errors.append(str(exc))
    return errors + _objective_errors(cfg.objective)


def _objective_errors(o: ObjectiveConfig) -> list[str]:
    errors = []
    if o.mode not in MODES:
        errors.append(f"objective.mode: expected one of {list(MODES)}, got {o.mode!r}")
    if not 0.0 < o.mlm_probability < 1.0:
        errors.append(f"objective.mlm_probability: expected in (0, 1), got {o.mlm_probability}")
    if o.mode == "kd" and not o.teacher:
        errors.append("objective.teacher: mode kd needs a teacher (hub name or local folder)")
    if o.mode != "kd" and o.teacher:
        errors.append("objective.teacher: only used with objective.mode: kd")
    weights = {"hidden_weight": o.hidden_weight, "attention_weight": o.attention_weight,
               "logits_weight": o.logits_weight, "mlm_weight": o.mlm_weight, "inplace_weight": o.inplace_weight}
    negative = [f"objective.{k}: expected >= 0, got {w}" for k, w in weights.items() if w is not None and w < 0]
    errors += negative
    if o.temperature <= 0:
        errors.append(f"objective.temperature: expected > 0, got {o.temperature}")
    kd_terms = o.hidden_weight + o.attention_weight + o.logits_weight + (o.mlm_weight or 0.0)
    if o.mode == "kd" and not negative and kd_terms == 0:
        errors.append("objective: every kd loss weight (hidden, attention, logits, mlm) is 0")
    if o.mode == "mlm" and o.mlm_weight == 0:
        errors.append("objective.mlm_weight: mode mlm with mlm_weight 0 trains nothing (use mode kd)")
    return errors
