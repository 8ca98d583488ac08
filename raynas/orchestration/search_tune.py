"""Ray Tune adapter for architecture search: a ``Searcher`` over the ask/tell search, trials that score archs.

The algorithm is pure (:class:`raynas.search.evolution.EvolutionSearch`); this
module only runs it on Ray Tune:

- :class:`ArchSearcher` (a ``ray.tune.search.Searcher``) hands each trial a
  chunk of archs of the current generation (many archs per trial amortise a
  trial's overhead), answers ``None`` while a generation's trials are still
  running (the next generation needs their losses) and ``FINISHED`` at the end;
  each completed trial's rows are persisted (Parquet, atomically) *before* the
  search is told, so a killed driver loses only trials in flight.
- Trials score their archs with
  :func:`raynas.training.validation.validation_losses` against the supernet put
  once in the object store (:mod:`raynas.orchestration.shared_supernet`, built
  once per worker process; actors are reused between trials) and the
  validation batches also put once, and report the losses with their own
  evaluation seconds.
- :func:`run_search` is the library entry: it replays stored rows (a rerun
  resumes: nothing lost, nothing evaluated twice), runs Tune until the search
  is done, writes ``OUT/evaluated.parquet`` and ``OUT/chosen.parquet``, prints
  progress on stderr and returns the measured cost of one arch evaluation and
  Tune's overhead per trial (a trial's wall time, from Tune starting it to Tune
  seeing it complete, minus the evaluation time the trial measured itself).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from ray.tune import Callback
from ray.tune.search import Searcher

from raynas.errors import ConfigError
from raynas.search.config import SearchConfig
from raynas.search.constraints import Budget, Constraint
from raynas.search.evolution import EvolutionSearch
from raynas.search.results import (
    CHOSEN_FILE,
    EVALUATED_FILE,
    ResultStore,
    chosen_rows,
    loss_terms_json,
    write_chosen,
)

Say = Callable[[str], None]
_worker_cache: dict[str, Any] = {}
_worker_lock = threading.Lock()


class ArchSearcher(Searcher):
    """Tune's view of an :class:`EvolutionSearch`: one trial scores a chunk of archs of the current generation.

    ``persist(trial_id, trial_config, result, losses)`` stores a completed
    trial's rows; it runs before the search is told. ``max_trials``: suggest no
    more than this many trials in this run (a budgeted or interrupted run; a
    rerun continues from the stored rows).
    """

    def __init__(self, search: EvolutionSearch, archs_per_trial: int,
                 persist: Callable[[str, dict[str, Any], dict[str, Any], list[dict[str, float]]], None] | None = None,
                 max_trials: int | None = None, on_told: Callable[[], None] | None = None) -> None:
        super().__init__(metric="loss", mode="min")
        self.search, self.archs_per_trial = search, archs_per_trial
        self._persist, self._on_told = persist, on_told
        self.max_trials, self.suggested = max_trials, 0
        self.trials: dict[str, dict[str, Any]] = {}  # in flight: trial id -> its config
        self.eval_s: dict[str, float] = {}  # completed: trial id -> seconds its evaluation took
        self.setup_s: dict[str, float] = {}

    def _chunk(self) -> int:
        """Archs per trial, evened out over the generation (50 archs at 10 per trial: 5 x 10; 55: 6 x 9-10)."""
        size = len(self.search.history[-1]) if self.search.history else self.archs_per_trial
        return math.ceil(size / max(1, math.ceil(size / self.archs_per_trial)))

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if self.search.done or (self.max_trials is not None and self.suggested >= self.max_trials):
            return Searcher.FINISHED
        picked = self.search.ask(self._chunk())
        if not picked:
            return None  # the rest of this generation is being evaluated
        config = {"archs": [a for a, _ in picked], "budgets": [b for _, b in picked],
                  "generation": self.search.generation}
        self.trials[trial_id] = config
        self.suggested += 1
        return config

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        config = self.trials.pop(trial_id, None)
        if config is None:
            return
        if error or not result or "losses" not in result:
            self.search.fail(config["archs"])
            return
        losses = json.loads(result["losses"])
        self.eval_s[trial_id] = float(result["eval_s"])
        self.setup_s[trial_id] = float(result.get("setup_s", 0.0))
        if self._persist is not None:
            self._persist(trial_id, config, result, losses)
        for arch, terms in zip(config["archs"], losses, strict=True):
            self.search.tell(arch, terms["loss"])
        if self._on_told is not None:
            self._on_told()

    def get_state(self) -> dict[str, Any]:
        return {"search": self.search.state_dict(), "trials": self.trials, "suggested": self.suggested,
                "eval_s": self.eval_s, "setup_s": self.setup_s}

    def set_state(self, state: dict[str, Any]) -> None:
        self.search.load_state_dict(state["search"])
        self.trials, self.suggested = dict(state["trials"]), int(state["suggested"])
        self.eval_s, self.setup_s = dict(state["eval_s"]), dict(state["setup_s"])

    def save(self, checkpoint_path: str) -> None:
        """Tune calls this with a temporary file it renames into the experiment folder."""
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.get_state(), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.set_state(pickle.load(f))


class _TrialClock(Callback):
    """Driver-side wall time of each trial: from Tune starting it to Tune seeing it complete."""

    def __init__(self) -> None:
        self.started: dict[str, float] = {}
        self.wall_s: dict[str, float] = {}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.started[trial.trial_id] = time.perf_counter()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if trial.trial_id in self.started:
            self.wall_s[trial.trial_id] = time.perf_counter() - self.started[trial.trial_id]


# ---------------------------------------------------------------- the trial (runs in a Ray worker)


def proxy_objective(spec: dict[str, Any], max_hidden: int, device: torch.device | str) -> Any:
    """The objective archs are scored with: MLM, or distillation from the teacher (hidden states without a
    projection: the supernet's sub-models are compared with the teacher's first d_m features)."""
    from raynas.training.objectives import SupernetObjective, TeacherCache

    if spec["mode"] == "mlm":
        return SupernetObjective("mlm")
    from raynas.teachers import load_teacher

    model, _ = load_teacher(spec["teacher"])
    if spec["attention_weight"] > 0:
        model.set_attn_implementation("eager")  # SDPA cannot return attention probabilities
    cache = TeacherCache(model, output_attentions=spec["attention_weight"] > 0, device=device, logits=False)
    return SupernetObjective("kd", student_width=max_hidden, teacher_width=model.config.hidden_size,
                             hidden_weight=spec["hidden_weight"], attention_weight=spec["attention_weight"],
                             mlm_weight=0.0, teacher=cache, project=False)


def _cached(key: str, build: Callable[[], Any]) -> Any:
    with _worker_lock:
        if key not in _worker_cache:
            _worker_cache[key] = build()
        return _worker_cache[key]


def _trial(config: dict[str, Any], shared: list[Any]) -> None:
    """One Tune trial: score ``config["archs"]`` on the shared supernet and validation batches; report once."""
    import ray
    from ray import tune

    from raynas.orchestration.finetune_sweep import trial_device
    from raynas.orchestration.shared_supernet import shared_supernet
    from raynas.training.optim import Placement
    from raynas.training.validation import validation_losses

    t0 = time.perf_counter()
    device = trial_device(config["device"], ray.get_gpu_ids())
    torch.set_num_threads(config["threads"])
    net_ref, batches_ref = shared
    net = shared_supernet(net_ref, device)
    batches = _cached(f"batches-{batches_ref.hex()}", lambda: ray.get(batches_ref))
    spec = config["objective"]
    objective = _cached(f"objective-{json.dumps(spec, sort_keys=True)}-{device}",
                        lambda: proxy_objective(spec, net.space.max_hidden, device))
    placement = Placement(torch.device(device))
    setup_s = time.perf_counter() - t0
    started = time.time()
    t1 = time.perf_counter()
    losses = validation_losses(net, config["archs"], batches, objective, placement)
    placement.synchronize()
    eval_s = time.perf_counter() - t1
    tune.report({"loss": min(x["loss"] for x in losses), "eval_s": eval_s, "setup_s": setup_s,
                 "n_archs": len(losses), "started_at": started, "finished_at": time.time(),
                 "losses": json.dumps(losses)})


# ---------------------------------------------------------------- the driver


@dataclass
class SearchRun:
    """What :func:`run_search` did: every stored row, the chosen model per budget, and what it cost."""

    out_dir: Path
    budgets: list[Budget]
    evaluated: list[dict[str, Any]]
    chosen: list[dict[str, Any]]  # empty while the search is not done
    done: bool
    replayed: int  # rows read back from an earlier run
    timing: dict[str, float] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=dict)


def run_search(cfg: SearchConfig, supernet: str | os.PathLike | Any, constraint: Constraint,
               out_dir: str | os.PathLike, *, batches: Sequence[dict[str, torch.Tensor]] | None = None,
               tokenizer: Any = None, max_trials: int | None = None, progress: Say | None = None) -> SearchRun:
    """Search ``supernet`` (a folder or a :class:`~raynas.supernet.Supernet`) for the best arch per budget.

    Validation data: ``batches`` as given, else the ``validation`` split of
    ``cfg.corpus_dir`` or of the corpus ``cfg.corpus`` builds with ``tokenizer``
    (default: the one saved with the supernet), masked as supernet training
    masks its validation set. Rows already in ``OUT/evaluated.parquet`` are
    replayed first; the Tune run then evaluates only what is missing.
    ``OUT/chosen.parquet`` is written once the search is done. The search holds ``OUT/.raynas.lock``
    (:mod:`raynas.run_lock`) while it runs: a second search on OUT would store every row twice.
    """
    from raynas.run_lock import run_lock

    say = progress or (lambda s: print(s, file=sys.stderr, flush=True))
    with run_lock(out_dir, say=say):
        return _search(cfg, supernet, constraint, Path(out_dir), batches, tokenizer, max_trials, say)


def _search(cfg: SearchConfig, supernet: str | os.PathLike | Any, constraint: Constraint, out: Path,
            batches: Sequence[dict[str, torch.Tensor]] | None, tokenizer: Any, max_trials: int | None,
            say: Say) -> SearchRun:
    from raynas.orchestration.cluster import check_cluster
    from raynas.supernet import Supernet, load_supernet, load_supernet_tokenizer

    budgets = constraint.budgets(cfg.budgets)
    if isinstance(supernet, Supernet):
        net = supernet
    else:
        if not Path(supernet).is_dir():
            raise ConfigError(f"supernet {supernet}: no such folder")
        net = load_supernet(supernet)
    if net.space.to_dict() != constraint.space.to_dict():
        raise ConfigError(f"constraint: built for space {constraint.space.name!r}, not the supernet's "
                          f"({net.space.name!r} with other dimensions)")
    store = ResultStore(out / EVALUATED_FILE)
    store.check_same_search(space=net.space.name, strategy=cfg.strategy, seed=cfg.seed)
    search = EvolutionSearch(net.space, constraint.costs, budgets, **cfg.search_kwargs())
    replayed = search.replay(store.rows())
    timing: dict[str, float] = {}
    if replayed:
        say(f"search: resumed {replayed} stored evaluations from {store.path} (generation "
            f"{search.generation}/{search.last_generation})")
    if not search.done:
        check_cluster(say=say)  # a dead cluster address: one line now, not after tokenizing the validation set
        if batches is None:
            tok = tokenizer if tokenizer is not None or isinstance(supernet, Supernet) else \
                load_supernet_tokenizer(supernet)
            batches = corpus_validation_batches(cfg, tok, out)
        _check_objective(cfg, net.space.max_hidden)
        timing = _tune(cfg, net, search, constraint, store, list(batches), out, max_trials, say)
    rows = store.rows()
    chosen: list[dict[str, Any]] = []
    if search.done:
        chosen = chosen_rows(rows, budgets, constraint)
        write_chosen(chosen, out / CHOSEN_FILE)
        if search.stats.get("failed"):
            say(f"search: {search.stats['failed']} arch(s) failed twice and were dropped")
    return SearchRun(out, budgets, rows, chosen, search.done, replayed, timing, dict(search.stats))


def corpus_validation_batches(cfg: SearchConfig, tokenizer: Any, out: Path) -> list[dict[str, torch.Tensor]]:
    """The validation batches of ``cfg.corpus_dir`` or ``cfg.corpus`` (built under ``out/corpus``)."""
    import datasets

    from raynas.data.corpus import build_corpus
    from raynas.data.validation_set import mlm_validation_batches

    if cfg.corpus_dir is not None:
        if not (Path(cfg.corpus_dir) / "dataset_dict.json").is_file():
            raise ConfigError(f"corpus_dir {cfg.corpus_dir}: not a saved corpus (no dataset_dict.json)")
        corpus = datasets.load_from_disk(cfg.corpus_dir)
    else:
        if tokenizer is None:
            raise ConfigError("validation data: the supernet has no saved tokenizer; give corpus_dir or batches")
        corpus = build_corpus(cfg.corpus, tokenizer, cache_dir=out / "corpus")
    if "validation" not in corpus or len(corpus["validation"]) == 0:
        raise ConfigError("corpus: no validation rows (raise corpus.validation_fraction)")
    if tokenizer is None:
        raise ConfigError("validation data: masking needs the supernet's tokenizer (none saved with it)")
    return mlm_validation_batches(corpus["validation"], tokenizer, cfg.batch_size, cfg.eval_batches,
                                  cfg.mlm_probability)


def _check_objective(cfg: SearchConfig, max_hidden: int) -> None:
    """kd: the teacher resolves and is at least as wide as the supernet (no projection is saved with it)."""
    if cfg.objective != "kd":
        return
    from transformers import AutoConfig

    from raynas.teachers import resolve_teacher

    width = AutoConfig.from_pretrained(resolve_teacher(cfg.teacher)).hidden_size
    if width < max_hidden:
        raise ConfigError(f"teacher {cfg.teacher}: hidden size {width} < the supernet's {max_hidden} "
                          "(kd search compares hidden states without a projection)")


def _tune(cfg: SearchConfig, net: Any, search: EvolutionSearch, constraint: Constraint, store: ResultStore,
          batches: list[dict[str, torch.Tensor]], out: Path, max_trials: int | None, say: Say) -> dict[str, float]:
    import ray
    from ray import tune

    from raynas.orchestration.cluster import connect
    from raynas.orchestration.shared_supernet import put_supernet

    connect(log_to_driver=False)
    shared = [put_supernet(net), ray.put(batches)]  # once; a list, so Tune passes the refs themselves
    space_name, t_start, done_before = net.space.name, time.perf_counter(), len(store)

    def persist(trial_id: str, config: dict[str, Any], result: dict[str, Any], losses: list[dict[str, float]]) -> None:
        archs = config["archs"]
        started, finished = (datetime.fromtimestamp(result[k], tz=timezone.utc) for k in ("started_at", "finished_at"))
        store.add([{"arch": a, "space": space_name, "strategy": cfg.strategy, "budget": b,
                    "origin": search.candidate(a).origin, **d, "measured_latency_ms": None,
                    "proxy_loss": t["loss"], "loss_terms": loss_terms_json(t), "generation": config["generation"],
                    "trial_id": trial_id, "seed": cfg.seed, "started_at": started, "finished_at": finished}
                   for a, b, d, t in zip(archs, config["budgets"], constraint.describe(archs), losses, strict=True)])

    def report() -> None:
        n, total = len(store), max(search.planned, len(store))
        rate = (time.perf_counter() - t_start) / max(1, n - done_before)
        eta = "" if search.done else f", ETA {clock(rate * (total - n))}"
        say(f"search: generation {search.generation}/{search.last_generation}, evaluations {n}/{total}{eta}")

    searcher = ArchSearcher(search, cfg.archs_per_trial, persist, max_trials, report)
    clock = _TrialClock()
    gpus = cfg.gpus_per_trial
    # Tune keeps one trial pending for a custom searcher unless a concurrency limit is set: without one, trials
    # would start one after another. Default: as many as the cluster's CPUs (and GPUs) hold at once.
    resources = ray.cluster_resources()
    slots = int(resources.get("CPU", 1) // cfg.cpus_per_trial)
    if gpus > 0:
        slots = min(slots, int(resources.get("GPU", 0) // gpus))
    concurrent = cfg.max_concurrent_trials or max(1, slots)
    trainable = tune.with_resources(tune.with_parameters(_trial, shared=shared), {"cpu": cfg.cpus_per_trial, "gpu": gpus})
    objective = {"mode": cfg.objective, "teacher": cfg.teacher, "hidden_weight": cfg.hidden_weight,
                 "attention_weight": cfg.attention_weight}
    storage = Path(cfg.storage or out / "ray_results").resolve()
    say(f"search: {cfg.strategy}, {len(search.budgets)} budget(s) ({', '.join(b.label for b in search.budgets)}), "
        f"{search.planned} evaluations planned, {len(store)} stored, {cfg.archs_per_trial} archs per trial")
    tuner = tune.Tuner(
        trainable,
        param_space={"device": cfg.device, "threads": max(1, int(cfg.cpus_per_trial)), "objective": objective},
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=-1, reuse_actors=True,
                                    max_concurrent_trials=concurrent,
                                    trial_dirname_creator=lambda t: f"eval_{t.trial_id}"),
        run_config=tune.RunConfig(name=f"search-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=str(storage),
                                  verbose=0, callbacks=[clock]),
    )
    t_fit = time.perf_counter()
    tuner.fit()
    first = min(clock.started.values(), default=math.nan)
    return _timing(searcher, clock, time.perf_counter() - t_start, first - t_fit, len(store) - done_before)


def _timing(searcher: ArchSearcher, clock: _TrialClock, wall_s: float, startup_s: float,
            archs: int) -> dict[str, float]:
    """Seconds per arch evaluation and Tune's overhead per trial (wall minus in-trial evaluation), measured.

    ``startup_s``: from ``Tuner.fit()`` to the first trial starting (Tune's set-up and the first worker
    process), paid once per run rather than per trial.
    """
    ids = [t for t in searcher.eval_s if t in clock.wall_s]
    eval_total = sum(searcher.eval_s.values())
    overhead = sorted(clock.wall_s[t] - searcher.eval_s[t] for t in ids)
    return {"wall_s": wall_s, "startup_s": startup_s, "trials": float(len(searcher.eval_s)), "archs": float(archs),
            "eval_s": eval_total, "eval_s_per_arch": eval_total / archs if archs else math.nan,
            "setup_s_per_trial": sum(searcher.setup_s.values()) / max(1, len(searcher.setup_s)),
            "tune_overhead_s_per_trial": sum(overhead) / len(overhead) if overhead else math.nan,
            "tune_overhead_s_median": overhead[len(overhead) // 2] if overhead else math.nan}


def summary_dict(run: SearchRun) -> dict[str, Any]:
    """A JSON-friendly summary of a run (budgets, counts, timing, search stats)."""
    return {"out_dir": str(run.out_dir), "budgets": [asdict(b) for b in run.budgets], "evaluated": len(run.evaluated),
            "done": run.done, "replayed": run.replayed, "timing": run.timing, "stats": run.stats}
