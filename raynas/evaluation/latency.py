"""Inference latency of encoders (CPU by default), and speedup against a reference, as AutoTinyBERT reports it.

AutoTinyBERT (Yin et al. 2021) gives each searched model a *speedup*: the
reference's latency divided by the model's, measured on CPU with batch 1 and
sequence length 128. A speedup, not a raw time, is what transfers between
machines, so that is what the family report plots.

What is timed is one forward pass of the *base* encoder (``AutoModel``:
embeddings, layers, pooler) under ``torch.inference_mode``, in eval mode, on
seeded random token ids with an all-ones attention mask (no padding, so every
model does the full work). Task heads are a negligible, task-dependent extra and
are left out, as the parameter counts of the papers leave them out.

Interleaving (``compare_latency``): on a shared, noisy CPU, timing model A for a
minute and then model B for a minute lets a neighbour's job, frequency scaling or
cache pollution land on one model only and show up as a fake speedup. Timing the
models in rounds -- every round runs each model once, the order alternating
between rounds so no model always runs first on a cold cache or right after
another's allocations -- spreads any slow period over all models alike; medians
then absorb stray outliers. Pure torch: no Ray here.

``device="cuda"`` times on a GPU instead: model and inputs move there, and the
clock is read only after ``torch.cuda.synchronize``, before and after the forward,
since kernel launches return before the GPU has done the work (without it one
would time the launch, not the model). A module passed in goes back to the device
it came from.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

import raynas  # noqa: F401  (registers model_type "raynas" with the Auto classes, so raynas folders load)
from raynas.errors import ConfigError
from raynas.teachers import resolve_teacher
from raynas.training.optim import Placement

ModelRef = str | os.PathLike | nn.Module
Row = dict[str, Any]


@dataclass
class _Prepared:
    """A model ready to time: its base encoder, inputs, and the train/eval state to give back."""

    name: str
    model: nn.Module
    inputs: dict[str, torch.Tensor]
    params: int
    was_training: bool
    was_device: torch.device | None  # where the module's weights were before timing (None: no weights)


def _check_int(name: str, value: Any, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(f"{name}: expected an integer >= {least}, got {value!r}")


def _check_settings(seq_len: int, batch_size: int, threads: int | None, warmup: int, repeats: int) -> None:
    """Every setting checked before a model is loaded or any time is spent."""
    for name, value, least in (("seq_len", seq_len, 1), ("batch_size", batch_size, 1), ("warmup", warmup, 0),
                               ("repeats", repeats, 1)):
        _check_int(name, value, least)
    if threads is not None:
        _check_int("threads", threads, 1)


def load_encoder(model_or_path: ModelRef) -> nn.Module:
    """The base encoder of a module, a model folder, a packaged teacher name or a hub name.

    A folder saved with a head (masked LM, classification) loads through
    ``AutoModel`` as its base model; a module with a head is reduced to its
    ``base_model``, so both routes time and count the same thing.
    """
    if isinstance(model_or_path, nn.Module):
        return getattr(model_or_path, "base_model", model_or_path)
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    text = str(model_or_path)
    where = resolve_teacher(text, "model")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a task head left out of the base model is expected, not worth a table
    try:
        return AutoModel.from_pretrained(where)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{text}: cannot load with AutoModel ({first})") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def _prepare(name: str, model_or_path: ModelRef, seq_len: int, batch_size: int, seed: int,
             placement: Placement) -> _Prepared:
    """Load, switch to eval, draw the seeded random inputs sized to the model's vocabulary, move both to the device.

    The ids are drawn on cpu whatever the device, so every device times the same inputs.
    """
    model = load_encoder(model_or_path)
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if not isinstance(vocab, int) or vocab < 1:
        raise ConfigError(f"{name}: the model has no config.vocab_size to draw token ids from")
    max_positions = getattr(config, "max_position_embeddings", None)
    if isinstance(max_positions, int) and seq_len > max_positions:
        raise ConfigError(f"{name}: seq_len {seq_len} exceeds the model's max_position_embeddings {max_positions}")
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=gen)
    inputs = placement.batch({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    params = sum(p.numel() for p in model.parameters())  # parameters() counts tied weights once
    was_training = model.training
    was_device = next((p.device for p in model.parameters()), None)
    model.eval().to(placement.device)
    return _Prepared(name, model, inputs, params, was_training, was_device)


def _time_once(prepared: _Prepared, placement: Placement) -> float:
    """Wall-clock milliseconds of one forward pass, queued GPU work included."""
    with torch.inference_mode():
        placement.synchronize()  # nothing earlier (the inputs' copy, the last model) is charged to this one
        start = time.perf_counter()
        prepared.model(**prepared.inputs)
        placement.synchronize()
        return (time.perf_counter() - start) * 1e3


def _interleaved(models: Sequence[_Prepared], warmup: int, repeats: int, placement: Placement) -> list[list[float]]:
    """Per model, ``repeats`` forward times, each round timing every model once in alternating order.

    The garbage collector is paused while timing: a collection triggered by one
    model's Python allocations would otherwise be charged to whichever model runs next.
    """
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(warmup):
            for prepared in models:
                _time_once(prepared, placement)
        times: list[list[float]] = [[] for _ in models]
        for r in range(repeats):
            order = range(len(models)) if r % 2 == 0 else reversed(range(len(models)))
            for i in order:
                times[i].append(_time_once(models[i], placement))
        return times
    finally:
        if was_enabled:
            gc.enable()


def _summary(prepared: _Prepared, times: Sequence[float], seq_len: int, batch_size: int) -> Row:
    return {
        "latency_ms": float(statistics.median(times)),
        "latency_p90_ms": float(np.percentile(times, 90)),
        "latency_min_ms": float(min(times)),
        "params": int(prepared.params),
        "seq_len": seq_len,
        "batch_size": batch_size,
        "threads": torch.get_num_threads(),
    }


def _run(named: Sequence[tuple[str, ModelRef]], seq_len: int, batch_size: int, threads: int | None, warmup: int,
         repeats: int, seed: int, device: str) -> list[Row]:
    """Load every model, time them interleaved under ``threads`` on ``device``; restore threads, mode and device."""
    _check_settings(seq_len, batch_size, threads, warmup, repeats)
    placement = Placement.resolve(device)
    prepared: list[_Prepared] = []
    saved_threads = torch.get_num_threads()
    try:
        for name, ref in named:  # all loaded (and checked) before any time is spent
            prepared.append(_prepare(name, ref, seq_len, batch_size, seed, placement))
        if threads is not None:
            torch.set_num_threads(threads)
        times = _interleaved(prepared, warmup, repeats, placement)
        return [_summary(p, t, seq_len, batch_size) for p, t in zip(prepared, times)]
    finally:
        torch.set_num_threads(saved_threads)
        for p in prepared:
            p.model.train(p.was_training)
            if p.was_device is not None and p.was_device != placement.device:
                p.model.to(p.was_device)


def measure_latency(model_or_path: ModelRef, seq_len: int = 128, batch_size: int = 1, threads: int | None = None,
                    warmup: int = 3, repeats: int = 20, seed: int = 0, device: str = "cpu") -> Row:
    """Median, p90 and min forward milliseconds of one model's base encoder, and its parameter count.

    ``model_or_path`` is an ``nn.Module`` (a model with a head is timed through
    its ``base_model``), a model folder (raynas or bert), a packaged teacher name
    or a hub name. ``threads`` sets ``torch.set_num_threads`` for the
    measurement only; the returned ``threads`` is the count actually used. A
    module passed in gets its train/eval mode and its device back afterwards.
    ``device``: ``cpu`` (the papers' protocol), ``cuda``/``cuda:N``, or ``auto``.
    """
    name = type(model_or_path).__name__ if isinstance(model_or_path, nn.Module) else str(model_or_path)
    return _run([(name, model_or_path)], seq_len, batch_size, threads, warmup, repeats, seed, device)[0]


def measure_modules(named: Sequence[tuple[str, ModelRef]], seq_len: int = 128, batch_size: int = 1,
                    threads: int | None = None, warmup: int = 3, repeats: int = 20, seed: int = 0,
                    device: str = "cpu") -> list[Row]:
    """``measure_latency``'s row for each ``(name, model)``, all timed interleaved in one group, plus ``name``.

    For many in-memory modules at once (the latency predictor's dataset times a
    chunk of sampled archs beside the reference): one warm-up and round-robin
    protocol for the whole group, exactly as ``compare_latency`` times folders.
    """
    rows = _run(named, seq_len, batch_size, threads, warmup, repeats, seed, device)
    return [{"name": name, **row} for (name, _), row in zip(named, rows)]


def compare_latency(paths: Sequence[str | os.PathLike], reference: str | os.PathLike, seq_len: int = 128,
                    batch_size: int = 1, threads: int | None = None, warmup: int = 3, repeats: int = 20,
                    seed: int = 0, device: str = "cpu") -> list[Row]:
    """One row per model, timed interleaved with the reference: ``measure_latency``'s keys plus
    ``model`` (the path as given) and ``speedup = reference latency_ms / latency_ms``.

    The reference is timed once: if it is among ``paths`` its row stays where it
    is, otherwise its row comes first, so the result feeds ``family_report``
    with the reference included. Its speedup is exactly 1.0 (its median over
    itself). Every model gets the same seeded token ids where vocabularies agree.
    """
    names = [str(p) for p in paths]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"compare_latency: models listed twice: {', '.join(duplicates)}")
    ref_name = str(reference)
    if ref_name not in names:
        names.insert(0, ref_name)
    rows = _run([(n, n) for n in names], seq_len, batch_size, threads, warmup, repeats, seed, device)
    ref_ms = rows[names.index(ref_name)]["latency_ms"]
    return [{"model": n, **row, "speedup": ref_ms / row["latency_ms"]} for n, row in zip(names, rows)]
