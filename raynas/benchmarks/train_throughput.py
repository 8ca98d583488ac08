"""Training throughput of a supernet against its largest sub-model trained alone, on 1 and N Ray workers.

Behind ``raynas bench train``. From one :class:`TrainConfig` (a supernet from a
``space`` or ``init_from``), four kinds of run go through the same engine
(:func:`raynas.orchestration.supernet_training.run_training`: Ray Train, DeepSpeed
ZeRO or DDP), on the same corpus, ``seq_len``, global batch, steps, learning
rate and engine settings:

* ``supernet``: the config as given: per step, each worker trains its M sampled
  sub-models (batch-wise: ``sampler.per_worker``) on its shard of the batch;
* ``plain``: the space's largest sub-model, extracted from the supernet built
  with the same seed and dropout, exported as a transformers folder (bert when
  expressible) and trained as a plain masked LM (what ``raynas train`` does);

each with every worker count asked for, interleaved (supernet, plain, then the
next worker count) so slow drift of a shared machine hits both alike.

**What is timed.** ``tokens_per_s`` is the run's own report: tokens through
every sub-model (a sequence trained by M sub-models counts M times), summed
over workers, from the end of step 1 to the end of the last step (step 1 --
allocation, DeepSpeed buckets -- is left out). Checkpoints and evaluations are
set to happen only at the last step (``checkpoint_every = eval_every = steps``),
and the last step's rate is reported *before* its evaluation and checkpoint, so
neither is in the rate. Ray / worker start-up is not either; ``wall_s`` (the
whole ``run_training`` call) shows it.

**Reading the table.** ``sequences_per_s = tokens_per_s / (passes_per_seq * seq_len)``
is the rate at which the corpus is consumed (packed rows carry no padding, so
it is exact). The supernet's sub-models are on average smaller than the largest
one (``mean_params``), so ``ratio_vs_plain`` (tokens/s over the plain model's
at the same worker count) above 1 does not mean weight sharing is free: compare
it with ``mean_params``. ``scaling`` is tokens/s over the same config's at the
fewest workers benched.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
import pyarrow as pa

from raynas.errors import ConfigError
from raynas.orchestration.supernet_training import TrainConfig, load_tokenizer, run_training

Row = dict[str, Any]

TRAIN_SCHEMA = pa.schema([
    ("config", pa.string()), ("workers", pa.int32()), ("passes_per_seq", pa.int32()),
    ("sub_models_per_step", pa.float64()), ("mean_params", pa.float64()), ("tokens_per_s", pa.float64()),
    ("sequences_per_s", pa.float64()), ("ratio_vs_plain", pa.float64()), ("scaling", pa.float64()),
    ("loss", pa.float64()), ("wall_s", pa.float64()), ("steps", pa.int32()), ("batch_size", pa.int32()),
    ("seq_len", pa.int32()), ("engine", pa.string()), ("space", pa.string()), ("largest", pa.string()),
])
CONFIGS = ("supernet", "plain")
PRINTED = ("config", "workers", "passes_per_seq", "sub_models_per_step", "mean_params", "tokens_per_s",
           "sequences_per_s", "ratio_vs_plain", "scaling", "loss", "wall_s")
TABLE_FILE, CORPUS_DIR, LARGEST_DIR = "bench_train.parquet", "corpus", "largest-model"


def engine_name(cfg: TrainConfig) -> str:
    ds = cfg.deepspeed
    return f"deepspeed-zero{ds.zero_stage}-{cfg.precision}" if ds.enabled else f"ddp-{cfg.precision}"


def check_bench(cfg: TrainConfig, workers: Sequence[int]) -> list[int]:
    """The worker counts, sorted and unique; ConfigError for anything the runs would trip over later."""
    if cfg.model or not (cfg.space or cfg.init_from):
        raise ConfigError("model: raynas bench train needs a supernet config (space or init_from), not model")
    ws = sorted(set(workers))
    if not ws or any(not isinstance(w, int) or w < 1 for w in ws):
        raise ConfigError(f"workers: expected positive integers, got {list(workers)}")
    for w in ws:
        if cfg.batch_size % w:
            raise ConfigError(f"batch_size {cfg.batch_size} is not a multiple of {w} workers")
    if cfg.steps < 2:
        raise ConfigError(f"steps: expected >= 2 (the first step is not timed), got {cfg.steps}")
    return ws


def export_largest(cfg: TrainConfig, folder: Path, tokenizer: Any) -> tuple[Path, Any, Any]:
    """``(folder, space, largest arch)``: the largest sub-model of ``cfg``'s supernet as a transformers folder."""
    from raynas.export import export_model
    from raynas.training.factories import build_net

    net, space = build_net(cfg)  # the supernet a training run builds: same seed, dropout, weights
    largest = space.largest()
    model = net.extract(largest).train()
    export_model(model, folder, tokenizer, overwrite=True)
    return folder, space, largest


def _arch_stats(run_dir: Path, space: Any, plain_params: int) -> tuple[float, float]:
    """From the run's arch logs: distinct sub-models per optimizer step, and their mean MLM params."""
    per_step: dict[int, set[str]] = {}
    params: list[int] = []
    cache: dict[str, int] = {}
    for path in sorted((run_dir / "archs").glob("rank-*.jsonl")):
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            arch = entry["arch"]
            per_step.setdefault(entry["step"], set()).add(arch)
            if arch not in cache:
                cache[arch] = plain_params if arch == "model" else space.params(space.validate(arch), "mlm")
            params.append(cache[arch])
    if not per_step:
        return math.nan, math.nan
    return sum(map(len, per_step.values())) / len(per_step), sum(params) / len(params)


