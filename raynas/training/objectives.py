"""Losses for training a supernet: masked LM, and distillation from a frozen teacher.

Pure torch (no Ray, no DeepSpeed): the distributed adapters call these per
sub-model. A *batch* is a mapping with ``input_ids`` and optionally
``attention_mask``, ``token_type_ids``, ``position_ids`` and ``labels`` (MLM
labels, -100 where a token is not predicted).

Attention-map distillation (TinyBERT / AutoTinyBERT-KD, last layer only) compares
the student's last MHA layer's attention probabilities with the teacher's last
layer's; it needs equal head counts, which the ``dims`` MHA strategy (all heads
kept, narrower heads) guarantees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from raynas.errors import ConfigError, require
from raynas.training.optim import Placement

Tensor = torch.Tensor
Batch = Mapping[str, Tensor]
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
MODES = ("mlm", "kd")
LOGIT_POSITIONS = ("masked", "all")
MASKED_LOGIT = -1e4  # padding positions of span logits: finite (no NaN in softmax), ~0 probability


def _zero(like: Tensor) -> Tensor:
    """A zero that keeps the graph, so a batch with nothing to score still backprops cleanly."""
    return like.sum() * 0.0


def _token_mean(values: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Mean of ``[B, T]`` per-token values over real tokens (all tokens without a mask)."""
    if attention_mask is None:
        return values.mean()
    keep = attention_mask.to(values.dtype)
    if not bool(keep.any()):
        return _zero(values)
    return (values * keep).sum() / keep.sum()


