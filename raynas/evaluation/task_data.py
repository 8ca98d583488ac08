"""Task data for fine-tuning: tokenised train rows, eval rows (and SQuAD's windows), padding per batch.

Separate from the loop (:mod:`raynas.evaluation.finetune`) so the loop reads in one
sitting; every fine-tuning run, pruning run and evaluation builds its batches here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from raynas.errors import require
from raynas.evaluation import qa_features
from raynas.evaluation.tasks import Task, load_task_split


@dataclass
class TaskData:
    train: list[dict[str, Any]]
    train_samples: int
    eval_inputs: list[dict[str, Any]]  # model inputs only
    eval_samples: int
    eval_labels: np.ndarray | None = None  # GLUE
    eval_examples: dict[str, list[Any]] | None = None  # SQuAD: the rows, for postprocessing and gold answers
    eval_qa: qa_features.EvalFeatures | None = None


def subsample(ds: Any, limit: int | None, seed: int | None) -> Any:
    """At most ``limit`` rows: a seeded random subset (train) or the first ones (eval, seed None)."""
    if limit is None or limit >= len(ds):
        return ds
    if seed is None:
        return ds.select(range(limit))
    return ds.select(sorted(np.random.default_rng(seed).permutation(len(ds))[:limit].tolist()))


def glue_rows(ds: Any, tokenizer: Any, max_len: int) -> list[dict[str, Any]]:
    text_b = list(ds["text_b"]) if "text_b" in ds.column_names else None
    enc = tokenizer(list(ds["text_a"]), text_b, truncation=True, max_length=max_len)
    keys = [k for k in qa_features.MODEL_INPUTS if k in enc]
    labels = list(ds["label"])
    return [{**{k: enc[k][i] for k in keys}, "labels": labels[i]} for i in range(len(labels))]


def load_data(cfg: Any, task: Task, tokenizer: Any) -> TaskData:
    """Train rows (a seeded subset) and eval rows of ``task`` per a FinetuneConfig-like ``cfg``."""
    train_ds = subsample(load_task_split(task.name, cfg.train_split, cfg.data_dir), cfg.max_train_samples, cfg.seed)
    eval_ds = subsample(load_task_split(task.name, cfg.eval_split, cfg.data_dir), cfg.max_eval_samples, None)
    require(len(train_ds) > 0, f"train_split: task {task.name} split {cfg.train_split!r} has no rows")
    require(len(eval_ds) > 0, f"eval_split: task {task.name} split {cfg.eval_split!r} has no rows")
    if task.kind != "extractive_qa":
        eval_rows = glue_rows(eval_ds, tokenizer, cfg.max_seq_len)
        labels = np.asarray([row.pop("labels") for row in eval_rows])
        return TaskData(glue_rows(train_ds, tokenizer, cfg.max_seq_len), len(train_ds), eval_rows, len(eval_ds), labels)
    train = qa_features.train_features(train_ds.to_dict(), tokenizer, cfg.max_seq_len, cfg.doc_stride)
    examples = eval_ds.to_dict()
    features = qa_features.eval_features(examples, tokenizer, cfg.max_seq_len, cfg.doc_stride)
    return TaskData(train, len(train_ds), features.inputs, len(eval_ds), eval_examples=examples, eval_qa=features)


def collate_fn(pad_id: int) -> Callable[[list[dict[str, Any]]], dict[str, Tensor]]:
    """Pad token lists to the longest row of the batch; scalars (labels, positions) become tensors."""

    def collate(rows: list[dict[str, Any]]) -> dict[str, Tensor]:
        width = max(len(row["input_ids"]) for row in rows)
        batch = {}
        for key, first in rows[0].items():
            if isinstance(first, list):
                fill = pad_id if key == "input_ids" else 0
                batch[key] = torch.tensor([row[key] + [fill] * (width - len(row[key])) for row in rows])
            else:
                batch[key] = torch.tensor([row[key] for row in rows])  # int -> long, float -> float32
        return batch

    return collate
