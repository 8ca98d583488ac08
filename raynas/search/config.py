"""What a search run is: :class:`SearchConfig`, with every check that needs no file.

Defaults follow AutoTinyBERT's Algorithm 2 (T = 4 generations, S = 25 archs
per generation, mutation and exploration probabilities 1/2) and its proxy
fitness (validation loss of the inherited sub-model, under the objective the
supernet was trained with). ``population`` is per budget: a search for B
budgets evaluates up to ``generations * population * B`` archs, each serving
every budget it fits. Pure python: loaded from YAML plus ``key=value``
overrides with :func:`raynas.config_loading.load_config`; one
:class:`~raynas.config_loading.FieldErrors` names every bad field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from raynas.config_loading import FieldErrors
from raynas.data.corpus import CorpusConfig
from raynas.errors import ConfigError
from raynas.search.constraints import KINDS
from raynas.search.evolution import STRATEGIES

OBJECTIVES = ("mlm", "kd")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class SearchConfig:
    """One search: strategy, budgets and constraint, proxy fitness, and how trials run on Ray Tune."""

    strategy: str = "evolution"  # evolution | random | fast (AutoTinyBERT-Fast rule, homogeneous spaces)
    generations: int = 4  # T
    population: int = 25  # S, per budget and generation
    mutation_prob: float = 0.5  # p_m: mutate the roulette-drawn parent
    exploration_prob: float = 0.5  # p_e: also sample a fresh arch
    gene_prob: float = 0.2  # inside one mutation: chance each dimension is resampled (about one of five)
    max_attempts: int = 100  # draws per wanted candidate before a budget's population is left short
    budgets: list[str] = field(default_factory=lambda: ["2x", "4x"])  # "4x" speedup, "12ms", "20M", "1.5G"
    constraint: str = "latency"  # latency (needs a predictor) | params | flops
    seed: int = 0
    # proxy fitness: validation loss of each inherited sub-model
    objective: str = "mlm"  # mlm | kd (distillation from `teacher`, hidden states of the last layer)
    teacher: str | None = None  # kd: hub name or local folder of the supernet's teacher
    hidden_weight: float = 1.0  # kd terms, as in supernet training (no projection: the supernet is as wide)
    attention_weight: float = 0.0
    mlm_probability: float = 0.15
    eval_batches: int = 4  # validation batches per arch
    batch_size: int = 16  # sequences per validation batch
    seq_len: int = 128  # FLOPs are counted at it; the corpus's own length when building batches from one
    corpus: CorpusConfig = field(default_factory=CorpusConfig)  # validation split; the supernet's corpus settings
    corpus_dir: str | None = None  # a saved corpus (datasets folder with a validation split) instead of `corpus`
    # Ray Tune
    archs_per_trial: int = 10  # archs one trial scores (batch-major): more amortise a trial's overhead
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    device: str = "auto"  # auto: cuda when the trial was given a GPU, else cpu
    max_concurrent_trials: int | None = None
    storage: str | None = None  # Ray Tune results folder (default: <out>/ray_results)

    def __post_init__(self) -> None:
        problems = search_config_errors(self)
        if problems:
            raise FieldErrors(problems)

    def search_kwargs(self) -> dict[str, object]:
        """The :class:`~raynas.search.evolution.EvolutionSearch` keyword arguments of this config."""
        return {"strategy": self.strategy, "generations": self.generations, "population": self.population,
                "mutation_prob": self.mutation_prob, "exploration_prob": self.exploration_prob,
                "gene_prob": self.gene_prob, "seed": self.seed, "max_attempts": self.max_attempts}


def search_config_errors(cfg: SearchConfig) -> list[str]:
    """Every problem of ``cfg`` that shows without reading a file, one message per field."""
    errors: list[str] = []

    def check(ok: bool, message: str) -> None:
        if not ok:
            errors.append(message)

    check(cfg.strategy in STRATEGIES, f"strategy: expected one of {list(STRATEGIES)}, got {cfg.strategy!r}")
    for name in ("generations", "population", "max_attempts", "archs_per_trial", "eval_batches", "batch_size"):
        check(getattr(cfg, name) >= 1, f"{name}: expected >= 1, got {getattr(cfg, name)}")
    for name in ("mutation_prob", "exploration_prob", "gene_prob"):
        check(0.0 <= getattr(cfg, name) <= 1.0, f"{name}: expected in [0, 1], got {getattr(cfg, name)}")
    check(cfg.strategy != "evolution" or cfg.mutation_prob > 0 or cfg.exploration_prob > 0,
          "mutation_prob, exploration_prob: both 0 would make no new arch after generation 1")
    check(bool(cfg.budgets), "budgets: give at least one (e.g. [2x, 4x])")
    check(len(set(cfg.budgets)) == len(cfg.budgets), f"budgets: {cfg.budgets} lists a budget twice")
    check(cfg.constraint in KINDS, f"constraint: expected one of {list(KINDS)}, got {cfg.constraint!r}")
    check(cfg.objective in ("mlm", "kd"), f"objective: expected one of {list(OBJECTIVES)}, got {cfg.objective!r}")
    check(cfg.objective != "kd" or bool(cfg.teacher), "teacher: objective kd needs a teacher")
    check(cfg.hidden_weight >= 0 and cfg.attention_weight >= 0, "hidden_weight, attention_weight: expected >= 0")
    check(cfg.objective != "kd" or cfg.hidden_weight + cfg.attention_weight > 0,
          "hidden_weight, attention_weight: kd needs one of them > 0")
    check(0.0 < cfg.mlm_probability < 1.0, f"mlm_probability: expected in (0, 1), got {cfg.mlm_probability}")
    check(cfg.seq_len >= 8, f"seq_len: expected >= 8, got {cfg.seq_len}")
    check(cfg.cpus_per_trial > 0, f"cpus_per_trial: expected > 0, got {cfg.cpus_per_trial}")
    check(cfg.gpus_per_trial >= 0, f"gpus_per_trial: expected >= 0, got {cfg.gpus_per_trial}")
    check(cfg.device in DEVICES or cfg.device.startswith("cuda:"),
          f"device: expected one of {list(DEVICES)} or cuda:N, got {cfg.device!r}")
    check(not (cfg.device.startswith("cuda") and cfg.gpus_per_trial == 0),
          f"device: {cfg.device} needs gpus_per_trial > 0 (a trial sees no GPU without one)")
    check(not (cfg.device == "cpu" and cfg.gpus_per_trial > 0),
          "device: cpu, but gpus_per_trial > 0 reserves GPUs no trial would use")
    check(cfg.max_concurrent_trials is None or cfg.max_concurrent_trials >= 1,
          f"max_concurrent_trials: expected >= 1 or null, got {cfg.max_concurrent_trials}")
    try:
        cfg.corpus.validate()
    except ConfigError as exc:
        errors.append(str(exc))
    return errors
