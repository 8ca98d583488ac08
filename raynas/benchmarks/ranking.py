"""Ranking fidelity: does the supernet order sub-models as training them alone would?

Behind ``raynas bench ranking`` (issue 9, point 7; AutoTinyBERT Appendix E).
Search trusts the supernet's *proxy* fitness, the validation loss of a sub-model
with weights inherited from the trained supernet. That is only worth searching
on if it ranks archs the way their *stand-alone* training does. This module
measures it for ``k`` archs of one trained supernet:

1. pick ``k`` archs spread over sizes (:func:`pick_archs`: the smallest and the
   largest, the rest closest to evenly spaced encoder-parameter targets, seeded);
2. proxy loss: :func:`~raynas.training.validation.validation_losses` of each
   arch through the trained supernet, on fixed validation batches of the
   corpus' validation split, with the objective the supernet was trained with;
3. stand-alone loss: each arch extracted from a *freshly initialised* supernet
   of the same config (seeded: a random init of that arch), exported as a model
   folder and trained from scratch through the same engine as everything else
   (:func:`~raynas.orchestration.supernet_training.run_training` with ``model=``),
   with the same corpus, objective, steps, batch size and learning rate, then
   scored on the *same* validation batches;
4. report pairwise ranking accuracy and Kendall's tau between the two
   (:mod:`raynas.search.metrics`), beside the paper's 96.7 %.

Every stand-alone run lives in ``OUT/standalone/<arch>`` and is reused when it
finished (rerunning resumes an interrupted one from its checkpoint: that is
``run_training``'s own resume); a finished run keeps its ``model/`` and drops
its checkpoints, which only a resume needs. ``OUT/setting.json`` records what
the runs were trained with; a rerun with other settings into the same folder
is refused rather than mixing budgets. Ray is started once for all runs, and
only when a run has to train.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import pyarrow as pa

from raynas.errors import ConfigError
from raynas.search.metrics import kendall_tau, pairwise_accuracy
from raynas.training.config import TrainConfig

Row = dict[str, Any]

PAPER_PAIRWISE_ACCURACY = 0.967  # AutoTinyBERT Table 3 / Appendix E: SuperPLM vs stand-alone training
RANKING_SCHEMA = pa.schema([
    ("arch", pa.string()), ("params", pa.int64()), ("encoder_params", pa.int64()), ("proxy_loss", pa.float64()),
    ("standalone_loss", pa.float64()), ("proxy_rank", pa.int32()), ("standalone_rank", pa.int32()),
    ("train_loss", pa.float64()), ("train_s", pa.float64()),
])
PRINTED = ("arch", "params", "proxy_loss", "standalone_loss", "proxy_rank", "standalone_rank")
TABLE_FILE, SUMMARY_FILE, SETTING_FILE = "ranking.parquet", "ranking.json", "setting.json"
CORPUS_DIR, INIT_DIR, RUNS_DIR, DONE_FILE = "corpus", "init", "standalone", "ranking_run.json"
POOL_PER_ARCH = 64  # random archs drawn per requested arch to choose the spread from


# ---------------------------------------------------------------- choosing archs and scoring ranks


def pick_archs(space: Any, k: int, seed: int = 0) -> list[Any]:
    """``k`` distinct archs spread over encoder sizes: the smallest, the largest, and between them the archs of a
    seeded random pool closest to ``k`` evenly spaced parameter targets.

    Stratified rather than uniform: uniformly sampled archs crowd around the
    mean size, and a ranking check must span the sizes search chooses between.
    """
    if k < 2:
        raise ConfigError(f"archs: expected at least 2, got {k}")
    rng = random.Random(seed)
    pool: dict[str, Any] = {}
    for arch in (space.smallest(), space.largest(), *(space.sample(rng) for _ in range(POOL_PER_ARCH * k))):
        pool.setdefault(space.format(arch), arch)
    if len(pool) < k:
        raise ConfigError(f"archs: {k} requested, but the space yielded only {len(pool)} distinct archs")
    size = {name: space.params(arch, "encoder") for name, arch in pool.items()}
    lo, hi = size[space.format(space.smallest())], size[space.format(space.largest())]
    chosen = [space.format(space.smallest()), space.format(space.largest())]
    for i in range(1, k - 1):
        target = lo + (hi - lo) * i / (k - 1)
        name = min((n for n in pool if n not in chosen), key=lambda n: abs(size[n] - target))
        chosen.insert(-1, name)
    return sorted((pool[n] for n in chosen), key=lambda a: (space.params(a, "encoder"), space.format(a)))


def _ranks(values: Sequence[float]) -> list[int]:
    """1 = lowest loss; equal values share the better rank."""
    return [1 + sum(other < v for other in values) for v in values]


def rank_rows(rows: Sequence[Row]) -> tuple[list[Row], dict[str, Any]]:
    """Rows with ``proxy_loss`` / ``standalone_loss`` -> the rows with both ranks filled, and the agreement.

    ``pairwise_accuracy``: share of arch pairs the proxy orders as stand-alone
    training does (Appendix E); ``kendall_tau``: tau-b of the two orders.
    """
    proxy = [float(r["proxy_loss"]) for r in rows]
    alone = [float(r["standalone_loss"]) for r in rows]
    ranked = [{**r, "proxy_rank": p, "standalone_rank": s}
              for r, p, s in zip(rows, _ranks(proxy), _ranks(alone), strict=True)]
    summary = {"archs": len(rows), "pairs": len(rows) * (len(rows) - 1) // 2,
               "pairwise_accuracy": pairwise_accuracy(proxy, alone), "kendall_tau": kendall_tau(proxy, alone),
               "paper_pairwise_accuracy": PAPER_PAIRWISE_ACCURACY}
    return ranked, summary


def format_table(rows: Sequence[Row]) -> str:
    """The printed columns as aligned text."""
    cells = [(r["arch"], f"{r['params']:,}", f"{r['proxy_loss']:.4f}", f"{r['standalone_loss']:.4f}",
              str(r["proxy_rank"]), str(r["standalone_rank"])) for r in rows]
    widths = [max(len(c) for c in col) for col in zip(PRINTED, *cells, strict=True)]
    return "\n".join("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(line, widths)))
                     for line in (PRINTED, *cells))


def format_summary(summary: dict[str, Any]) -> str:
    return (f"pairwise ranking accuracy {summary['pairwise_accuracy']:.3f} over {summary['pairs']} pairs "
            f"(AutoTinyBERT Appendix E: {summary['paper_pairwise_accuracy']:.3f}); Kendall tau "
            f"{summary['kendall_tau']:.3f}; {summary['archs']} archs")


# ---------------------------------------------------------------- checks before Ray starts


def _space_diff(a: dict[str, Any], b: dict[str, Any]) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys[:3])


def check_ranking(cfg: TrainConfig, supernet_dir: str | os.PathLike, k: int) -> Any:
    """The trained supernet, after every check that needs no Ray: ConfigError naming the field or file."""
    from raynas.spaces import load_space, space_from_dict
    from raynas.supernet import load_supernet

    if k < 3:
        raise ConfigError(f"archs: expected at least 3 (a ranking needs pairs to disagree on), got {k}")
    if cfg.model or not (cfg.space or cfg.init_from):
        raise ConfigError("model: raynas bench ranking needs the supernet's training config (space or init_from)")
    o = cfg.objective
    if o.mode == "kd" and o.hidden_weight > 0 and o.project is not False:
        raise ConfigError("objective.project: kd with hidden_weight > 0 trains a projection that is not saved with "
                          "a model, so losses could not be re-scored after training; set objective.project=false "
                          "(or rank by mlm)")
    root = Path(supernet_dir)
    if not root.is_dir():
        raise ConfigError(f"--supernet {root}: no such folder")
    net = load_supernet(root)  # ConfigError naming the file if it is not a supernet folder
    if cfg.space:
        space = load_space(cfg.space, cfg.space_overrides or None)
        where = f"space {cfg.space!r}"
    else:
        meta = Path(str(cfg.init_from)) / "supernet.json"
        if not meta.is_file():
            raise ConfigError(f"init_from {cfg.init_from}: not a supernet folder (no supernet.json)")
        space = space_from_dict(json.loads(meta.read_text())["config"]["space"], str(meta))
        where = f"init_from {cfg.init_from}"
    ours, theirs = space.to_dict(), net.space.to_dict()
    if ours != theirs:
        raise ConfigError(f"{where}: the config's space differs from the supernet's ({root / 'supernet.json'}): "
                          f"{_space_diff(ours, theirs)}")
    return net


def _setting(cfg: TrainConfig, supernet_dir: Path, archs: Sequence[str], seed: int, val_batches: int) -> dict:
    """What the stand-alone runs and the scores depend on; a rerun into the same OUT must match it."""
    raw = dataclasses.asdict(cfg)
    for key in ("out", "name", "log_every", "checkpoint_every", "eval_every", "max_failures"):
        raw.pop(key)
    return {"supernet": str(supernet_dir.resolve()), "archs": list(archs), "seed": seed, "val_batches": val_batches,
            "train": raw}


def _check_setting(root: Path, setting: dict) -> None:
    path = root / SETTING_FILE
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    if old == setting:
        return
    keys = [k for k in setting if k != "train" and old.get(k) != setting[k]]
    keys += [f"train.{k}" for k, v in setting["train"].items() if old.get("train", {}).get(k) != v]
    raise ConfigError(f"{path}: this folder holds a ranking run with other settings ({', '.join(keys)} differ); "
                      "use another --out, or delete it")


# ---------------------------------------------------------------- data and scoring


def validation_batches(rows: Any, tokenizer: Any, mlm_probability: float, n: int, batch_size: int,
                       seed: int) -> list[dict[str, Any]]:
    """The first ``n`` batches of ``batch_size`` validation rows, masked once with a seeded collator (as
    training's own validation does): every model is scored on these same tensors."""
    from raynas.data.validation_set import mlm_validation_batches

    if len(rows) == 0:
        raise ConfigError("corpus.validation_fraction: the corpus has no validation rows to score on")
    return mlm_validation_batches(rows, tokenizer, batch_size, n, mlm_probability, seed=seed)


def _score(cfg: TrainConfig, archs: Sequence[Any], batches: list, teacher: Any) -> list[float]:
    """Validation loss of each arch of ``cfg``'s student (``archs=[None]`` for a plain model), with the objective
    a training run of ``cfg`` builds (:func:`build_student`)."""
    from raynas.training.factories import build_student
    from raynas.training.validation import validation_losses

    student, _ = build_student(cfg, teacher)
    return [r["loss"] for r in validation_losses(student.net.eval(), archs, batches, student.objective)]


def _export_init(net: Any, arch: Any, seed: int, folder: Path, tokenizer: Any) -> Path:
    """``arch`` randomly initialised: extracted from a fresh supernet of ``net``'s config seeded with ``seed``."""
    import torch

    from raynas.export import export_model
    from raynas.supernet import Supernet
    from raynas.supernet.supernet import SupernetConfig

    torch.manual_seed(seed)
    fresh = Supernet(SupernetConfig(**net.config.to_dict()))
    return export_model(fresh.extract(arch).train(), folder, tokenizer, overwrite=True).path


# ---------------------------------------------------------------- the benchmark


def bench_ranking(
    cfg: TrainConfig,
    supernet_dir: str | os.PathLike,
    out: str | os.PathLike,
    k: int = 8,
    seed: int = 0,
    val_batches: int = 16,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[Row], dict[str, Any]]:
    """Proxy vs stand-alone validation loss of ``k`` archs of the supernet at ``supernet_dir`` (see the module doc).

    ``cfg``: the TrainConfig the supernet was trained with; its ``steps``,
    ``batch_size``, ``lr``, corpus, objective, ``num_workers`` and engine are
    each stand-alone run's. Writes ``OUT/ranking.parquet`` and ``OUT/ranking.json``;
    returns the rows (by size) and the summary. Ray is started unless already
    initialised (the cluster at ``RAY_ADDRESS`` if set, else a private local
    instance), once, and only if some run has to train.
    """
    from raynas.data.corpus import build_corpus
    from raynas.orchestration.supernet_training import load_tokenizer, run_training
    from raynas.tables import to_table, write_parquet
    from raynas.training.factories import MODEL_DIR, build_teacher

    say = progress or (lambda s: print(s, file=sys.stderr, flush=True))
    if val_batches < 1:
        raise ConfigError(f"val_batches: expected >= 1, got {val_batches}")
    supernet_dir = Path(supernet_dir)
    net = check_ranking(cfg, supernet_dir, k)
    space = net.space
    archs = pick_archs(space, k, seed)
    names = [space.format(a) for a in archs]
    root = Path(out).resolve()
    setting = _setting(cfg, supernet_dir, names, seed, val_batches)
    _check_setting(root, setting)
    root.mkdir(parents=True, exist_ok=True)
    (root / SETTING_FILE).write_text(json.dumps(setting, indent=2))

    tokenizer = load_tokenizer(cfg)
    corpus = build_corpus(cfg.corpus, tokenizer, cache_dir=root / CORPUS_DIR)
    batches = validation_batches(corpus["validation"], tokenizer, cfg.objective.mlm_probability, val_batches,
                                 cfg.batch_size, seed + 12345)
    teacher = build_teacher(cfg)
    say(f"ranking: {k} archs of {space.name}, {len(batches)} validation batches of {cfg.batch_size}; "
        f"stand-alone: {cfg.steps} steps, batch {cfg.batch_size}, lr {cfg.lr:g}, {cfg.num_workers} worker(s), "
        f"{'deepspeed zero-' + str(cfg.deepspeed.zero_stage) if cfg.deepspeed.enabled else 'ddp'}")
    sup_cfg = dataclasses.replace(cfg, space=None, space_overrides={}, init_from=str(supernet_dir.resolve()))
    t0 = time.perf_counter()
    proxy = _score(sup_cfg, archs, batches, teacher)
    say(f"ranking: proxy losses of {k} archs through the supernet in {time.perf_counter() - t0:.1f} s")

    rows: list[Row] = []
    trained_s: list[float] = []
    started = False
    try:
        for i, (arch, name, proxy_loss) in enumerate(zip(archs, names, proxy, strict=True), 1):
            run_dir = root / RUNS_DIR / name
            done = run_dir / DONE_FILE
            init_dir = root / INIT_DIR / name
            plain = dataclasses.replace(
                cfg, space=None, space_overrides={}, init_from=None, model=str(init_dir),
                tokenizer=cfg.tokenizer or str(init_dir), out=str(run_dir), name=f"ranking-{name}",
                eval_every=cfg.steps)
            if done.is_file():
                record = json.loads(done.read_text())
                say(f"ranking: [{i}/{k}] {name}: reusing the finished run in {run_dir}")
            else:
                if not (init_dir / "config.json").is_file():
                    _export_init(net, arch, seed, init_dir, tokenizer)
                started = started or _start_ray(cfg)
                run_dir.mkdir(parents=True, exist_ok=True)
                corpus_link = run_dir / CORPUS_DIR
                if not corpus_link.exists():
                    corpus_link.symlink_to(root / CORPUS_DIR, target_is_directory=True)
                say(f"ranking: [{i}/{k}] {name}: training {cfg.steps} steps stand-alone -> {run_dir}"
                    + _eta(trained_s, k - i + 1))
                t1 = time.perf_counter()
                metrics = run_training(plain)
                record = {"train_loss": float(metrics.get("loss", math.nan)), "train_s": time.perf_counter() - t1}
                trained_s.append(record["train_s"])
                done.write_text(json.dumps(record))
                for resume_only in ("checkpoints", "ray_results"):  # a finished run is reused from model/
                    shutil.rmtree(run_dir / resume_only, ignore_errors=True)
            model_cfg = dataclasses.replace(plain, model=str(run_dir / MODEL_DIR))
            alone = _score(model_cfg, [None], batches, teacher)[0]
            rows.append({"arch": name, "params": space.params(arch, "mlm"), "encoder_params": space.params(arch, "encoder"),
                         "proxy_loss": proxy_loss, "standalone_loss": alone, "proxy_rank": 0, "standalone_rank": 0,
                         **record})
            say(f"ranking: [{i}/{k}] {name}: proxy {proxy_loss:.4f}, stand-alone {alone:.4f}"
                + _eta(trained_s, k - i))
    finally:
        if started:
            import ray

            ray.shutdown()
    rows, summary = rank_rows(rows)
    summary.update({"space": space.name, "supernet": str(supernet_dir), "steps": cfg.steps,
                    "batch_size": cfg.batch_size, "lr": cfg.lr, "objective": cfg.objective.mode,
                    "workers": cfg.num_workers, "deepspeed": cfg.deepspeed.enabled, "val_batches": len(batches),
                    "seed": seed, "wall_s": time.perf_counter() - t0})
    write_parquet(to_table(rows, RANKING_SCHEMA), root / TABLE_FILE)
    (root / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    return rows, summary


def _eta(trained_s: Sequence[float], left: int) -> str:
    if not trained_s or left <= 0:
        return ""
    return f" (ETA {sum(trained_s) / len(trained_s) * left / 60:.1f} min for {left} more)"


def _start_ray(cfg: TrainConfig) -> bool:
    """Start Ray unless this process already did; True when started here (this module then shuts it down)."""
    from raynas.orchestration.cluster import connect

    # RAY_ADDRESS's cluster (checked), else a private instance sized for one run, even if a `ray start`
    # cluster runs on this machine
    return connect(private=True, num_cpus=max(1, math.ceil(cfg.num_workers * cfg.cpus_per_worker)),
                   include_dashboard=False).started
