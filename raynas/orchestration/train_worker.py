"""The Ray Train worker loop: one data-parallel replica of the student (a supernet or a plain model).

A thin adapter: what a worker builds (student, teacher, sampler) and its
validation loss are Ray-free (:mod:`raynas.training.factories`,
:mod:`raynas.training.student`); here are the loop, the device, the engine and
the checkpoint report.

Each step a worker draws its sub-models (AutoTinyBERT batch-wise: M of its own
per batch), runs them on its shard of the global batch, accumulates their
gradients, and the engine (DeepSpeed ZeRO or DDP) averages across workers and
takes one optimizer step. Checkpoints hold the student, the optimizer, the
step and every rank's sampler and masking RNG state, so a restart draws exactly
the archs and masks an uninterrupted run would have.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch

from raynas.errors import require
from raynas.orchestration.engines import Engine
from raynas.training.checkpoints import (
    check_space,
    choose_resume,
    clean_staging,
    save_torch,
    step_dir,
    write_step,
)
from raynas.training.config import CHECKPOINT_DIR, TrainConfig, config_from_dict
from raynas.training.factories import build_step_sampler, build_student, build_teacher, save_final, train_placement
from raynas.training.sampling import ArchSampler
from raynas.training.student import TrainStudent, evaluate

if TYPE_CHECKING:
    from raynas.data.masking import MLMCollator

STATE_FILE, STUDENT_FILE, ARCH_LOG_DIR = "trainer_state.json", "student.pt", "archs"
REQUIRED = (STATE_FILE, STUDENT_FILE)  # what every checkpoint's manifest must list


def _arch_str(arch: Any) -> str:
    return "model" if arch is None else str(arch)


def _open_arch_log(out: Path, rank: int, start: int) -> IO[str]:
    """``out/archs/rank-R.jsonl``: one line per trained sub-model; a resumed run drops lines past its start."""
    path = out / ARCH_LOG_DIR / f"rank-{rank}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = [ln for ln in path.read_text().splitlines() if json.loads(ln)["step"] <= start] if path.exists() else []
    path.write_text("".join(ln + "\n" for ln in kept))
    return path.open("a")


def _quiet_report_log() -> None:
    """Under ``ray job submit`` Ray Train logs every report at INFO (a line per step); the progress lines suffice."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray Train layout: keep its logging
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_loop(config: dict[str, Any]) -> None:
    """The Ray Train worker function."""
    import datasets
    import ray.train
    import ray.train.torch
    from transformers import AutoTokenizer

    from raynas.data.corpus import shard_for_worker
    from raynas.data.masking import MLMCollator
    from raynas.data.validation_set import mlm_validation_batches
    from raynas.training.objectives import TeacherOutput
    from raynas.training.sampling import size_class

    _quiet_report_log()
    cfg = config_from_dict(config["cfg"])
    out = Path(config["out"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    placement = train_placement(cfg, ray.train.torch.get_device())  # this worker's GPU, or the CPU
    device = placement.device
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    corpus = datasets.load_from_disk(config["corpus_dir"])
    train, val = shard_for_worker(corpus["train"], rank, world), corpus["validation"]
    require(len(train) > 0, f"worker {rank}: empty training shard")
    tokenizer = AutoTokenizer.from_pretrained(config["tokenizer_dir"])
    micro = cfg.batch_size // world

    ds = cfg.deepspeed
    per_rank = not (ds.enabled and ds.zero_stage == 3)
    student, space = build_student(cfg, build_teacher(cfg, device), device)
    sampler = build_step_sampler(cfg, space, rank, world, per_rank)
    inplace = sampler.inplace_distillation and cfg.objective.mode == "mlm"
    collator = MLMCollator(tokenizer, cfg.objective.mlm_probability, seed=cfg.seed * 1000 + rank)
    val_batches = mlm_validation_batches(val, tokenizer, micro, cfg.eval_batches, cfg.objective.mlm_probability)
    eval_archs = {"largest": space.largest(), "smallest": space.smallest()} if space is not None else {"model": None}

    start, d = 0, _resume_folder(ray.train.get_checkpoint(), out / CHECKPOINT_DIR, rank)
    if d is not None:  # the student's weights go in before the engine (ZeRO-3 partitions them)
        state = json.loads((d / STATE_FILE).read_text())
        student.load_state_dict(torch.load(d / STUDENT_FILE, map_location=device, weights_only=True))
        sampler.load_state_dict(state["sampler"][str(rank)])
        collator.load_state_dict({"generator": torch.tensor(state["collator"][str(rank)], dtype=torch.uint8)})
        start = state["step"]
    engine = Engine.from_config(cfg, student, sampler.archs_per_step, micro, world, placement)
    if d is not None:
        engine.load(d)
        if rank == 0:
            print(f"resumed from step {start}", file=sys.stderr)
    student = engine.module
    student.train()
    if d is not None and str(rank) in state.get("rng", {}):
        _set_rng_state(state["rng"][str(rank)])  # last, after everything that draws at set-up
    arch_log = _open_arch_log(out, rank, start)

    metrics: dict[str, Any] = {}
    if start == 0:  # every rank: under ZeRO-3 a forward is a collective
        metrics.update(evaluate(student, eval_archs, val_batches, placement))
        if rank == 0:
            print(f"step 0 {json.dumps(metrics)}", file=sys.stderr)
    initial = dict(metrics)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed + rank)).tolist()
    tokens = window_tokens = 0
    t0 = window_t0 = time.perf_counter()
    window: dict[str, list[float]] = {}  # losses per size class since the last report
    for step in range(start, cfg.steps):
        i = step * micro % max(1, len(order) - micro + 1)
        rows = train[order[i: i + micro]]["input_ids"] if len(order) >= micro else train[:]["input_ids"]
        host = collator(rows)
        n = int(host["attention_mask"].sum()) * world  # counted on the host: no device sync per step
        batch = placement.batch(host)
        target, n_archs = None, 0
        for k, arch in enumerate(sampler.sample(step)):
            loss, terms, output = engine.forward(batch, arch, target)
            engine.accumulate(loss)
            if inplace and k == 0:  # sandwich: the largest (drawn first) teaches the rest of this batch
                target = TeacherOutput.detached(output)
            cls = size_class(space, arch) if space is not None else "model"
            window.setdefault(cls, []).append(terms["loss"])
            arch_log.write(json.dumps({"step": step + 1, "arch": _arch_str(arch), "size": cls, **terms}) + "\n")
            n_archs += 1
        engine.step()
        n *= n_archs
        done, now = step + 1, time.perf_counter()
        if done == start + 1:  # the first step (allocation, DeepSpeed buckets) is not the steady rate
            t0 = window_t0 = now
        else:
            tokens, window_tokens = tokens + n, window_tokens + n
        evaluating = done % cfg.eval_every == 0 or done == cfg.steps
        checkpointing = done % cfg.checkpoint_every == 0 or done == cfg.steps
        if not (evaluating or checkpointing or done % cfg.log_every == 0 or done == start + 1):
            continue  # Ray Train's report queue holds one result and its controller polls every 2 s: not per step
        arch_log.flush()
        all_losses = sum(window.values(), [])
        metrics = {"step": done, "loss": sum(all_losses) / len(all_losses),
                   **{f"loss_{k}": sum(v) / len(v) for k, v in sorted(window.items())},
                   "tokens_per_s": tokens / max(1e-9, now - t0),
                   "tokens_per_s_window": window_tokens / max(1e-9, now - window_t0),
                   "start_step": start, "lr": engine.lr(), **{f"initial_{k}": v for k, v in initial.items()}}
        window, window_tokens, window_t0 = {}, 0, now
        if evaluating:
            metrics.update(evaluate(student, eval_archs, val_batches, placement))
        if rank == 0:
            vals = " ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k.startswith("val_loss"))
            sizes = " ".join(f"{k[5:]} {v:.3f}" for k, v in metrics.items() if k.startswith("loss_"))
            print(f"step {done}/{cfg.steps} loss {metrics['loss']:.4f} ({sizes}) "
                  f"tok/s {metrics['tokens_per_s_window']:.0f} lr {metrics['lr']:.2e} {vals}".rstrip(), file=sys.stderr)
        if checkpointing:
            _report_with_checkpoint(cfg, engine, sampler, collator, student, tokenizer, metrics, done, rank)
        else:
            ray.train.report(metrics)
    arch_log.close()
    with engine.full_weights():
        if rank == 0:
            save_final(student.net, out, tokenizer, cfg, step=cfg.steps)  # the card says how it was trained


