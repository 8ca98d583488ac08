"""The Ray Train worker loop: one data-parallel replica of the student (a supernet or a plain model).

Each step a worker draws its sub-models (AutoTinyBERT batch-wise: M of its own
per batch), runs them on its shard of the global batch, accumulates their
gradients, and the engine (DeepSpeed ZeRO or DDP) averages across workers and
takes one optimizer step. Checkpoints hold the student, the optimizer, the
step and every rank's sampler and masking RNG state, so a restart draws exactly
the archs and masks an uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from raynas.errors import require

STATE_FILE, STUDENT_FILE, SUPERNET_DIR, MODEL_DIR, ARCH_LOG_DIR = (
    "trainer_state.json", "student.pt", "supernet", "model", "archs")


def build_net(cfg: Any) -> tuple[Any, Any]:
    """``(net, space or None)``: a supernet from a space / a saved supernet, or a plain model; seeded alike everywhere."""
    import torch

    torch.manual_seed(cfg.seed)  # same initial weights (and projection) on every worker
    if cfg.model:
        return load_plain_student(cfg.model, eager=cfg.objective.attention_weight > 0), None
    if cfg.init_from:
        from raynas.supernet.checkpoint import load_supernet

        net = load_supernet(cfg.init_from).train()
        return net, net.space
    from raynas.spaces import load_space
    from raynas.supernet import Supernet

    space = load_space(cfg.space, cfg.space_overrides or None)
    return Supernet.from_space(space, hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout), space


def build_student(cfg: Any, teacher: Any = None) -> tuple[Any, Any]:
    """``(TrainStudent, space or None)`` for ``cfg``: the net of :func:`build_net` and its objective."""
    from raynas.training.objectives import SupernetObjective
    from raynas.training.student import TrainStudent

    net, space = build_net(cfg)
    width = net.config.hidden_size if space is None else space.max_hidden
    o = cfg.objective
    inplace = cfg.sampler.name == "sandwich" and o.mode == "mlm" and space is not None
    objective = SupernetObjective(
        o.mode, student_width=width, teacher_width=None if teacher is None else teacher.teacher.config.hidden_size,
        hidden_weight=o.hidden_weight, attention_weight=o.attention_weight,
        logits_weight=o.inplace_weight if inplace else o.logits_weight, mlm_weight=o.mlm_weight,
        temperature=o.temperature, teacher=teacher, project=o.project)
    return TrainStudent(net, objective), space


def load_plain_student(path: str, eager: bool = False) -> Any:
    """A masked-LM model that keeps its checkpoint's pooler, frozen.

    ``*ForMaskedLM`` classes drop the pooler, so further training would hand back
    a model whose ``AutoModel`` pooler is freshly random. No pre-training loss
    touches the pooler: it is kept as loaded and frozen (no weight decay either).
    """
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForMaskedLM

    kw: dict[str, Any] = {"attn_implementation": "eager"} if eager else {}
    if AutoConfig.from_pretrained(path).model_type == "raynas":
        kw["add_pooling_layer"] = True
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report lists the pooler as unexpected: handled below
    try:
        net = AutoModelForMaskedLM.from_pretrained(path, **kw).train()
    finally:
        hf_logging.set_verbosity(verbosity)
    base = net.base_model
    if getattr(base, "pooler", False) is None and net.config.model_type == "bert":
        from transformers.models.bert.modeling_bert import BertPooler

        base.pooler = BertPooler(net.config)
        weights = Path(path) / "model.safetensors"
        if weights.exists():
            with safe_open(str(weights), "pt") as f:
                state = {k.rsplit("pooler.", 1)[1]: f.get_tensor(k) for k in f.keys() if "pooler." in k}
            if state:
                base.pooler.load_state_dict(state)
    if getattr(base, "pooler", None) is not None:
        base.pooler.requires_grad_(False)
    return net


def build_teacher(cfg: Any) -> Any:
    """The frozen teacher behind a TeacherCache (kd mode), or None."""
    if cfg.objective.mode != "kd":
        return None
    from raynas.teachers import load_teacher
    from raynas.training.objectives import TeacherCache

    model, _ = load_teacher(cfg.objective.teacher)
    if cfg.objective.attention_weight > 0:
        model.set_attn_implementation("eager")  # SDPA cannot return attention probabilities
    return TeacherCache(model, output_attentions=cfg.objective.attention_weight > 0)


def build_step_sampler(cfg: Any, space: Any, rank: int, world: int, per_rank: bool) -> Any:
    from raynas.training.sampling import build_sampler

    name = cfg.sampler.name if space is not None else "fixed"
    if name == "batchwise":
        kw = {"per_worker": cfg.sampler.per_worker, "rank": rank if per_rank else 0,
              "world_size": world if per_rank else 1}
    elif name == "uniform":
        kw = {"per_batch": cfg.sampler.per_worker}
    elif name == "sandwich":
        kw = {"n_random": cfg.sampler.n_random}
    else:
        kw = {}
    return build_sampler(name, space, cfg.seed, **kw)


def evaluate(student: Any, archs: dict[str, Any], batches: list[dict[str, Any]]) -> dict[str, float]:
    """Validation objective (MLM, or the KD loss) per named arch, dropout off, on fixed masked batches."""
    import torch

    was_training = student.training
    active = getattr(student.net, "active_arch", None)
    student.eval()
    out = {}
    losses: dict[str, list[float]] = {name: [] for name in archs}
    with torch.no_grad():
        for b in batches:  # batch-major: a KD teacher runs once per batch, shared by every arch
            for name, arch in archs.items():
                losses[name].append(student(b, arch)[1]["loss"])
    for name, values in losses.items():
        out[f"val_loss_{name}"] = sum(values) / max(1, len(values))
    if active is not None:
        student.net.set_active(active)
    student.train(was_training)
    return out


def _arch_str(arch: Any) -> str:
    return "model" if arch is None else str(arch)


def _open_arch_log(out: Path, rank: int, start: int) -> Any:
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
    import torch
    from transformers import AutoTokenizer

    from raynas.data.corpus import shard_for_worker
    from raynas.data.masking import MLMCollator
    from raynas.orchestration.supernet_training import config_from_dict
    from raynas.training.objectives import TeacherOutput
    from raynas.training.sampling import size_class

    _quiet_report_log()
    cfg = config_from_dict(config["cfg"])
    out = Path(config["out"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    corpus = datasets.load_from_disk(config["corpus_dir"])
    train, val = shard_for_worker(corpus["train"], rank, world), corpus["validation"]
    require(len(train) > 0, f"worker {rank}: empty training shard")
    tokenizer = AutoTokenizer.from_pretrained(config["tokenizer_dir"])
    micro = cfg.batch_size // world

    ds = cfg.deepspeed
    per_rank = not (ds.enabled and ds.zero_stage == 3)
    student, space = build_student(cfg, build_teacher(cfg))
    sampler = build_step_sampler(cfg, space, rank, world, per_rank)
    inplace = sampler.inplace_distillation and cfg.objective.mode == "mlm"
    collator = MLMCollator(tokenizer, cfg.objective.mlm_probability, seed=cfg.seed * 1000 + rank)
    val_collator = MLMCollator(tokenizer, cfg.objective.mlm_probability, seed=12345)
    val_batches = [val_collator(val[i: i + micro]["input_ids"])
                   for i in range(0, min(len(val), micro * cfg.eval_batches), micro)]
    eval_archs = {"largest": space.largest(), "smallest": space.smallest()} if space is not None else {"model": None}

    start, ckpt = 0, ray.train.get_checkpoint()
    with ckpt.as_directory() if ckpt is not None else contextlib.nullcontext() as d:
        if d is not None:  # the student's weights go in before the engine (ZeRO-3 partitions them)
            state = json.loads((Path(d) / STATE_FILE).read_text())
            student.load_state_dict(torch.load(Path(d) / STUDENT_FILE, weights_only=True))
            sampler.load_state_dict(state["sampler"][str(rank)])
            collator.load_state_dict({"generator": torch.tensor(state["collator"][str(rank)], dtype=torch.uint8)})
            start = state["step"]
        engine = _engine(cfg, student, sampler.archs_per_step, micro, world)
        if d is not None:
            engine.load(Path(d))
            if rank == 0:
                print(f"resumed from step {start}", file=sys.stderr)
    student = engine.module
    student.train()
    arch_log = _open_arch_log(out, rank, start)

    metrics: dict[str, Any] = {}
    if start == 0:  # every rank: under ZeRO-3 a forward is a collective
        metrics.update(evaluate(student, eval_archs, val_batches))
        if rank == 0:
            print(f"step 0 {json.dumps(metrics)}", file=sys.stderr)
    initial = dict(metrics)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed + rank)).tolist()
    tokens = window_tokens = 0
    t0 = window_t0 = time.perf_counter()
    window: dict[str, list[float]] = {}  # losses per size class since the last report
    for step in range(start, cfg.steps):
        i = step * micro % max(1, len(order) - micro + 1)
        batch = collator(train[order[i: i + micro]]["input_ids"] if len(order) >= micro else train[:]["input_ids"])
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
        n = int(batch["attention_mask"].sum()) * n_archs * world
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
            metrics.update(evaluate(student, eval_archs, val_batches))
        if rank == 0:
            vals = " ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k.startswith("val_loss"))
            sizes = " ".join(f"{k[5:]} {v:.3f}" for k, v in metrics.items() if k.startswith("loss_"))
            print(f"step {done}/{cfg.steps} loss {metrics['loss']:.4f} ({sizes}) "
                  f"tok/s {metrics['tokens_per_s_window']:.0f} lr {metrics['lr']:.2e} {vals}".rstrip(), file=sys.stderr)
        if checkpointing:
            _report_with_checkpoint(cfg, engine, sampler, collator, student, tokenizer, metrics, done, rank, world)
        else:
            ray.train.report(metrics)
    arch_log.close()
    with engine.full_weights():
        if rank == 0:
            save_final(student.net, out, tokenizer)


def _engine(cfg: Any, student: Any, archs_per_step: int, micro: int, world: int) -> Any:
    from raynas.orchestration.engines import Engine, resolve_precision

    ds = cfg.deepspeed
    return Engine(student, deepspeed=ds.enabled, zero_stage=ds.zero_stage,
                  precision=resolve_precision(ds.precision, cfg.use_gpu), ds_extra=ds.config, lr=cfg.lr,
                  weight_decay=cfg.weight_decay, steps=cfg.steps, warmup_ratio=cfg.warmup_ratio,
                  archs_per_step=archs_per_step, micro=micro, world=world)


def save_final(net: Any, out: Path, tokenizer: Any) -> Path:
    """``out/supernet`` for a supernet, ``out/model`` (AutoModel-ready, bert when expressible) for a plain model."""
    if hasattr(net, "set_active"):
        from raynas.supernet.checkpoint import save_supernet

        return save_supernet(net, out / SUPERNET_DIR, tokenizer=tokenizer)
    from raynas.atomic_io import atomic_dir
    from raynas.export import export_model
    from raynas.models import RaynasForMaskedLM

    if isinstance(net, RaynasForMaskedLM):
        return export_model(net, out / MODEL_DIR, tokenizer, overwrite=True).path
    with atomic_dir(out / MODEL_DIR, True) as tmp:
        net.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out / MODEL_DIR


def _report_with_checkpoint(cfg: Any, engine: Any, sampler: Any, collator: Any, student: Any, tokenizer: Any,
                            metrics: dict[str, Any], step: int, rank: int, world: int) -> None:
    """Every rank writes its part of the state into one folder; rank 0 reports it as the Ray checkpoint."""
    import ray.train
    import torch
    import torch.distributed as dist

    folder = Path(cfg.out).resolve() / "checkpoints" / f"step-{step:08d}"
    folder.mkdir(parents=True, exist_ok=True)
    engine.save(folder, rank)
    # sampler / masking RNG states differ per rank: gather them so one folder resumes every worker
    local = {"sampler": sampler.state_dict(), "collator": collator.state_dict()["generator"].tolist()}
    gathered: list[Any] = [None] * world
    if dist.is_available() and dist.is_initialized():
        dist.all_gather_object(gathered, local)
    else:
        gathered = [local]
    with engine.full_weights():  # ZeRO-3: gather the partitioned weights on every rank for rank 0 to write
        if rank == 0:
            torch.save(student.state_dict(), folder / STUDENT_FILE)
            save_final(student.net, folder, tokenizer)  # a usable supernet / model in every checkpoint
    if rank == 0:
        state = {"step": step, "sampler": {str(r): g["sampler"] for r, g in enumerate(gathered)},
                 "collator": {str(r): g["collator"] for r, g in enumerate(gathered)}, "config": asdict(cfg)}
        (folder / STATE_FILE).write_text(json.dumps(state))
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    checkpoint = ray.train.Checkpoint.from_directory(str(folder)) if rank == 0 else None
    ray.train.report(metrics, checkpoint=checkpoint)
