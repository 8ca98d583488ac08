"""Task models and tokenizers loaded from folders, with one-line errors: what training, evaluation and compression share.

A student's head may start fresh (fine-tuning a pre-trained encoder); a teacher's,
or a model being scored, may not: scoring an untrained head would report noise as
a result. Split from :mod:`raynas.evaluation.finetune` so the loop reads in one sitting.
"""

from __future__ import annotations

import sys
from typing import Any

from torch import nn

from raynas.errors import ConfigError, require
from raynas.evaluation.tasks import Task, get_task
from raynas.teachers import resolve_teacher


def load_task_model(task: str, where: str) -> nn.Module:
    """A trained task model from a folder (its head must be trained for ``task``), in eval mode."""
    return task_model_for("model", resolve_teacher(where, "model"), get_task(task), as_teacher=True).eval()


def load_tokenizer(where: str) -> Any:
    """The tokenizer of a model folder, packaged teacher or hub name (a one-line error when it has none)."""
    return tokenizer_for("model", resolve_teacher(where, "model"))


def tokenizer_for(field: str, where: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{field} {where!r}: cannot load its tokenizer ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def task_model_for(field: str, where: str, task: Task, as_teacher: bool) -> nn.Module:
    """The task model; a student's head may start fresh (noted on stderr), a teacher's may not."""
    from transformers import AutoConfig, AutoModelForQuestionAnswering, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    kwargs: dict[str, Any] = {}
    if task.kind == "extractive_qa":
        auto: Any = AutoModelForQuestionAnswering
        kwargs["num_labels"] = 2  # BertForQuestionAnswering sizes qa_outputs by num_labels
    else:
        auto = AutoModelForSequenceClassification
        kwargs["problem_type"] = "regression" if task.kind == "regression" else "single_label_classification"
        if as_teacher:
            try:
                have = AutoConfig.from_pretrained(where).num_labels
            except (OSError, ValueError) as exc:
                raise ConfigError(f"{field} {where!r}: cannot read its config ({_first_line(exc)})") from None
            require(have == task.num_labels, f"{field}: {where} has {have} label(s); task {task.name} needs "
                                             f"{task.num_labels} (a teacher must be fine-tuned on the same task)")
        else:
            kwargs.update(num_labels=task.num_labels, ignore_mismatched_sizes=True)
            if task.label_names:
                kwargs["id2label"] = dict(enumerate(task.label_names))
                kwargs["label2id"] = {name: i for i, name in enumerate(task.label_names)}
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # our one-line note replaces the load report
    hf_logging.disable_progress_bar()
    try:
        model, info = auto.from_pretrained(where, output_loading_info=True, **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"{field} {where!r}: cannot load a {task.kind} model ({_first_line(exc)})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    fresh = sorted(set(info.get("missing_keys", ())) | {m[0] for m in info.get("mismatched_keys", ())})
    if as_teacher:
        require(not fresh, f"{field}: {where} has no trained {task.kind} head (missing {', '.join(fresh[:4])}); "
                           f"fine-tune the teacher on {task.name} first")
    elif fresh:
        print(f"note: {field} {where}: {len(fresh)} task-head tensor(s) start fresh", file=sys.stderr, flush=True)
    return model


def check_positions(field: str, model: nn.Module, max_seq_len: int) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    require(limit is None or max_seq_len <= limit,
            f"max_seq_len: {max_seq_len} exceeds the {field}'s max_position_embeddings ({limit})")


# ---- training -------------------------------------------------------------------------------
