"""Ray Train driver for supernet training (``raynas supernet``) and further training (``raynas train``).

The checks that read files before Ray starts, and the ``TorchTrainer`` setup.
The config dataclasses and their static checks are :mod:`raynas.training.config`
(re-exported here); the worker loop is :mod:`raynas.orchestration.train_worker`;
losses, samplers, corpus and masking are pure torch / Python
(:mod:`raynas.training`, :mod:`raynas.data`). The corpus is tokenized once here
and memory-mapped by every worker, so N workers do not tokenize N times.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from raynas.errors import ConfigError
from raynas.spaces import Space
from raynas.training.config import CHECKPOINT_DIR, DeepSpeedConfig, ObjectiveConfig, SamplerConfig, TrainConfig

PRINT_PATCH_ENV = "RAY_TRAIN_ENABLE_PRINT_PATCH"  # Ray Train's switch for its print -> logger patch on workers
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's list of reported checkpoints, in its run folder

__all__ = ["DeepSpeedConfig", "ObjectiveConfig", "SamplerConfig", "TrainConfig", "load_tokenizer", "preflight",
           "run_training"]


def first_metric(metrics: dict[str, Any], prefix: str) -> float | None:
    """The first (by name) numeric metric of a :func:`run_training` result whose key starts with ``prefix``
    (``val_loss`` -> the validation loss of the run's first arch)."""
    keys = sorted(k for k in metrics if k.startswith(prefix) and isinstance(metrics[k], (int, float)))
    return float(metrics[keys[0]]) if keys else None


# ---------------------------------------------------------------- checks before Ray starts


def load_tokenizer(cfg: TrainConfig) -> Any:
    """The run's tokenizer: ``tokenizer`` or the model's folder, else the saved supernet's ``tokenizer/``."""
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


def _head_counts(space: Space) -> set[int]:
    """MHA head counts of the space's largest and smallest archs (what attention-map KD must match)."""
    return {op.heads for arch in (space.largest(), space.smallest()) for op in space.plan(arch)[1]
            if hasattr(op, "heads")}


def _refuse_old_layout(out: Path, name: str) -> None:
    """A run made before checkpoints were kept once has Ray's snapshot in ``OUT/ray_results/<name>``, none in
    ``OUT/checkpoints``: this version would not see its checkpoints and would silently start again from
    step 0 over its step folders, so say so instead."""
    old = out / "ray_results" / name / RAY_SNAPSHOT
    if old.is_file() and not (out / CHECKPOINT_DIR / RAY_SNAPSHOT).is_file():
        raise ConfigError(f"out: {out} holds a run from an older raynas (Ray's copies of its checkpoints in "
                          f"{out / 'ray_results'}) that this version cannot resume (use a new out, or remove "
                          f"{out / CHECKPOINT_DIR} and {out / 'ray_results'} to start over)")


def preflight(cfg: TrainConfig) -> dict[str, Any]:
    """The checks that read files (the TrainConfig itself checked the rest): the student, the teacher, head
    counts. Returns the config as a dict for the workers, paths made absolute."""
    from transformers import AutoConfig

    from raynas.atomic_io import check_writable
    from raynas.run_lock import check_run_lock
    from raynas.teachers import resolve_teacher

    check_writable(cfg.out, "out")  # before the corpus is tokenized or Ray starts
    check_run_lock(cfg.out)  # another live run writes there: refused now (a dry run too), not after the tokenizer
    _refuse_old_layout(Path(cfg.out), cfg.name)
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


def run_config(out: Path, max_failures: int) -> Any:
    """Ray Train's run folder *is* ``OUT/checkpoints`` (``storage_path`` OUT, run name ``checkpoints``).

    The workers write each ``step-N`` folder there themselves and report it with
    ``CheckpointUploadMode.NO_UPLOAD`` (:mod:`raynas.orchestration.train_worker`), so every checkpoint
    exists once: before, Ray copied each folder into ``OUT/ray_results`` (supernet-tiny: 682 MB, now 352). Ray's
    own snapshot of the reported checkpoints sits beside them, which is how a rerun with the same OUT
    (a killed driver) and a restarted worker group (``max_failures``) find the latest one; Ray keeps every
    checkpoint (no ``num_to_keep``), as before.

    ``RAY_TRAIN_ENABLE_PRINT_PATCH=0`` on the workers: Ray 2.60 routes a worker's ``print`` to the root
    logger, whose console handler writes it to stderr, and also echoes it to ``sys.stderr`` whenever that
    is not ``sys.__stderr__`` -- which in a Ray worker it never is (Ray replaces it with its log stream), so
    every line printed in a worker (rank 0's progress, a library's note) reached the driver twice. Without
    the patch a print goes to the worker's stderr once and ``log_to_driver`` forwards it. A value the user
    exported is kept (Ray passes it on to the workers itself).
    """
    from ray.train import FailureConfig, RunConfig

    patch = os.environ.get(PRINT_PATCH_ENV, "0")
    return RunConfig(name=CHECKPOINT_DIR, storage_path=str(out), failure_config=FailureConfig(max_failures=max_failures),
                     worker_runtime_env={"env_vars": {PRINT_PATCH_ENV: patch}})


def run_training(cfg: TrainConfig) -> dict[str, Any]:
    """Check, build the corpus once, run the TorchTrainer; return the last reported metrics.

    The run holds ``OUT/.raynas.lock`` from its first write to its return (:mod:`raynas.run_lock`): a second
    driver on the same OUT would otherwise resume from and overwrite the first's checkpoints.
    """
    from raynas.orchestration.cluster import check_cluster
    from raynas.run_lock import run_lock

    raw = preflight(cfg)
    check_cluster()  # a dead cluster address: one line now, not after tokenizing
    with run_lock(raw["out"]):
        return _train(cfg, raw)


def _train(cfg: TrainConfig, raw: dict[str, Any]) -> dict[str, Any]:
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from raynas.data.corpus import build_corpus, corpus_stats
    from raynas.orchestration.cluster import connect
    from raynas.orchestration.train_worker import train_loop

    out = Path(raw["out"])
    tokenizer = load_tokenizer(cfg)
    corpus = build_corpus(cfg.corpus, tokenizer, cache_dir=out / "corpus")
    print(f"corpus: {corpus_stats(corpus)}", file=sys.stderr)
    tok_dir = out / "tokenizer"
    tokenizer.save_pretrained(tok_dir)
    loop_cfg = {"cfg": raw, "corpus_dir": corpus.cache_files["train"][0]["filename"].rsplit("/train/", 1)[0],
                "tokenizer_dir": str(tok_dir), "out": str(out)}
    connect(log_to_driver=True)
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if cfg.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop, train_loop_config=loop_cfg,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=resources),
        run_config=run_config(out, cfg.max_failures),
    )
    from raynas.orchestration.train_worker import worker_config_error

    try:  # Ray 2.60's fit() raises the WorkerGroupError itself; older ones return it in result.error
        result = trainer.fit()
    except Exception as exc:  # noqa: BLE001  (re-raised unless a worker's one-line ConfigError is inside)
        error = worker_config_error(exc)
        if error is exc:
            raise
        raise error from None  # a full disk at a checkpoint: the CLI prints its one line, exit 2
    if result.error is not None:
        raise worker_config_error(result.error)
    return dict(result.metrics or {})
