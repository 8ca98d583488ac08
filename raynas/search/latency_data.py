"""The latency dataset: stratified archs, timed as their exported models, stored as Parquet; then a predictor.

AutoTinyBERT filters search candidates by a latency predictor fitted on archs
measured *on the target hardware*. This module makes that dataset and fits it:

1. :func:`sample_archs` draws archs stratified by depth and FLOPs, so the
   shallow, the deep, the thin and the wide are all measured (a uniform draw
   piles up around the middle and leaves the ends, where budgets bind, sparse).
2. :class:`ArchModels` builds the model an arch *exports to* (``bert`` when the
   export would be ``bert``, otherwise ``raynas``) with seeded random weights:
   latency does not depend on weight values, so no trained supernet is needed.
3. :func:`run_job` times a chunk of archs interleaved with the reference
   through :func:`raynas.evaluation.latency.measure_modules`, the protocol of
   the final report (warm-up, median of repeats); the Ray adapter
   (:mod:`raynas.orchestration.latency_tasks`) runs the same jobs as tasks.
4. :func:`build_latency_predictor` plans the jobs, keeps rows already in
   ``OUT/latency.parquet`` (a rerun measures only what is missing; the table
   is rewritten after every chunk, so a kill loses at most the chunks in
   flight), re-measures part of the held-out archs to give the noise floor,
   fits :class:`~raynas.search.predictor.LatencyPredictor` and writes it.

Pure torch: no Ray here.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import socket
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from raynas.atomic_io import atomic_file
from raynas.config_loading import FieldErrors
from raynas.errors import ConfigError
from raynas.evaluation.latency import measure_modules
from raynas.export import bert_config_for
from raynas.models import RaynasModel
from raynas.search.metrics import mape
from raynas.search.predictor import LatencyPredictor, depth, split_holdout
from raynas.spaces import Space
from raynas.stages import clock
from raynas.supernet import Supernet, SupernetConfig
from raynas.tables import to_table, write_parquet
from raynas.teachers import resolve_teacher

Row = dict[str, Any]
ROLES = ("sample", "reference", "remeasure")  # dataset arch / reference timed beside a chunk / noise-floor pass
SETTING_KEYS = ("batch_size", "seq_len", "threads", "device", "warmup", "repeats")
STATISTICS = {"median": "latency_ms", "min": "latency_min_ms"}  # what the predictor fits -> column
LATENCY_SCHEMA = pa.schema([
    ("arch", pa.string()),  # arch string; for a reference row the reference as given (teacher name, folder)
    ("role", pa.string()),
    ("space", pa.string()),
    ("params", pa.int64()),  # of the timed base encoder (AutoModel: embeddings, layers, pooler)
    ("flops", pa.int64()),  # space.flops(arch, seq_len); null for a reference outside the space
    ("depth", pa.int32()),
    ("latency_ms", pa.float64()),  # median of `repeats` forwards after `warmup`
    ("latency_p90_ms", pa.float64()),
    ("latency_min_ms", pa.float64()),
    ("batch_size", pa.int32()),
    ("seq_len", pa.int32()),
    ("threads", pa.int32()),
    ("device", pa.string()),  # as configured (cpu, cuda, auto)
    ("warmup", pa.int32()),
    ("repeats", pa.int32()),
    ("chunk", pa.int32()),  # archs of one chunk were timed interleaved, in one process
    ("host", pa.string()),
    ("measured_at", pa.timestamp("ms", tz="UTC")),
])
DATA_FILE, PREDICTOR_DIR, REPORT_FILE = "latency.parquet", "predictor", "latency_report.json"


@dataclass
class LatencyConfig:
    """How the latency dataset is drawn and timed, and where on a cluster.

    Defaults follow AutoTinyBERT's protocol ("a single CPU with a single input
    of 128 length"): batch 1, seq_len 128, one thread. One thread also keeps
    timings reproducible on a shared machine and lets several measurements run
    side by side on one node without competing for cores. 240 archs give ~190
    to fit and ~50 to judge on; 24 of those are re-measured for the noise floor.
    ``reference``: ``largest`` (the space's largest arch), a teacher name or
    model folder, or null. ``resources`` / ``label_selector`` pick the node
    type the Ray tasks run on; ``concurrency`` caps tasks in flight (1: no two
    measurements share a machine's memory bandwidth); ``chunk``: archs per task,
    timed interleaved with one reference (4: the reference is never more than
    a few seconds from the archs it normalizes; it costs one reference timing
    per 4 archs).

    What the predictor fits: ``statistic`` (``median``, the final report's
    latency, or ``min`` of the repeats, the least disturbed run) and, with
    ``normalize`` and a reference, each arch's value scaled by the reference
    timed in its own chunk (``value * reference_ms / chunk's reference``):
    the interleaved speedup the final report measures, expressed in the
    reference's ms. On a shared machine this cancels slow periods that hit a
    whole chunk. Measured on 2 shared, busy cores (MiniLM space, 240 archs):
    re-measurement MAPE 31-38 % raw; normalized, 20 % with chunks of 8 and
    10.5 % with chunks of 4 (7 % for the min). The Parquet keeps raw values,
    so a refit with other choices measures nothing again.
    """

    n_archs: int = 240
    holdout_fraction: float = 0.2
    noise_archs: int = 24
    batch_size: int = 1
    seq_len: int = 128
    threads: int = 1
    warmup: int = 3
    repeats: int = 20
    device: str = "cpu"
    reference: str | None = "largest"
    seed: int = 0
    concurrency: int = 1
    resources: dict[str, float] = field(default_factory=dict)
    label_selector: dict[str, str] | None = None
    chunk: int = 4
    statistic: str = "median"
    normalize: bool = True

    def __post_init__(self) -> None:
        problems = []
        for name, least in (("n_archs", 8), ("batch_size", 1), ("seq_len", 1), ("threads", 1), ("warmup", 0),
                            ("repeats", 1), ("concurrency", 1), ("chunk", 1), ("noise_archs", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                problems.append(f"{name}: expected an integer >= {least}, got {value!r}")
        if self.statistic not in STATISTICS:
            problems.append(f"statistic: expected one of {sorted(STATISTICS)}, got {self.statistic!r}")
        if not 0.0 <= self.holdout_fraction < 1.0:
            problems.append(f"holdout_fraction: expected in [0, 1), got {self.holdout_fraction}")
        if not (self.device in ("cpu", "cuda", "auto") or re.fullmatch(r"cuda:\d+", str(self.device))):
            problems.append(f"device: expected cpu, cuda, cuda:N or auto, got {self.device!r}")
        for key, value in (self.resources or {}).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                problems.append(f"resources.{key}: expected a number >= 0, got {value!r}")
            if key.upper() in ("CPU", "GPU"):
                problems.append(f"resources.{key}: CPUs come from threads; give custom resources only")
        for key, value in (self.label_selector or {}).items():
            if not isinstance(value, str) or not value:
                problems.append(f"label_selector.{key}: expected a non-empty string, got {value!r}")
        if problems:
            raise FieldErrors(problems)

    def settings(self) -> dict[str, Any]:
        """What a measured latency depends on (rows of one file must agree on these)."""
        return {k: getattr(self, k) for k in SETTING_KEYS}


# ---- which archs ---------------------------------------------------------------------------------
def sample_archs(space: Space, n: int, seed: int = 0, *, seq_len: int = 128, pool: int | None = None) -> list[str]:
    """``n`` distinct arch strings: smallest and largest, then equal shares of every (depth, FLOPs) stratum.

    A pool of uniform draws (``pool``, default ``max(20 n, 2000)``) is grouped
    by depth (non-identity op-layers); each depth group is cut into FLOPs
    quantile bins, and archs are taken round-robin over all strata until ``n``.
    Deterministic per seed; fewer than ``n`` only if the space has fewer archs.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ConfigError(f"n_archs: expected an integer >= 2, got {n!r}")
    rng = random.Random(seed)
    target = pool or max(20 * n, 2000)
    seen: dict[str, tuple[int, int]] = {}
    for _ in range(3 * target):
        if len(seen) >= target:
            break
        arch = space.sample(rng)
        name = space.format(arch)
        if name not in seen:
            seen[name] = (depth(space, arch), space.flops(arch, seq_len))
    chosen = list(dict.fromkeys([space.format(space.smallest()), space.format(space.largest())]))[:n]
    groups: dict[int, list[str]] = defaultdict(list)
    for name, (d, _) in seen.items():
        if name not in chosen:
            groups[d].append(name)
    bins = max(1, min(8, n // (3 * max(1, len(groups)))))  # >= 3 archs per stratum
    strata: list[list[str]] = []
    for d in sorted(groups):
        members = sorted(groups[d], key=lambda s: (seen[s][1], s))
        k = min(bins, len(members))
        strata += [members[len(members) * i // k: len(members) * (i + 1) // k] for i in range(k)]
    for stratum in strata:
        rng.shuffle(stratum)
    while len(chosen) < n and any(strata):
        order = list(range(len(strata)))
        rng.shuffle(order)  # no stratum always gets the round's leftover
        for i in order:
            if strata[i] and len(chosen) < n:
                chosen.append(strata[i].pop())
    return chosen


# ---- which model is timed --------------------------------------------------------------------------
class ArchModels:
    """The base encoder each arch exports to, with seeded random weights, without a trained supernet.

    The config comes from :meth:`Supernet.model_config` of a supernet built on
    the meta device (no memory, no init): the one place that turns a plan into a
    ``RaynasConfig``. As :func:`raynas.export.export_model` does, a
    BERT-expressible arch becomes ``BertModel`` (what ``AutoModel`` loads from
    its folder), anything else ``RaynasModel``; both with the pooler.
    """

    def __init__(self, supernet_config: SupernetConfig | dict[str, Any], bert_if_possible: bool = True) -> None:
        cfg = supernet_config if isinstance(supernet_config, SupernetConfig) else SupernetConfig(**supernet_config)
        with torch.device("meta"):
            self._net = Supernet(cfg)
        self.space: Space = self._net.space
        self.bert_if_possible = bert_if_possible

    def build(self, arch: Any, seed: int = 0) -> nn.Module:
        """``arch``'s base encoder in eval mode; weights ~ N(0, initializer_range), LayerNorms 1/0, seeded.

        transformers' own init is skipped (it draws every weight twice, ~1 s
        for a MiniLM-sized model); the fill here draws once.
        """
        from transformers import BertModel
        from transformers.initialization import no_init_weights

        config = self._net.model_config(arch)
        bert = bert_config_for(config) if self.bert_if_possible else None
        with no_init_weights():
            model = BertModel(bert, add_pooling_layer=True) if bert is not None else RaynasModel(config)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.LayerNorm):
                    module.weight.fill_(1.0)
                    module.bias.zero_()
                    continue
                for p in module.parameters(recurse=False):
                    p.normal_(0.0, config.initializer_range, generator=gen)
        return model.eval()


# ---- one chunk of measurements --------------------------------------------------------------------
@dataclass
class MeasureJob:
    """A chunk of archs timed interleaved in one process (a Ray task on a cluster), the reference beside them."""

    chunk: int
    role: str  # sample | remeasure
    archs: list[str]
    reference: str | None  # "largest", a teacher name / folder, or None
    supernet_config: dict[str, Any]  # SupernetConfig fields, space included
    settings: dict[str, Any]  # SETTING_KEYS + seed
    bert_if_possible: bool = True


Runner = Callable[[Sequence[MeasureJob]], Iterable[tuple[MeasureJob, list[Row]]]]


def run_job(job: MeasureJob) -> list[Row]:
    """Rows (LATENCY_SCHEMA) for the job's archs, then one ``reference`` row if it has a reference."""
    models = ArchModels(job.supernet_config, job.bert_if_possible)
    space, s = models.space, job.settings
    seed = int(s.get("seed", 0))
    named: list[tuple[str, Any]] = [(a, models.build(a, seed)) for a in job.archs]
    if job.reference == "largest":
        named.append((space.format(space.largest()), models.build(space.largest(), seed)))
    elif job.reference is not None:
        named.append((job.reference, job.reference))  # loaded by measure_modules (teacher name or folder)
    measured = measure_modules(named, s["seq_len"], s["batch_size"], s["threads"], s["warmup"], s["repeats"],
                               seed, s["device"])
    host, now = socket.gethostname(), datetime.now(timezone.utc)
    rows = []
    for i, ((name, _), m) in enumerate(zip(named, measured)):
        role = job.role if i < len(job.archs) else "reference"
        in_space = space.contains(name) if role == "reference" else True
        rows.append({
            "arch": name, "role": role, "space": space.name, "params": m["params"],
            "flops": space.flops(name, s["seq_len"]) if in_space else None,
            "depth": depth(space, name) if in_space else None,
            "latency_ms": m["latency_ms"], "latency_p90_ms": m["latency_p90_ms"],
            "latency_min_ms": m["latency_min_ms"], **{k: s[k] for k in SETTING_KEYS},
            "chunk": job.chunk, "host": host, "measured_at": now,
        })
    return rows


def local_runner(jobs: Sequence[MeasureJob]) -> Iterable[tuple[MeasureJob, list[Row]]]:
    """Run the jobs one after another in this process."""
    for job in jobs:
        yield job, run_job(job)


def measure_archs(space: Space, archs: Sequence[Any], settings: dict[str, Any], *, reference: str | None = None,
                  supernet_config: dict[str, Any] | None = None, chunk: int = 8,
                  runner: Runner | None = None) -> list[Row]:
    """Time ``archs`` (chunks of ``chunk``, each interleaved with ``reference`` if given); rows in LATENCY_SCHEMA."""
    sc = supernet_config or SupernetConfig(space=space.to_dict()).to_dict()
    names = [space.format(space.validate(a)) for a in archs]
    jobs = [MeasureJob(i, "sample", names[k: k + chunk], reference, sc, dict(settings))
            for i, k in enumerate(range(0, len(names), chunk))]
    return [row for _, rows in (runner or local_runner)(jobs) for row in rows]


# ---- the dataset file --------------------------------------------------------------------------------
def read_dataset(path: Path, space: Space, settings: dict[str, Any], reference: str | None = None) -> list[Row]:
    """Rows already measured at ``path`` (none if absent).

    ConfigError if they are of another space or setting, or if they were timed
    beside another reference (``reference``: the name its rows carry).
    """
    if not path.is_file():
        return []
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ConfigError(f"{path}: not a readable Parquet file ({exc})") from None
    if table.schema.names != LATENCY_SCHEMA.names:
        raise ConfigError(f"{path}: columns {table.schema.names} are not a latency dataset's; use another --out")
    rows = table.to_pylist()
    for row in rows:
        theirs = {k: row[k] for k in SETTING_KEYS}
        if row["space"] != space.name or theirs != {k: settings[k] for k in SETTING_KEYS}:
            raise ConfigError(f"{path}: measured for space {row['space']!r} with {theirs}; this run is space "
                              f"{space.name!r} with {settings}: use another --out (or delete the file)")
        if reference is not None and row["role"] == "reference" and row["arch"] != reference:
            raise ConfigError(f"{path}: timed beside reference {row['arch']!r}, this run's reference is "
                              f"{reference!r}: use another --out (or delete the file)")
    return rows


def fit_targets(rows: Sequence[Row], cfg: LatencyConfig) -> tuple[Callable[[Row], float], float | None, int]:
    """``(value of a row to fit, reference_ms, reference rows)`` for ``cfg.statistic`` / ``cfg.normalize``.

    ``reference_ms`` is the median over chunks of the reference's statistic;
    normalized, a row's value is rescaled by its own chunk's reference to that
    median, so ``reference_ms / prediction`` is the interleaved speedup.
    """
    key = STATISTICS[cfg.statistic]
    refs = {r["chunk"]: r[key] for r in rows if r["role"] == "reference"} if cfg.reference else {}
    reference_ms = float(statistics.median(refs.values())) if refs else None
    if not (cfg.normalize and reference_ms is not None):
        return (lambda r: r[key]), reference_ms, len(refs)
    missing = sorted({r["chunk"] for r in rows if r["role"] != "reference"} - set(refs))
    if missing:
        raise ConfigError(f"normalize: chunks {missing[:5]} were timed without the reference; "
                          "set normalize=false or measure into another --out")
    return (lambda r: r[key] * reference_ms / refs[r["chunk"]]), reference_ms, len(refs)


def check_reference(reference: str | None) -> None:
    """ConfigError now (before any task starts) if the reference is neither ``largest`` nor a loadable model."""
    if reference not in (None, "largest"):
        resolve_teacher(reference, "reference")


def build_latency_predictor(space: Space, out_dir: str | Path, *, n_archs: int | None = None,
                            reference: str | None = None, config: LatencyConfig | None = None,
                            supernet_config: dict[str, Any] | None = None, runner: Runner | None = None,
                            bert_if_possible: bool = True) -> LatencyPredictor:
    """Measure (resuming ``OUT/latency.parquet``), fit, write ``OUT/predictor/`` and ``OUT/latency_report.json``.

    ``n_archs`` / ``reference`` override ``config`` (default :class:`LatencyConfig`)
    when given (no reference at all: ``config.reference=None``). ``supernet_config``: the
    supernet's ``SupernetConfig`` dict when there is one (else the space's
    defaults). ``runner``: how jobs run (default: in this process); the Ray
    adapter passes one that runs them as tasks. Only archs of this run's
    sample are fitted; other rows in the file are kept but not used.
    """
    cfg = config or LatencyConfig()
    cfg = dataclasses.replace(cfg, **{k: v for k, v in (("n_archs", n_archs), ("reference", reference)) if v is not None})
    check_reference(cfg.reference)
    out = Path(out_dir)
    settings = cfg.settings()
    ref_name = space.format(space.largest()) if cfg.reference == "largest" else cfg.reference
    rows = read_dataset(out / DATA_FILE, space, settings, ref_name)  # before anything runs: a mismatch is refused now
    sc = supernet_config or SupernetConfig(space=space.to_dict()).to_dict()

    archs = sample_archs(space, cfg.n_archs, cfg.seed, seq_len=cfg.seq_len)
    extremes = [space.format(space.smallest()), space.format(space.largest())]
    _, held = split_holdout(archs, cfg.holdout_fraction, cfg.seed, extremes)
    noise = (held or archs)[: cfg.noise_archs]
    done = {(r["role"], r["arch"]) for r in rows}
    todo = [("sample", [a for a in archs if ("sample", a) not in done]),
            ("remeasure", [a for a in noise if ("remeasure", a) not in done])]
    next_chunk = max((r["chunk"] for r in rows), default=-1) + 1
    jobs = []
    for role, names in todo:  # the noise-floor pass comes after every first measurement
        for k in range(0, len(names), cfg.chunk):
            jobs.append(MeasureJob(next_chunk, role, names[k: k + cfg.chunk], cfg.reference, sc,
                                   {**settings, "seed": cfg.seed}, bert_if_possible))
            next_chunk += 1
    total = sum(len(j.archs) for j in jobs)
    print(f"latency: {len(archs)} archs + {len(noise)} re-measured of space {space.name!r}; "
          f"{len(rows)} rows already in {out / DATA_FILE}, {total} to measure in {len(jobs)} chunks",
          file=sys.stderr, flush=True)
    start, measured = time.perf_counter(), 0
    for i, (job, new) in enumerate((runner or local_runner)(jobs), 1):
        rows += new
        write_parquet(to_table(rows, LATENCY_SCHEMA), out / DATA_FILE)
        measured += len(job.archs)
        rate = (time.perf_counter() - start) / measured
        print(f"latency: {measured}/{total} archs measured ({i}/{len(jobs)} chunks), "
              f"ETA {clock(rate * (total - measured))}", file=sys.stderr, flush=True)

    target, reference_ms, n_ref = fit_targets(rows, cfg)
    first = {r["arch"]: target(r) for r in rows if r["role"] == "sample"}
    again = {r["arch"]: target(r) for r in rows if r["role"] == "remeasure" and r["arch"] in first}
    noise_mape = mape(list(again.values()), [first[a] for a in again]) if again else None
    raw = {r["arch"]: r["latency_ms"] for r in rows if r["role"] == "sample"}
    raw_again = {r["arch"]: r["latency_ms"] for r in rows if r["role"] == "remeasure" and r["arch"] in raw}
    noise_raw = mape(list(raw_again.values()), [raw[a] for a in raw_again]) if raw_again else None
    fitted = {**settings, "statistic": cfg.statistic, "normalized": cfg.normalize and reference_ms is not None}
    predictor = LatencyPredictor.fit(space, archs, [first[a] for a in archs], fitted,
                                     holdout_fraction=cfg.holdout_fraction, seed=cfg.seed, reference=cfg.reference,
                                     reference_ms=reference_ms, noise_mape=noise_mape)
    predictor.save(out / PREDICTOR_DIR)
    report = {
        "space": space.name, "settings": fitted, "n_archs": len(archs), "reference": cfg.reference,
        "reference_ms": reference_ms, "reference_measurements": n_ref,
        "noise": {"archs": len(again), "mape": noise_mape, "mape_raw_median": noise_raw},
        "kind": predictor.kind, "metrics": predictor.metrics,
        "candidates": predictor.candidates, "holdout": predictor.holdout_rows,
        "measure_seconds": round(time.perf_counter() - start, 1), "archs_measured_now": measured,
        "files": {"dataset": str(out / DATA_FILE), "predictor": str(out / PREDICTOR_DIR)},
    }
    with atomic_file(out / REPORT_FILE) as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    return predictor
