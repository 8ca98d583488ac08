"""What a training worker builds from a :class:`~raynas.training.config.TrainConfig`: student, teacher, sampler.

Ray-free, so the driver (``raynas bench train`` exports the same supernet a run
trains), the worker adapter (:mod:`raynas.orchestration.train_worker`) and tests
share one construction. ``device`` puts the student and the teacher where the
worker computes (``ray.train.torch.get_device()`` there); batches follow via
:func:`raynas.training.student.to_device`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from raynas.spaces import Space
from raynas.training.config import TrainConfig
from raynas.training.objectives import SupernetObjective, TeacherCache
from raynas.training.optim import Placement
from raynas.training.sampling import SAMPLERS, ArchSampler
from raynas.training.student import TrainStudent

SUPERNET_DIR, MODEL_DIR = "supernet", "model"
Device = torch.device | str


def build_net(cfg: TrainConfig) -> tuple[nn.Module, Space | None]:
    """``(net, space or None)``: a supernet from a space / a saved supernet, or a plain model; seeded alike everywhere."""
    torch.manual_seed(cfg.seed)  # same initial weights (and projection) on every worker
    if cfg.model:
        return load_plain_student(cfg.model, eager=cfg.objective.attention_weight > 0), None
    if cfg.init_from:
        from raynas.supernet.checkpoint import load_supernet

        net = load_supernet(cfg.init_from).train()
        return net, net.space
    from raynas.spaces import load_space
    from raynas.supernet import Supernet

    assert cfg.space is not None  # TrainConfig's checks: exactly one student
    space = load_space(cfg.space, cfg.space_overrides or None)
    return Supernet.from_space(space, hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout), space


def build_student(cfg: TrainConfig, teacher: TeacherCache | None = None,
                  device: Device = "cpu") -> tuple[TrainStudent, Space | None]:
    """``(TrainStudent on device, space or None)`` for ``cfg``: the net of :func:`build_net` and its objective."""
    net, space = build_net(cfg)
    width = net.config.hidden_size if space is None else space.max_hidden
    o = cfg.objective
    inplace = cfg.sampler.name == "sandwich" and o.mode == "mlm" and space is not None
    objective = SupernetObjective(
        o.mode, student_width=width, teacher_width=None if teacher is None else teacher.teacher.config.hidden_size,
        hidden_weight=o.hidden_weight, attention_weight=o.attention_weight,
        logits_weight=o.inplace_weight if inplace else o.logits_weight, mlm_weight=o.mlm_weight,
        temperature=o.temperature, teacher=teacher, project=o.project)
    freeze_unreached(net, objective.needs_logits)
    return TrainStudent(net, objective).to(device), space


def freeze_unreached(net: nn.Module, logits: bool) -> list[str]:
    """Freeze the weights no loss reaches; returns their names.

    The pooler is read by no pre-training loss, and the MLM head's own weights
    (transform + bias; the decoder is tied to the word embeddings, which stay
    trainable) by none when ``logits`` is false. Left trainable they cost twice:
    DDP stalls (the pooler's output is part of the student's output, so DDP
    waits for a gradient that never comes), and under ZeRO every trainable
    weight gets a zero gradient each step, so AdamW's decay and momentum would
    move weights that nothing trained.
    """
    if hasattr(net, "set_active"):  # a Supernet
        heads = {"pooler": net.pooler, **({} if logits else {"cls": net.cls})}
        frozen = [f"{prefix}.{n}" for prefix, m in heads.items() for n, _ in m.named_parameters()]
        for m in heads.values():
            m.requires_grad_(False)
        return frozen
    base = net.base_model
    reached = {id(p) for n, p in base.named_parameters() if not n.startswith("pooler.")}
    frozen = []
    for name, p in net.named_parameters():
        if id(p) not in reached and (not logits or ".pooler." in f".{name}"):
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


def load_plain_student(path: str, eager: bool = False) -> nn.Module:
    """A masked-LM model that keeps its checkpoint's pooler.

    ``*ForMaskedLM`` classes drop the pooler, so further training would hand back
    a model whose ``AutoModel`` pooler is freshly random. No pre-training loss
    touches the pooler: it is kept as loaded, and :func:`freeze_unreached` freezes
    it (no weight decay either) with the other weights no loss reaches.
    """
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForMaskedLM
    from transformers.utils import logging as hf_logging

    kw: dict[str, Any] = {"attn_implementation": "eager"} if eager else {}
    if AutoConfig.from_pretrained(path).model_type == "raynas":
        kw["add_pooling_layer"] = True
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
    return net  # the pooler trains under no loss: build_student freezes it (freeze_unreached)


def student_dtype(cfg: TrainConfig) -> torch.dtype:
    """The dtype the engine keeps the student's weights in: DeepSpeed casts them to bf16 / fp16; DDP autocasts
    and keeps fp32. The teacher is loaded in it, so its targets match the student's outputs."""
    precision = cfg.precision
    if cfg.deepspeed.enabled and precision in ("bf16", "fp16"):
        return torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.float32