def mlm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over labelled tokens (label -100 is ignored).

    Returns a graph-connected 0 instead of NaN when no token is labelled, so a
    short batch cannot poison the accumulated gradient.
    """
    if not bool((labels != -100).any()):
        return _zero(logits)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


class HiddenDistillation(nn.Module):
    """MSE between the student's last hidden state and the teacher's, over real tokens only.

    Widths: with ``project`` (the default when ``student_max != teacher``) a
    learned ``nn.Linear(student_max, teacher)`` maps student -> teacher. The
    student's width ``d_s`` changes with every sampled sub-model, and a supernet
    sub-model's hidden features are the *first* ``d_s`` of the largest one, so one
    projection is shared by all of them and a sub-model uses its first ``d_s``
    input columns (``weight[:, :d_s]``): every sub-model trains the same
    projection, which stays consistent with the shared embeddings.

    Without a projection a narrower student is compared with the teacher's first
    ``d_s`` features: the same weight-sharing convention, right when the supernet
    was seeded from the teacher (its largest sub-model *is* the teacher).
    """

    def __init__(self, student_max: int, teacher: int, project: bool | None = None) -> None:
        super().__init__()
        require(student_max > 0 and teacher > 0, f"hidden widths must be positive, got {student_max} and {teacher}")
        self.student_max, self.teacher = student_max, teacher
        if project is None:
            project = student_max != teacher
        require(project or student_max <= teacher,
                f"a student wider than the teacher ({student_max} > {teacher}) needs a projection")
        self.proj: nn.Linear | None = nn.Linear(student_max, teacher) if project else None

    def forward(self, student: Tensor, teacher: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        d_s = student.shape[-1]
        if d_s > self.student_max:
            raise ValueError(f"student width {d_s} exceeds the projection's {self.student_max}")
        if self.proj is not None:
            student = F.linear(student, self.proj.weight[:, :d_s], self.proj.bias)
        else:
            teacher = teacher[..., :d_s]
        return _token_mean((student - teacher.to(student.dtype)).pow(2).mean(-1), attention_mask)


def logits_distillation(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, mask: Tensor | None = None
) -> Tensor:
    """KL(teacher || student) of the softened distributions over the last axis, times T^2, mean over ``mask`` positions.

    The last axis is the vocabulary (MLM), the classes (a classification head) or the
    token positions (:func:`span_distillation`); every other axis is a row.

    KL rather than soft cross-entropy: same gradient, but 0 when the two agree,
    which makes the logged number readable. T^2 keeps the gradient scale
    independent of the temperature (Hinton et al.).
    """
    require(temperature > 0, f"temperature must be positive, got {temperature}")
    v = student_logits.shape[-1]
    s = F.log_softmax(student_logits.reshape(-1, v) / temperature, -1)
    t = F.log_softmax(teacher_logits.reshape(-1, v).to(s.dtype) / temperature, -1)
    if mask is not None:
        keep = mask.reshape(-1).bool()
        if not bool(keep.any()):
            return _zero(student_logits)
        s, t = s[keep], t[keep]
    kl = (t.exp() * (t - s)).sum(-1)
    return kl.mean() * temperature**2


def score_distillation(student_scores: Tensor, teacher_scores: Tensor) -> Tensor:
    """MSE between the student's and the teacher's scores: a regression head (STS-B) has no distribution to soften."""
    return F.mse_loss(student_scores.squeeze(-1), teacher_scores.squeeze(-1).to(student_scores.dtype))


def span_distillation(student_start: Tensor, student_end: Tensor, teacher_start: Tensor, teacher_end: Tensor,
                      attention_mask: Tensor, temperature: float = 1.0) -> Tensor:
    """Extractive QA: the mean of :func:`logits_distillation` over the start and the end distributions.

    Each ``[B, T]`` row is a distribution over token positions; padding positions get
    logit ``MASKED_LOGIT`` in both models first, so neither puts mass on them and a
    batch's padding length does not change the loss.
    """
    pad = attention_mask == 0

    def kl(student: Tensor, teacher: Tensor) -> Tensor:
        return logits_distillation(student.masked_fill(pad, MASKED_LOGIT), teacher.masked_fill(pad, MASKED_LOGIT),
                                   temperature)

    return (kl(student_start, teacher_start) + kl(student_end, teacher_end)) / 2


def attention_distillation(student: Tensor, teacher: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """KL(teacher || student) of each head's attention row, mean over heads and real query tokens.

    ``student`` / ``teacher``: ``[B, H, T, T]`` probabilities (softmax over keys).
    KL of distributions (MiniLM's form) rather than TinyBERT's MSE of scores:
    it is invariant to the score offset that masking adds, and 0 at agreement.
    Padded keys carry ~0 teacher mass, so only the query axis needs the mask.
    """
    if student.shape != teacher.shape:
        raise ConfigError(f"attention distillation needs equal head counts and lengths: student "
                          f"{tuple(student.shape)} vs teacher {tuple(teacher.shape)} ([batch, heads, query, key])")
    t = teacher.to(student.dtype)
    kl = (t * (t.clamp_min(1e-12).log() - student.clamp_min(1e-12).log())).sum(-1).mean(1)  # [B, T]
    return _token_mean(kl, attention_mask)


@dataclass
class TeacherOutput:
    last_hidden_state: Tensor
    logits: Tensor | None = None
    attention: Tensor | None = None  # last layer's attention probabilities [B, H, T, T]

    @classmethod
    def detached(cls, out: Any) -> TeacherOutput:
        """From a model output (e.g. the supernet's largest arch): targets for in-place distillation."""
        logits, att = getattr(out, "logits", None), _last_attention(out)
        return cls(_last_hidden(out).detach(), None if logits is None else logits.detach(),
                   None if att is None else att.detach())


def _last_attention(out: Any) -> Tensor | None:
    att = getattr(out, "attentions", None)
    return att[-1] if att else None


def _last_hidden(out: Any) -> Tensor:
    hidden = getattr(out, "hidden_states", None)
    if hidden:
        return hidden[-1]
    last = getattr(out, "last_hidden_state", None)
    if last is None:
        raise ValueError(f"{type(out).__name__} has neither hidden_states nor last_hidden_state")
    return last


def model_inputs(batch: Batch) -> dict[str, Tensor]:
    """The batch entries a model's forward takes (labels stay out: the loss is ours)."""
    return {k: batch[k] for k in MODEL_INPUTS if batch.get(k) is not None}


def run_model(model: nn.Module, inputs: Mapping[str, Tensor], logits: bool, arch: Any = None, **kw: Any) -> Any:
    """``model``'s output on ``inputs``; ``logits=False`` skips the MLM head when no loss reads it.

    The head is a vocabulary-wide matmul (30,522 columns for BERT's vocabulary),
    often the largest op of a small model, and hidden-state / attention
    distillation never reads it: a supernet runs with ``return_logits=False``, a
    ``*ForMaskedLM`` model as its base model alone (same hidden states and
    attentions, no ``logits`` field). ``arch``: the supernet's sub-model to run
    (``Supernet.forward(arch=)``, which writes no shared state); None runs the
    active arch, and is the only value a plain model takes.
    """
    if hasattr(model, "set_active"):  # a Supernet
        return model(**inputs, arch=arch, return_logits=logits, **kw)
    if arch is not None:
        raise ValueError(f"{type(model).__name__} is a plain model: it has no archs (pass arch=None)")
    return model(**inputs, **kw) if logits else model.base_model(**inputs, **kw)


class TeacherCache:
    """A frozen teacher whose outputs are computed once per batch.

    Every sub-model sampled for a batch distils from the same teacher outputs,
    so the cache keys on the batch *object* (``is``; it keeps a reference, so the
    identity cannot be recycled). Works with a transformers ``*ForMaskedLM`` (last
    entry of ``hidden_states``) and with raynas models and supernets.
    """

    def __init__(self, teacher: nn.Module, output_attentions: bool = False, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, logits: bool = True) -> None:
        """``device`` / ``dtype``: where the teacher runs (default: where it is), in the student's dtype, so its
        targets meet the student's outputs without a copy; inputs are moved there on every call.
        ``logits=False``: no logits distillation reads them, so the teacher's MLM head is skipped."""
        self.teacher = teacher.eval().requires_grad_(False).to(device=device, dtype=dtype)
        self.device = next(self.teacher.parameters()).device
        self._placement = Placement(self.device)
        self.output_attentions, self.logits = output_attentions, logits
        self.calls = 0
        self._batch: Batch | None = None
        self._out: TeacherOutput | None = None

    @torch.no_grad()
    def __call__(self, batch: Batch) -> TeacherOutput:
        if self._out is not None and batch is self._batch:
            return self._out
        extra = {"output_attentions": True} if self.output_attentions else {}
        inputs = self._placement.batch(model_inputs(batch))
        out = run_model(self.teacher, inputs, self.logits, output_hidden_states=True, **extra)
        self.calls += 1
        att = _last_attention(out)
        if self.output_attentions and att is None:
            raise ConfigError(f"teacher {type(self.teacher).__name__} returned no attentions "
                              "(load it with attn_implementation='eager')")
        self._batch, self._out = batch, TeacherOutput(_last_hidden(out), getattr(out, "logits", None), att)
        return self._out

    def clear(self) -> None:
        self._batch = self._out = None


class SupernetObjective(nn.Module):
    """The loss of one sub-model (the supernet's active arch, or a plain masked-LM model) on one batch.

    ``mlm``: MLM loss times ``mlm_weight`` (default 1), plus ``logits_weight`` times
    logits distillation when a ``teacher_out`` is given (in-place distillation from
    the largest sub-model, as the sandwich rule does).
    ``kd``: ``hidden_weight`` x :class:`HiddenDistillation` + ``attention_weight`` x
    last-layer attention KL + ``logits_weight`` x logits distillation +
    ``mlm_weight`` x MLM, against ``teacher_out`` or, when none is passed, the
    :class:`TeacherCache` given here.

    It is a module so the projection's parameters train with the student: wrap
    both in one module (``raynas.training.student.TrainStudent``) for an engine.
    """

    def __init__(
        self,
        mode: str = "mlm",
        *,
        student_width: int | None = None,
        teacher_width: int | None = None,
        hidden_weight: float = 1.0,
        attention_weight: float = 0.0,
        logits_weight: float = 0.0,
        mlm_weight: float | None = None,
        temperature: float = 1.0,
        logits_positions: str = "masked",
        teacher: TeacherCache | None = None,
        project: bool | None = None,
    ) -> None:
        super().__init__()
        require(mode in MODES, f"mode: unknown objective {mode!r} (expected one of {list(MODES)})")
        require(logits_positions in LOGIT_POSITIONS,
                f"logits_positions: expected one of {list(LOGIT_POSITIONS)}, got {logits_positions!r}")
        if mlm_weight is None:
            mlm_weight = 1.0 if mode == "mlm" else 0.0
        if mode == "mlm":
            hidden_weight = attention_weight = 0.0
        weights = (("hidden_weight", hidden_weight), ("attention_weight", attention_weight),
                   ("logits_weight", logits_weight), ("mlm_weight", mlm_weight))
        for name, w in weights:
            require(w >= 0, f"{name} must be >= 0, got {w}")
        require(sum(w for _, w in weights) > 0, "objective: every loss weight is 0")
        require(temperature > 0, f"temperature must be positive, got {temperature}")
        self.mode, self.temperature, self.logits_positions = mode, temperature, logits_positions
        self.hidden_weight, self.logits_weight, self.mlm_weight = hidden_weight, logits_weight, mlm_weight
        self.attention_weight = attention_weight
        #: the MLM loss and logits distillation (also as an in-place target, see TeacherOutput.detached) read the
        #: student's logits; without them the MLM head is skipped
        self.needs_logits = mlm_weight > 0 or logits_weight > 0
        self.teacher = teacher
        self.hidden: HiddenDistillation | None = None
        if hidden_weight > 0:
            if student_width is None or teacher_width is None:
                raise ConfigError("kd with hidden_weight > 0 needs student_width (the supernet's max hidden) "
                                  "and teacher_width")
            self.hidden = HiddenDistillation(student_width, teacher_width, project)

    def forward(self, net: nn.Module, batch: Batch, teacher_out: TeacherOutput | None = None,
                return_output: bool = False, arch: Any = None) -> Any:
        """``(loss, metrics)``, or ``(loss, metrics, output)`` with ``return_output`` (for in-place targets).

        ``arch``: run that sub-model of a supernet ``net`` without activating it (see :func:`run_model`).
        """
        extra = {"output_attentions": True} if self.attention_weight > 0 else {}
        out = run_model(net, model_inputs(batch), self.needs_logits, arch,
                        output_hidden_states=self.hidden is not None, **extra)
        if teacher_out is None and self.mode == "kd":
            if self.teacher is None:
                raise ConfigError("kd objective: pass teacher_out or build the objective with a TeacherCache")
            teacher_out = self.teacher(batch)
        labels = batch.get("labels")
        terms: dict[str, Tensor] = {}
        if self.mlm_weight > 0:
            if labels is None:
                raise ConfigError("the MLM loss needs 'labels' in the batch")
            terms["mlm"] = self.mlm_weight * mlm_loss(out.logits, labels)
        if self.hidden is not None and teacher_out is not None:
            terms["hidden"] = self.hidden_weight * self.hidden(
                _last_hidden(out), teacher_out.last_hidden_state, batch.get("attention_mask"))
        if self.attention_weight > 0 and teacher_out is not None:
            student_att = _last_attention(out)
            if student_att is None or teacher_out.attention is None:
                raise ConfigError("attention distillation: the student or the teacher returned no attentions")
            terms["attention"] = self.attention_weight * attention_distillation(
                student_att, teacher_out.attention, batch.get("attention_mask"))
        if self.logits_weight > 0 and teacher_out is not None:
            if teacher_out.logits is None:
                raise ConfigError("logits distillation: the teacher gave no logits (use a *ForMaskedLM teacher)")
            terms["logits"] = self.logits_weight * logits_distillation(
                out.logits, teacher_out.logits, self.temperature, self._positions(batch))
        if not terms:  # mlm mode with only in-place terms and no teacher_out: nothing to score
            raise ConfigError("objective: no loss term applies (in-place distillation needs teacher_out)")
        loss = torch.stack(list(terms.values())).sum()
        metrics = {name: float(v.detach()) for name, v in terms.items()}
        metrics["loss"] = float(loss.detach())
        return (loss, metrics, out) if return_output else (loss, metrics)

    def _positions(self, batch: Batch) -> Tensor | None:
        """Where logits are distilled: the MLM-masked tokens, or every real token."""
        labels = batch.get("labels")
        if self.logits_positions == "masked" and labels is not None:
            return labels != -100
        return batch.get("attention_mask")
