"""Proxy fitness of many archs from one shared supernet, against extracting and evaluating each.

Search scores thousands of candidates by their inherited validation loss. The
shared path (:func:`raynas.training.validation.validation_losses` over
``forward(arch=)``) must give the numbers extraction gives, and should cost
no more than copying every candidate's weights out first. This module measures
both paths on the same archs and batches, in one process, and reports the
largest disagreement alongside the times. Pure torch: no Ray here.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import torch

from raynas.benchmarks.step_time import make_mlm_batch
from raynas.supernet import Supernet
from raynas.training.validation import validation_losses

Row = dict[str, Any]


def mlm_batches(vocab_size: int, n: int, batch: int, seq_len: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``n`` seeded MLM batches (see :func:`make_mlm_batch`)."""
    out = []
    for i in range(n):
        ids, mask, labels = make_mlm_batch(vocab_size, batch, seq_len, seed=seed + i)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def bench_proxy_fitness(net: Supernet, archs: Sequence[Any], batches: Sequence[dict[str, torch.Tensor]],
                        chunk: int = 10, progress: Callable[[str], None] | None = None,
                        ) -> tuple[list[Row], dict[str, float]]:
    """Per-arch rows (shared loss, extracted loss, their difference) and a summary of both paths' wall times.

    Archs go in chunks of ``chunk``: the shared path scores a chunk at once
    (batch-major), then the extracted path extracts and scores each arch of the
    same chunk alone. Interleaving chunks keeps load that drifts over minutes
    on a shared machine from landing on one path only. ``net`` is put in eval mode.
    """
    net.eval()
    say = progress or (lambda _: None)
    rows: list[Row] = []
    shared_s = extract_s = eval_s = 0.0
    for start in range(0, len(archs), chunk):
        part = list(archs[start: start + chunk])
        t0 = time.perf_counter()
        shared = validation_losses(net, part, batches)
        shared_s += time.perf_counter() - t0
        for arch, got in zip(part, shared, strict=True):
            t0 = time.perf_counter()
            model = net.extract(arch).eval()
            t1 = time.perf_counter()
            alone = validation_losses(model, [None], batches)[0]
            t2 = time.perf_counter()
            extract_s, eval_s = extract_s + t1 - t0, eval_s + t2 - t1
            rows.append({"arch": net.space.format(arch), "params": net.space.params(arch),
                         "shared_loss": got["loss"], "extracted_loss": alone["loss"],
                         "abs_diff": abs(got["loss"] - alone["loss"])})
        say(f"{len(rows)}/{len(archs)} archs: shared {shared_s:.1f} s, extract + evaluate {extract_s + eval_s:.1f} s")
    summary = {"archs": len(archs), "batches": len(batches), "shared_s": shared_s, "extract_s": extract_s,
               "extracted_eval_s": eval_s, "extracted_total_s": extract_s + eval_s,
               "speedup": (extract_s + eval_s) / shared_s, "max_abs_diff": max(r["abs_diff"] for r in rows)}
    return rows, summary
