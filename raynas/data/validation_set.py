"""The fixed validation batches a supernet is scored on: the same masks in training and in search.

Supernet training reports its validation loss on the first ``n`` batches of
the corpus's ``validation`` split, masked by an :class:`MLMCollator` with a
fixed seed; search ranks archs by the same loss. Building the batches here,
once, keeps the two on identical data and masks (same rows, same order, same
seed), so the loss training printed and the loss search ranks by are one number.
"""

from __future__ import annotations

from typing import Any

import torch

from raynas.data.masking import MLMCollator

VALIDATION_SEED = 12345  # the masking seed of every validation set


def mlm_validation_batches(split: Any, tokenizer: Any, batch_size: int, n_batches: int,
                           mlm_probability: float = 0.15, seed: int = VALIDATION_SEED) -> list[dict[str, torch.Tensor]]:
    """Up to ``n_batches`` masked batches of ``batch_size`` rows from the start of ``split``.

    ``split``: a ``datasets.Dataset`` with ``input_ids`` (e.g. ``corpus["validation"]``)
    or anything sliceable the same way. Fewer rows give fewer (and a shorter last) batch.
    """
    collator = MLMCollator(tokenizer, mlm_probability, seed=seed)
    end = min(len(split), batch_size * n_batches)
    return [collator(split[i: i + batch_size]["input_ids"]) for i in range(0, end, batch_size)]
