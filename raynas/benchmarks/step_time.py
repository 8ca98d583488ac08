"""Training-step time of a supernet's active path against the extracted model.

Weight sharing is only worth it if training a sub-model *through* the supernet
costs about what training the standalone sub-model costs. This module measures
exactly that, per arch: one MLM training step (``zero_grad``, forward with
labels, ``backward``) of the supernet with the arch active, and of
``net.extract(arch)``, on the same batch, in the same process.

To keep the comparison fair on a shared, noisy machine, both models are timed
interleaved: after ``warmup`` untimed steps of each, every round times one
step of each, alternating which goes first (so neither always runs on a warm
cache or right after the other's allocations). Medians absorb stray outliers.
Pure torch: no Ray here.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Sequence

import torch
from torch import nn

from raynas.errors import ConfigError
from raynas.supernet import Supernet

Tensor = torch.Tensor
Batch = tuple[Tensor, Tensor, Tensor]  # (input_ids, attention_mask, labels)
Row = dict[str, Any]

IGNORE_INDEX = -100  # CrossEntropyLoss's default ignore_index: unmasked positions carry no loss


def make_mlm_batch(vocab_size: int, batch: int, seq_len: int, seed: int = 0, mask_prob: float = 0.15) -> Batch:
    """A seeded random MLM batch: both models must see identical inputs for the times to compare.

    Token ids are uniform over the vocabulary, the attention mask is all ones
    (no padding, so both models do the same work), and about ``1 - mask_prob``
    of the labels are ``-100`` as in BERT's 15% masking. At least one label is
    kept so that the loss is finite.
    """
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch, seq_len), generator=gen)
    attention_mask = torch.ones_like(ids)
    labels = ids.clone()
    drop = torch.rand(batch, seq_len, generator=gen) >= mask_prob
    drop[0, 0] = False
    labels[drop] = IGNORE_INDEX
    return ids, attention_mask, labels


def time_train_step(model: nn.Module, batch: Batch) -> float:
    """Wall-clock milliseconds of one training step: ``zero_grad(set_to_none=True)``, forward, backward.

    ``set_to_none`` makes every step allocate its gradients afresh, as a
    training loop with ``optimizer.zero_grad()`` does; the step covers
    exactly what the supernet's weight sharing could make slower.
    """
    ids, attention_mask, labels = batch
    start = time.perf_counter()
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, attention_mask=attention_mask, labels=labels).loss
    loss.backward()
    return (time.perf_counter() - start) * 1e3


def _interleaved(models: Sequence[nn.Module], batch: Batch, repeats: int, warmup: int) -> list[list[float]]:
    """Per model, ``repeats`` step times, rounds alternating which model goes first."""
    for _ in range(warmup):
        for model in models:
            time_train_step(model, batch)
    times: list[list[float]] = [[] for _ in models]
    for r in range(repeats):
        order = range(len(models)) if r % 2 == 0 else reversed(range(len(models)))
        for i in order:
            times[i].append(time_train_step(models[i], batch))
    return times


def bench_step_time(
    net: Supernet,
    archs: Sequence[Any],
    batch: int = 8,
    seq_len: int = 128,
    repeats: int = 5,
    warmup: int = 1,
    seed: int = 0,
    progress: Callable[[int, Row], None] | None = None,
) -> list[Row]:
    """One row per arch: median step ms of the supernet's active path and of the extracted model.

    ``ratio = supernet_ms / extracted_ms``: 1.0 means weight sharing costs
    nothing per step. ``params`` is the exported MLM model's parameter count
    (``space.params(arch, "mlm")``). ``progress(i, row)`` is called after each
    arch (1-based ``i``), so a caller can report as it goes. The supernet is
    left in train mode with the last arch active and its gradients cleared.
    """
    space = net.space
    for name, value, least in (("batch", batch, 1), ("seq_len", seq_len, 1), ("repeats", repeats, 1),
                               ("warmup", warmup, 0)):
        if not isinstance(value, int) or value < least:
            raise ConfigError(f"{name}: expected an integer >= {least}, got {value!r}")
    if seq_len > space.embeddings.max_position_embeddings:
        raise ConfigError(f"seq_len: {seq_len} exceeds the space's max_position_embeddings "
                          f"{space.embeddings.max_position_embeddings}")
    parsed = [space.validate(a) for a in archs]  # every arch checked before any time is spent
    data = make_mlm_batch(space.embeddings.vocab_size, batch, seq_len, seed)
    net.train()
    rows: list[Row] = []
    for i, arch in enumerate(parsed, 1):
        net.set_active(arch)
        model = net.extract(arch).train()
        sup, ext = _interleaved([net, model], data, repeats, warmup)
        sup_ms, ext_ms = statistics.median(sup), statistics.median(ext)
        rows.append({
            "arch": space.format(arch), "params": space.params(arch, "mlm"),
            "supernet_ms": sup_ms, "extracted_ms": ext_ms, "ratio": sup_ms / ext_ms,
            "batch": batch, "seq_len": seq_len, "threads": torch.get_num_threads(), "space": space.name,
        })
        net.zero_grad(set_to_none=True)  # free this arch's gradients before the next extraction
        del model
        if progress is not None:
            progress(i, rows[-1])
    return rows
