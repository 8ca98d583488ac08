"""Ray Train driver for supernet training (``raynas supernet``) and further training (``raynas train``).

Config dataclasses, the checks that run before Ray starts, and the
``TorchTrainer`` setup. The worker loop is :mod:`raynas.orchestration.train_worker`;
losses, samplers, corpus and masking are pure torch / Python
(:mod:`raynas.training`, :mod:`raynas.data`). The corpus is tokenized once here
and memory-mapped by every worker, so N workers do not tokenize N times.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from raynas.data.corpus import CorpusConfig
from raynas.errors import ConfigError, require

MODES, SAMPLER_NAMES = ("mlm", "kd"), ("batchwise", "uniform", "sandwich")


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

    def validate(self) -> None:
        require(self.mode in MODES, f"objective.mode: expected one of {list(MODES)}, got {self.mode!r}")
        require(0.0 < self.mlm_probability < 1.0,
                f"objective.mlm_probability: expected in (0, 1), got {self.mlm_probability}")
        if self.mode == "kd":
            require(bool(self.teacher), "objective.teacher: mode kd needs a teacher (hub name or local folder)")
        else:
            require(not self.teacher, "objective.teacher: only used with objective.mode: kd")


@dataclass
class SamplerConfig:
    name: str = "batchwise"  # batchwise | uniform | sandwich (ignored by raynas train: one plain model)
    per_worker: int = 2  # sub-models per batch per worker (batchwise / uniform)
    n_random: int = 1  # sandwich: random archs besides largest and smallest


@dataclass
class DeepSpeedConfig:
    enabled: bool = True
    zero_stage: int = 2  # 0-3; at 3 every rank trains the same archs
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
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
    name: str = "supernet"

    def __post_init__(self) -> None:
        given = [k for k in ("space", "init_from", "model") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"give exactly one of space, init_from and model (got {given or 'none'})")
        for name in ("steps", "batch_size", "num_workers", "checkpoint_every", "eval_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.batch_size % self.num_workers:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of num_workers {self.num_workers}")
        if self.sampler.name not in SAMPLER_NAMES:
            raise ValueError(f"sampler.name: expected one of {list(SAMPLER_NAMES)}, got {self.sampler.name!r}")
        if not 0 <= self.deepspeed.zero_stage <= 3:
            raise ValueError(f"deepspeed.zero_stage: expected 0-3, got {self.deepspeed.zero_stage}")
        if self.max_failures < -1:
            raise ValueError(f"max_failures: expected >= -1 (-1: retry forever), got {self.max_failures}")
        self.objective.validate()


def config_from_dict(raw: dict[str, Any]) -> TrainConfig:
    from raynas.config_loading import load_config

    return load_config(TrainConfig, None, defaults=raw)


# ---------------------------------------------------------------- checks before Ray starts


def load_tokenizer(cfg: TrainConfig) -> Any:
    from transformers import AutoTokenizer

    from raynas.supernet.checkpoint import load_supernet_tokenizer
    from raynas.teachers import resolve_teacher

    if cfg.tokenizer or cfg.model:
        name = cfg.tokenizer or cfg.model
        where = name if Path(name).expanduser().is_dir() else resolve_teacher(name, "tokenizer")
        try:
            return AutoTokenizer.from_pretrained(where)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"tokenizer {name!r}: cannot load a tokenizer ({_first_line(exc)})") from None
    tok = load_supernet_tokenizer(cfg.init_from) if cfg.init_from else None
    if tok is None:
        raise ConfigError("tokenizer: not given, and init_from has no tokenizer/ folder")
    return tok


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _head_counts(space: Any) -> set[int]:
    """MHA head counts of the space's largest and smallest archs (what attention-map KD must match)."""
    return {op.heads for arch in (space.largest(), space.smallest()) for op in space.plan(arch)[1]
            if hasattr(op, "heads")}


def preflight(cfg: TrainConfig) -> dict[str, Any]:
    """Every check that needs no worker: the student, the teacher, head counts, precision. Absolute paths out."""
    from transformers import AutoConfig

    from raynas.orchestration.engines import resolve_precision
    from raynas.teachers import resolve_teacher

    resolve_precision(cfg.deepspeed.precision, cfg.use_gpu)
    raw = asdict(cfg)  # workers run in Ray's working dir: pass absolute paths
    if cfg.space:
        from raynas.spaces import load_space

        space = load_space(cfg.space, cfg.space_overrides or None)
        if Path(cfg.space).expanduser().exists():
            raw["space"] = str(Path(cfg.space).expanduser().resolve())
        heads = _head_counts(space)
    elif cfg.init_from:
        from raynas.supernet.checkpoint import load_supernet

        net = load_supernet(cfg.init_from)  # ConfigError naming the file if it is missing or corrupt
        raw["init_from"] = str(Path(cfg.init_from).expanduser().resolve())
        heads = _head_counts(net.space)
    else:
        raw["model"] = where = resolve_teacher(cfg.model, "model")
        try:
            config = AutoConfig.from_pretrained(where)
            layers = getattr(config, "layers", None)  # raynas: heads per MHA op-layer
            heads = {op["heads"] for op in layers if op["op"] == "mha"} if layers else {config.num_attention_heads}
        except (OSError, ValueError, AttributeError, KeyError) as exc:
            raise ConfigError(f"model {cfg.model!r}: cannot read its config ({_first_line(exc)})") from None
    if cfg.objective.mode == "kd":
        raw["objective"]["teacher"] = where = resolve_teacher(cfg.objective.teacher, "objective.teacher")
        try:
            teacher_heads = AutoConfig.from_pretrained(where).num_attention_heads
        except (OSError, ValueError, AttributeError) as exc:
            raise ConfigError(f"objective.teacher {cfg.objective.teacher!r}: cannot read its config "
                              f"({_first_line(exc)})") from None
        if cfg.objective.attention_weight > 0 and heads != {teacher_heads}:
            raise ConfigError(f"objective.attention_weight: attention maps need the teacher's head count "
                              f"({teacher_heads}), the student has {sorted(heads)} heads (use a 'dims' MHA strategy "
                              "space such as autotinybert-kd, or attention_weight: 0)")
    raw["out"] = str(Path(cfg.out).resolve())
    return raw


# ---------------------------------------------------------------- driver


def run_training(cfg: TrainConfig) -> dict[str, Any]:
    """Check, build the corpus once, run the TorchTrainer; return the last reported metrics."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raynas.data.corpus import build_corpus, corpus_stats
    from raynas.orchestration.train_worker import train_loop

    raw = preflight(cfg)
    out = Path(raw["out"])
    tokenizer = load_tokenizer(cfg)
    corpus = build_corpus(cfg.corpus, tokenizer, cache_dir=out / "corpus")
    print(f"corpus: {corpus_stats(corpus)}", file=sys.stderr)
    tok_dir = out / "tokenizer"
    tokenizer.save_pretrained(tok_dir)
    loop_cfg = {"cfg": raw, "corpus_dir": corpus.cache_files["train"][0]["filename"].rsplit("/train/", 1)[0],
                "tokenizer_dir": str(tok_dir), "out": str(out)}
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if cfg.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop, train_loop_config=loop_cfg,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=cfg.name, storage_path=str(out / "ray_results"),
                             failure_config=FailureConfig(max_failures=cfg.max_failures)),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return dict(result.metrics or {})