def _fresh(path: Path) -> Path:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)
    return path


def bench_train(
    cfg: TrainConfig,
    workers: Sequence[int] = (1, 2),
    out: str | os.PathLike = "runs/bench-train",
    progress: Callable[[Row], None] | None = None,
) -> pd.DataFrame:
    """Run supernet and plain-largest training at each worker count; one row per run (see the module doc).

    Every run gets a fresh ``out/<config>-<W>w`` folder (an old one is deleted
    first, so nothing resumes); the corpus is tokenized once into ``out/corpus``
    and shared; the plain model lives in ``out/largest-model``. Ray is started unless this
    process already initialized it, and shut down again only if started here: the
    cluster at ``RAY_ADDRESS`` if set, else a private local instance with
    ``num_cpus = max(workers) * cpus_per_worker`` (even if a ``ray start`` cluster
    runs on this machine). ``progress(row)`` follows each run.
    Runs use ``max_failures = 0``: a restarted run would not time the same work.
    """
    import ray

    from raynas.data.corpus import build_corpus
    from raynas.orchestration.cluster import connect

    ws = check_bench(cfg, workers)
    root = Path(out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    engine = engine_name(cfg)
    tokenizer = load_tokenizer(cfg)
    print(f"bench train: tokenizing the corpus once into {root / CORPUS_DIR}", file=sys.stderr, flush=True)
    build_corpus(cfg.corpus, tokenizer, cache_dir=root / CORPUS_DIR)
    model_dir, space, largest = export_largest(cfg, _fresh(root / LARGEST_DIR), tokenizer)
    plain_params = space.params(largest, "mlm")
    base = dataclasses.replace(cfg, checkpoint_every=cfg.steps, eval_every=cfg.steps, max_failures=0)
    plain = dataclasses.replace(base, space=None, space_overrides={}, init_from=None, model=str(model_dir),
                                tokenizer=cfg.tokenizer or str(model_dir))
    # RAY_ADDRESS's cluster (checked), else a private instance, even if a `ray start` cluster runs on this machine
    started = connect(private=True, num_cpus=max(1, math.ceil(ws[-1] * cfg.cpus_per_worker)),
                      include_dashboard=False).started
    rows: list[Row] = []
    try:
        for w in ws:
            for name, run_cfg in (("supernet", base), ("plain", plain)):
                run_dir = _fresh(root / f"{name}-{w}w")
                run_dir.mkdir(parents=True)
                (run_dir / CORPUS_DIR).symlink_to(root / CORPUS_DIR, target_is_directory=True)
                this = dataclasses.replace(run_cfg, out=str(run_dir), num_workers=w, name=f"bench-{name}-{w}w")
                print(f"bench train: {name}, {w} worker(s), {cfg.steps} steps -> {run_dir}", file=sys.stderr, flush=True)
                t0 = time.perf_counter()
                metrics = run_training(this)
                wall = time.perf_counter() - t0
                per_step, mean_params = _arch_stats(run_dir, space, plain_params)
                passes = _passes_per_seq(run_dir)
                tps = float(metrics["tokens_per_s"])
                rows.append({
                    "config": name, "workers": w, "passes_per_seq": passes, "sub_models_per_step": per_step,
                    "mean_params": mean_params, "tokens_per_s": tps,
                    "sequences_per_s": tps / (passes * cfg.corpus.seq_len), "ratio_vs_plain": math.nan,
                    "scaling": math.nan, "loss": float(metrics["loss"]), "wall_s": wall, "steps": cfg.steps,
                    "batch_size": cfg.batch_size, "seq_len": cfg.corpus.seq_len, "engine": engine,
                    "space": space.name, "largest": space.format(largest),
                })
                if progress is not None:
                    progress(rows[-1])
    finally:
        if started:
            ray.shutdown()
    for row in rows:
        plain_row = next(r for r in rows if r["config"] == "plain" and r["workers"] == row["workers"])
        first = next(r for r in rows if r["config"] == row["config"] and r["workers"] == ws[0])
        row["ratio_vs_plain"] = row["tokens_per_s"] / plain_row["tokens_per_s"]
        row["scaling"] = row["tokens_per_s"] / first["tokens_per_s"]
    return to_frame(rows)


def _passes_per_seq(run_dir: Path) -> int:
    """Sub-models each sequence goes through: rank 0's entries at its first step (every step draws as many)."""
    lines = (run_dir / "archs" / "rank-0.jsonl").read_text().splitlines()
    steps = [json.loads(ln)["step"] for ln in lines]
    return steps.count(steps[0]) if steps else 0


def to_frame(rows: Sequence[Row]) -> pd.DataFrame:
    from raynas.tables import to_table

    return to_table(rows, TRAIN_SCHEMA).to_pandas()


def write_table(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """The table as Parquet with :data:`TRAIN_SCHEMA`, written atomically."""
    from raynas.tables import to_table, write_parquet

    return write_parquet(to_table(df.to_dict("records"), TRAIN_SCHEMA), path)


def format_table(df: pd.DataFrame) -> str:
    """The printed columns, via ``DataFrame.to_string``."""
    fmt = {"sub_models_per_step": "{:.1f}".format, "mean_params": "{:,.0f}".format, "tokens_per_s": "{:,.0f}".format,
           "sequences_per_s": "{:.2f}".format, "ratio_vs_plain": "{:.3f}".format, "scaling": "{:.3f}".format,
           "loss": "{:.3f}".format, "wall_s": "{:.1f}".format}
    return df.loc[:, list(PRINTED)].to_string(index=False, formatters=fmt)