def train_placement(cfg: TrainConfig, device: torch.device) -> Placement:
    """Where the worker computes, and the autocast of its forwards: DDP in bf16 autocasts over fp32 weights;
    DeepSpeed casts the weights itself (no autocast)."""
    autocast = cfg.precision == "bf16" and not cfg.deepspeed.enabled
    return Placement(device, torch.bfloat16 if autocast else None)


def build_teacher(cfg: TrainConfig, device: Device = "cpu") -> TeacherCache | None:
    """The frozen teacher behind a TeacherCache (kd mode) on ``device`` in the student's dtype, or None."""
    if cfg.objective.mode != "kd":
        return None
    from raynas.teachers import load_teacher

    assert cfg.objective.teacher is not None  # TrainConfig's checks: kd names a teacher
    model, _ = load_teacher(cfg.objective.teacher)
    attentions = cfg.objective.attention_weight > 0
    if attentions:
        model.set_attn_implementation("eager")  # SDPA cannot return attention probabilities
    return TeacherCache(model, output_attentions=attentions, device=device, dtype=student_dtype(cfg),
                        logits=cfg.objective.logits_weight > 0)


def build_step_sampler(cfg: TrainConfig, space: Space | None, rank: int, world: int, per_rank: bool) -> ArchSampler:
    """The registered sampler ``sampler.name`` (``fixed`` for a plain model); ``per_rank`` false: every rank
    draws the same archs (ZeRO-3), so it is built as rank 0 of 1."""
    cls = SAMPLERS[cfg.sampler.name if space is not None else "fixed"]
    return cls.from_config(space, cfg.seed, cfg.sampler, rank if per_rank else 0, world if per_rank else 1)


def save_final(net: nn.Module, out: Path, tokenizer: Any, cfg: TrainConfig | None = None,
               step: int | None = None) -> Path:
    """``out/supernet`` for a supernet, ``out/model`` (AutoModel-ready, bert when expressible) for a plain model.

    Either records its provenance: what the net was built with (the supernet's or
    model folder's) plus this run -- ``step`` (default ``cfg.steps``), objective,
    teacher and whether a loss reached the MLM head (read from which weights
    :func:`freeze_unreached` left trainable) -- so a supernet seeded from a headless
    teacher stops saying "MLM head untrained" once an MLM loss has trained it, and a
    plain model's card (README.md) says how it was trained.
    """
    from raynas.model_card import head_trained, provenance_of, with_step

    supernet = hasattr(net, "set_active")
    run = {"stage": cfg.name if cfg is not None else ("supernet" if supernet else "train"),
           "steps": step if step is not None else (cfg.steps if cfg is not None else None),
           "objective": cfg.objective.mode if cfg is not None else None,
           "teacher": cfg.objective.teacher if cfg is not None and cfg.objective.mode == "kd" else None,
           "mlm_head_trained": head_trained(net)}
    provenance = with_step(provenance_of(net), "training", run)
    if supernet:
        from raynas.supernet.checkpoint import save_supernet

        return save_supernet(net, out / SUPERNET_DIR, tokenizer=tokenizer, provenance=provenance)
    from raynas.atomic_io import atomic_dir
    from raynas.export import export_model
    from raynas.model_card import write_card
    from raynas.models import RaynasForMaskedLM

    if isinstance(net, RaynasForMaskedLM):
        return export_model(net, out / MODEL_DIR, tokenizer, overwrite=True, provenance=provenance).path
    with atomic_dir(out / MODEL_DIR, True) as tmp:
        net.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_card(tmp, out / MODEL_DIR, net, provenance, net.config.model_type)
    return out / MODEL_DIR