def _rng_state() -> dict[str, list[int]]:
    """torch's global generators (dropout draws from them), CPU and this worker's GPU."""
    state = {"cpu": torch.get_rng_state().tolist()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def _set_rng_state(state: dict[str, list[int]]) -> None:
    """Inverse of :func:`_rng_state`: a resumed run draws the dropout masks the uninterrupted run drew."""
    torch.set_rng_state(torch.tensor(state["cpu"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def _gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (one process: ``[obj]``)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def _resume_folder(latest: Any, ckpts: Path, rank: int) -> Path | None:
    """The checkpoint folder this worker resumes from: Ray Train's latest (a restarted worker group, or a
    rerun driver through Ray's snapshot in ``OUT/checkpoints``) when it is complete, else the newest earlier
    complete one, with one warning line (rank 0). Every rank decides alike from the same files.

    Rank 0 first clears what a crash mid-checkpoint left (``.step-N.tmp``); then, resuming, the disk must
    have room for one more checkpoint (a run stopped by a full disk and retried stops again at once).
    """
    import torch.distributed as dist

    if rank == 0:
        clean_staging(ckpts)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    folder, warning = choose_resume(Path(latest.path) if latest is not None else None, REQUIRED)
    if warning and rank == 0:
        print(warning, file=sys.stderr)
    if folder is not None:
        check_space(ckpts, folder)
    return folder


def worker_config_error(error: BaseException | None) -> BaseException | None:
    """For the driver: the :class:`~raynas.errors.ConfigError` a worker raised (a full disk at a checkpoint),
    out of Ray Train's ``WorkerGroupError``, so the CLI prints its one line; else ``error`` itself."""
    from raynas.errors import ConfigError

    failures = getattr(error, "worker_failures", None) or {}
    found = [e for _, e in sorted(failures.items()) if isinstance(e, ConfigError)]
    return found[0] if found else error


def _report_with_checkpoint(cfg: TrainConfig, engine: Engine, sampler: ArchSampler, collator: MLMCollator,
                            student: TrainStudent, tokenizer: Any, metrics: dict[str, Any], step: int,
                            rank: int) -> None:
    """Every rank writes its part of the state into one folder; rank 0 reports it as the Ray checkpoint.

    The folder is built as ``.step-N.tmp`` and renamed to ``step-N`` with its manifest only when every rank's
    part is written (:func:`raynas.training.checkpoints.write_step`), so Ray is only ever told of complete
    checkpoints; a full disk raises :class:`~raynas.training.checkpoints.CheckpointWriteError` on every rank
    before the report, the previous checkpoint untouched.

    The folder is inside Ray Train's run folder (``OUT/checkpoints``, see
    :func:`raynas.orchestration.supernet_training.run_config`) and is reported with ``NO_UPLOAD``: Ray
    records where it is instead of copying it, so the checkpoint exists once on disk.
    """
    import ray.train

    folder = step_dir(Path(cfg.out).resolve() / CHECKPOINT_DIR, step)

    def shard(tmp: Path) -> dict[str, Any]:
        engine.save(tmp, rank)
        # sampler / masking RNG states differ per rank: gathered so one folder resumes every worker
        return {"sampler": sampler.state_dict(), "collator": collator.state_dict()["generator"].tolist(),
                "rng": _rng_state()}

    def main(tmp: Path, gathered: list[Any]) -> None:
        with engine.full_weights():  # ZeRO-3: gather the partitioned weights on every rank for rank 0 to write
            if rank == 0:
                save_torch(student.state_dict(), tmp / STUDENT_FILE)
                save_final(student.net, tmp, tokenizer, cfg, step=step)  # a usable supernet / model per checkpoint
        if rank == 0:
            state = {"step": step, "sampler": {str(r): g["sampler"] for r, g in enumerate(gathered)},
                     "collator": {str(r): g["collator"] for r, g in enumerate(gathered)},
                     "rng": {str(r): g["rng"] for r, g in enumerate(gathered)}, "config": asdict(cfg)}
            (tmp / STATE_FILE).write_text(json.dumps(state))

    write_step(folder, rank, _gather, shard, main)  # complete step-N, or CheckpointWriteError on every rank
    checkpoint = ray.train.Checkpoint.from_directory(str(folder)) if rank == 0 else None
    ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=folder.name,
                     checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD)
