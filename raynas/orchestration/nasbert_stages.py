"""The stages of ``raynas nasbert`` (see :mod:`raynas.orchestration.nasbert` for the config and the order).

Each stage is a function of the config (and of the summaries of the stages
before it) that returns a JSON-able summary; :class:`raynas.stages.StageRun`
records it, so a rerun hands later stages exactly what a fresh run would.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from raynas.errors import ConfigError
from raynas.orchestration.nasbert import (
    NasbertConfig,
    _constraint,
    block_plan,
    build_space,
    run_dir,
    say,
    short_train_config,
    student_hidden,
)

PAIRS_DIR, BLOCKS_DIR = "pairs", "blocks"


def _teacher(cfg: NasbertConfig) -> tuple[Any, Any]:
    from raynas.teachers import load_teacher

    return load_teacher(cfg.teacher)


# ---------------------------------------------------------------- 1. init


def stage_init(cfg: NasbertConfig) -> dict[str, Any]:
    """The layer-wise supernet; seeded with the teacher's weights where the space can hold the teacher."""
    from raynas.export import from_bert
    from raynas.spaces.layerwise import LayerwiseArch
    from raynas.supernet import Supernet, save_supernet

    space, (teacher, tokenizer) = build_space(cfg), _teacher(cfg)
    hidden, model = student_hidden(cfg, space), from_bert(teacher)
    c = model.config
    torch.manual_seed(cfg.train.seed)
    net = Supernet.from_space(space, hidden_dropout_prob=c.hidden_dropout_prob,
                              attention_probs_dropout_prob=c.attention_probs_dropout_prob,
                              layer_norm_eps=c.layer_norm_eps, pad_token_id=c.pad_token_id)
    tokens = tuple(space.token_of(op) for op in c.ops)
    seeded = hidden == c.hidden_size and len(tokens) == space.num_layers and all(t in space.tokens for t in tokens)
    if seeded:
        net.inject(model, LayerwiseArch(hidden, tokens))
        say(f"init: supernet seeded from the teacher (its path {','.join(tokens[:4])},... is the teacher, "
            "weight for weight)")
    else:
        say("init: the space cannot hold the teacher at this width; op-layers start from random weights")
    path = save_supernet(net, run_dir(cfg) / "init", tokenizer)
    return {"supernet": str(path), "seeded": seeded, "params": sum(p.numel() for p in net.parameters())}


# ---------------------------------------------------------------- 2. pairs


def stage_pairs(cfg: NasbertConfig) -> dict[str, Any]:
    """Teacher hidden states at every block boundary, once, for training and held-out sequences."""
    from raynas.blockwise.blocks import TeacherBlocks
    from raynas.blockwise.pairs import write_pairs
    from raynas.data.corpus import build_corpus

    teacher, tokenizer = _teacher(cfg)
    if tokenizer is None:
        raise ConfigError(f"teacher {cfg.teacher!r}: no tokenizer saved with it (the pairs need one)")
    corpus = build_corpus(cfg.pairs.corpus, tokenizer, cache_dir=run_dir(cfg) / "corpus")
    from raynas.training.optim import resolve_device

    blocks = TeacherBlocks(teacher, cfg.blocks).to(resolve_device(cfg.pairs.device, "pairs.device"))
    out, summary = run_dir(cfg) / PAIRS_DIR, {}
    for split, n in (("train", cfg.pairs.train_rows), ("validation", cfg.pairs.val_rows)):
        rows = corpus[split] if split in corpus else None
        if rows is None or len(rows) == 0:
            raise ConfigError(f"pairs.corpus: no {split} rows (raise corpus.validation_fraction or add text)")
        n = min(n, len(rows))
        if n < (cfg.pairs.train_rows if split == "train" else cfg.pairs.val_rows):
            say(f"pairs: the corpus has only {n} {split} rows")
        ids = torch.tensor(rows[:n]["input_ids"], dtype=torch.long)
        t0 = time.perf_counter()
        path = write_pairs(blocks, ids, torch.ones_like(ids), out / f"{split}.arrow", batch_size=cfg.pairs.batch_size,
                           progress=lambda line, s=split: say(f"pairs ({s}): {line}"))
        summary[split] = {"path": str(path), "rows": n, "bytes": path.stat().st_size,
                          "seconds": round(time.perf_counter() - t0, 1)}
        say(f"pairs: {split}: {n} sequences x {ids.shape[1]} tokens, {cfg.blocks + 1} boundaries, "
            f"{path.stat().st_size / 2**20:.0f} MiB in {summary[split]['seconds']:.0f} s")
    return summary


# ---------------------------------------------------------------- 3. blocks


def stage_blocks(cfg: NasbertConfig, init: dict[str, Any], pairs: dict[str, Any]) -> dict[str, Any]:
    """Every block trained and shrunk on Ray Tune (concurrently), then gathered into ``RUN/supernet``."""
    import ray

    from raynas.blockwise.blocks import StudentBlock, gather_blocks
    from raynas.blockwise.pairs import TeacherPairs
    from raynas.blockwise.shrinking import ShrinkState, path_params
    from raynas.orchestration.blockwise_tune import CHECKPOINT, STATE_FILE, run_shrinking
    from raynas.orchestration.cluster import connect
    from raynas.orchestration.shared_supernet import put_supernet
    from raynas.supernet import load_supernet, load_supernet_tokenizer, save_supernet

    net = load_supernet(init["supernet"])
    space, hidden, plan = net.space, student_hidden(cfg, net.space), block_plan(cfg, net.space)
    train, val = TeacherPairs.open(pairs["train"]["path"]), TeacherPairs.open(pairs["validation"]["path"])
    out = run_dir(cfg) / BLOCKS_DIR
    state_path = out / STATE_FILE
    if state_path.is_file():
        state = ShrinkState.load(state_path)
        say(f"blocks: resuming the shrinking state of {state_path} "
            f"(stages done per block: {[b.stage for _, b in sorted(state.blocks.items())]})")
    else:
        state = ShrinkState.start(space, hidden, plan.ops_per_block, cfg.blocks, cfg.shrink, cfg.train.seed)
        out.mkdir(parents=True, exist_ok=True)
        state.save(state_path)
        say(f"blocks: {cfg.blocks} blocks x {plan.ops_per_block} op-layers; initial paths per bin "
            f"{[[len(b) for b in blk.bins] for _, blk in sorted(state.blocks.items())]}")

    def params_of(path: tuple[str, ...]) -> int:
        return path_params(space, hidden, path)

    if not state.finished:
        connect(log_to_driver=True)
        refs = [ray.put((train.block(k), val.block(k))) for k in range(cfg.blocks)]  # once: every stage reuses them
        run_shrinking(state, cfg.shrink, cfg.train, supernet=put_supernet(net), plan=plan, hidden=hidden,
                      teacher_dim=train.hidden, pairs=refs, params_of=params_of, out=out, say=say)
    states = []
    for k in range(cfg.blocks):
        block = StudentBlock(net, plan, k, hidden, train.hidden)
        if not (out / f"block-{k}" / CHECKPOINT).is_file():
            raise ConfigError(f"blocks: block {k} has no checkpoint (no bin held more than shrink.max_per_bin "
                              "paths, so it never trained): raise shrink.candidates_per_bin")
        ckpt = torch.load(out / f"block-{k}" / CHECKPOINT, map_location="cpu", weights_only=False)
        block.load_state_dict(ckpt["block"])
        states.append(block.layer_state())
    gathered = save_supernet(gather_blocks(net, states), run_dir(cfg) / "supernet",
                             load_supernet_tokenizer(init["supernet"]))
    survivors = {str(k): [",".join(p) for p in b.survivors()] for k, b in sorted(state.blocks.items())}
    return {"supernet": str(gathered), "stages": str(out / "stages.parquet"), "survivors": survivors}


# ---------------------------------------------------------------- 4. approximate


def final_block_losses(stages_path: str, blocks: int) -> list[list[tuple[tuple[str, ...], float]]]:
    """Per block: each survivor and its validation loss at the block's last scoring."""
    import pandas as pd

    df = pd.read_parquet(stages_path)
    out = []
    for k in range(blocks):
        rows = df[df.block == k]
        last = rows[(rows.stage == rows.stage.max()) & rows.kept]
        out.append([(tuple(p.split(",")), float(v)) for p, v in zip(last.path, last.val_loss)])
    return out


def stage_approximate(cfg: NasbertConfig, blocks: dict[str, Any]) -> dict[str, Any]:
    """Rank assembled models by summed block loss per budget; short-train the top T; pick the best per budget."""
    from raynas.atomic_io import atomic_file
    from raynas.blockwise.approximation import assemble
    from raynas.orchestration.supernet_training import first_metric, run_training
    from raynas.supernet import load_supernet, load_supernet_tokenizer
    from recipes.extract import extract_family, folder_name

    net = load_supernet(blocks["supernet"])
    space, hidden = net.space, student_hidden(cfg, net.space)
    constraint = _constraint(cfg, space)
    budgets = constraint.budgets(cfg.approx.budgets)
    survivors = final_block_losses(blocks["stages"], cfg.blocks)
    top = assemble(space, hidden, survivors, constraint, budgets, cfg.approx.top_t)
    span = _span(space, hidden, survivors, constraint)
    say(f"approximate: assembled models span {span[0]:,.0f} .. {span[1]:,.0f} {constraint.unit} "
        f"({math.prod(len(s) for s in survivors):,} combinations)")
    archs = sorted({c.arch for cands in top.values() for c in cands})
    say(f"approximate: {len(archs)} distinct candidates for {len(budgets)} budget(s), "
        f"top {cfg.approx.top_t} each by summed block loss")
    cand_dir, short_dir = run_dir(cfg) / "candidates", run_dir(cfg) / "short"
    extract_family(net, load_supernet_tokenizer(blocks["supernet"]),
                   [a for a in archs if not (cand_dir / folder_name(a)).is_dir()], cand_dir, overwrite=True)
    real: dict[str, dict[str, Any]] = {}
    for i, arch in enumerate(archs, 1):
        folder = short_dir / folder_name(arch)
        done = folder / "metrics.json"
        if done.is_file():  # the model path is re-derived: a run folder may be moved or copied
            real[arch] = {**json.loads(done.read_text()), "model": str(folder / "model")}
            continue
        say(f"approximate: short distillation {i}/{len(archs)}: {arch}")
        got = run_training(short_train_config(cfg, str(cand_dir / folder_name(arch)), folder))
        metrics = {"val_loss_before": first_metric(got, "initial_val_loss"), "val_loss_after": first_metric(got, "val_loss"),
                   "model": str(folder / "model")}
        with atomic_file(done) as tmp:
            Path(tmp).write_text(json.dumps(metrics))
        for spent in ("checkpoints", "ray_results"):  # the model and its metrics are kept; resuming needs no more
            shutil.rmtree(folder / spent, ignore_errors=True)
        real[arch] = metrics
    rows, family, agreement, before = [], {}, {}, {}
    for b in budgets:
        cands = top.get(b.label, [])
        for rank, c in enumerate(cands):
            m = real[c.arch]
            rows.append({"budget": b.label, "budget_value": b.value, "unit": b.unit, "approx_rank": rank,
                         "arch": c.arch, "params": c.params, "cost": c.cost, "summed_block_loss": c.summed_loss,
                         **{k: m[k] for k in ("val_loss_before", "val_loss_after")}, "model": m["model"]})
        if cands:
            best = min(cands, key=lambda c: real[c.arch]["val_loss_after"])
            family[b.label] = {"arch": best.arch, "model": real[best.arch]["model"], "params": best.params,
                               "cost": best.cost, "budget_value": b.value, "unit": b.unit}
            approx_losses = [c.summed_loss for c in cands]
            agreement[b.label] = _tau(approx_losses, [real[c.arch]["val_loss_after"] for c in cands])
            before[b.label] = _tau(approx_losses, [real[c.arch]["val_loss_before"] for c in cands])
        else:
            say(f"approximate: no assembled model fits budget {b.label} (the smallest has {span[0]:,.0f} "
                f"{constraint.unit}; more shrink.bins keep smaller paths)")
    pooled = {c.arch: c.summed_loss for cands in top.values() for c in cands}
    agreement["all"] = _tau(list(pooled.values()), [real[a]["val_loss_after"] for a in pooled])
    before["all"] = _tau(list(pooled.values()), [real[a]["val_loss_before"] for a in pooled])
    _write_candidates(rows, run_dir(cfg) / "candidates.parquet")
    # kendall_tau: vs the loss after the short distillation (what picks the winner); kendall_tau_before: vs the
    # assembled model's own loss before it (how well summed block losses approximate a whole model)
    return {"family": family, "kendall_tau": agreement, "kendall_tau_before": before, "candidates": rows}


def _span(space: Any, hidden: int, survivors: list[list[tuple[tuple[str, ...], float]]],
          constraint: Any) -> tuple[float, float]:
    """Cost of the model made of each block's smallest survivor, and of its largest (by params)."""
    from raynas.blockwise.shrinking import path_params
    from raynas.spaces.layerwise import LayerwiseArch

    def pick(fn: Any) -> LayerwiseArch:
        paths = [fn((p for p, _ in s), key=lambda p: path_params(space, hidden, p)) for s in survivors]
        return LayerwiseArch(hidden, tuple(t for p in paths for t in p))

    return constraint.cost(pick(min)), constraint.cost(pick(max))


def _tau(approx: list[float], real: list[float]) -> float | None:
    """Kendall tau of the two rankings; None with fewer than two candidates."""
    from raynas.blockwise.approximation import rank_agreement

    return float(rank_agreement(approx, real)) if len(approx) >= 2 else None


def _write_candidates(rows: list[dict[str, Any]], path: Path) -> None:
    import pyarrow as pa

    from raynas.tables import to_table, write_parquet

    f64 = pa.float64()
    schema = pa.schema([("budget", pa.string()), ("budget_value", f64), ("unit", pa.string()),
                        ("approx_rank", pa.int32()), ("arch", pa.string()), ("params", pa.int64()), ("cost", f64),
                        ("summed_block_loss", f64), ("val_loss_before", f64), ("val_loss_after", f64),
                        ("model", pa.string())])
    write_parquet(to_table(rows, schema), path)


# ---------------------------------------------------------------- 5. measure


def stage_measure(cfg: NasbertConfig, approx: dict[str, Any]) -> dict[str, Any]:
    """Load each family model with ``AutoModel``, run it, and time it interleaved with the teacher."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    import raynas  # noqa: F401  (registers the raynas model type with AutoModel)
    from raynas.evaluation.latency import compare_latency
    from raynas.model_card import set_card_latency
    from raynas.teachers import resolve_teacher

    family = approx["family"]
    paths = sorted({f["model"] for f in family.values()})
    loaded = {}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the saved MLM head is "unexpected" for AutoModel: expected, not news
    try:
        for p in paths:
            model = AutoModel.from_pretrained(p).eval()
            with torch.no_grad():
                out = model(input_ids=torch.ones(1, 8, dtype=torch.long))
            loaded[p] = {"model_type": model.config.model_type, "output_shape": list(out.last_hidden_state.shape)}
    finally:
        hf_logging.set_verbosity(verbosity)
    m = cfg.measure
    ref = resolve_teacher(cfg.teacher)
    say(f"measure: {len(paths)} model(s) against the teacher, batch {m.batch_size} x {m.seq_len}, "
        f"{m.threads} thread(s), {m.repeats} interleaved repeats")
    timed = {r["model"]: r for r in compare_latency(paths, ref, m.seq_len, m.batch_size, m.threads,
                                                    repeats=m.repeats)}
    rows = []
    for label, f in family.items():
        t = timed[f["model"]]
        rows.append({"budget": label, **f, **loaded[f["model"]], "measured_params": int(t["params"]),
                     "latency_ms": t["latency_ms"], "speedup": t["speedup"],
                     "within_budget": bool(f["cost"] <= f["budget_value"])})
        set_card_latency(f["model"], {"latency_ms": t["latency_ms"], "latency_p90_ms": t.get("latency_p90_ms"),
                                      "speedup": t["speedup"], "reference": cfg.teacher,
                                      "reference_ms": timed[ref]["latency_ms"], "batch_size": m.batch_size,
                                      "seq_len": m.seq_len, "threads": m.threads})
    return {"models": rows, "teacher_ms": timed[ref]["latency_ms"], "teacher_params": int(timed[ref]["params"])}


# ---------------------------------------------------------------- 6. report


def block_timeline(stages_path: str) -> list[dict[str, Any]]:
    """Per block: when its first stage started and its last finished, and its stage count (seconds from the
    earliest start), plus ``overlap_s``: how long every block was training at once."""
    import pandas as pd

    df = pd.read_parquet(stages_path).drop_duplicates(["block", "stage"])
    t0 = df.started_at.min()
    rows = [{"block": int(k), "stages": int(len(g)), "start_s": (g.started_at.min() - t0).total_seconds(),
             "end_s": (g.finished_at.max() - t0).total_seconds()} for k, g in df.groupby("block")]
    overlap = min(r["end_s"] for r in rows) - max(r["start_s"] for r in rows)
    for r in rows:
        r["overlap_s"] = max(0.0, overlap)
    return rows


def survivor_counts(stages_path: str) -> list[dict[str, Any]]:
    """Per block, stage and bin: paths scored and paths kept."""
    import pandas as pd

    df = pd.read_parquet(stages_path)
    g = df.groupby(["block", "stage", "bin"]).agg(scored=("path", "size"), kept=("kept", "sum")).reset_index()
    return [{k: int(v) for k, v in r.items()} for r in g.to_dict("records")]


def stage_report(cfg: NasbertConfig, blocks: dict[str, Any], approx: dict[str, Any],
                 measured: dict[str, Any]) -> dict[str, Any]:
    """``RUN/family.parquet`` and ``RUN/report.md``: the family, the shrinking, the ranking agreement, the timeline."""
    import pyarrow as pa

    from raynas.atomic_io import atomic_file
    from raynas.tables import to_table, write_parquet

    rows = measured["models"]
    f64 = pa.float64()
    schema = pa.schema([("budget", pa.string()), ("budget_value", f64), ("unit", pa.string()), ("arch", pa.string()),
                        ("model", pa.string()), ("model_type", pa.string()), ("params", pa.int64()),
                        ("cost", f64), ("within_budget", pa.bool_()), ("latency_ms", f64), ("speedup", f64),
                        ("teacher_ms", f64)])
    table = to_table([{k: r.get(k) for k in schema.names if k != "teacher_ms"} | {"teacher_ms": measured["teacher_ms"],
                       "params": r["measured_params"]} for r in rows], schema)
    family_path = write_parquet(table, run_dir(cfg) / "family.parquet")
    counts, timeline = survivor_counts(blocks["stages"]), block_timeline(blocks["stages"])
    by_arch = {c["arch"]: c for c in approx["candidates"]}
    lines = [f"# NAS-BERT family: {cfg.teacher}, {cfg.blocks} blocks", "",
             f"Teacher: {measured['teacher_params']:,} params, {measured['teacher_ms']:.2f} ms "
             f"(batch {cfg.measure.batch_size} x {cfg.measure.seq_len}, {cfg.measure.threads} thread(s)).", "",
             "| budget | arch | params | within | summed block loss | val loss after short KD | ms | speedup | type |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = by_arch.get(r["arch"], {})
        lines.append(f"| {r['budget']} | `{r['arch']}` | {r['measured_params'] / 1e6:.2f} M | "
                     f"{'yes' if r['within_budget'] else 'NO'} | {c.get('summed_block_loss', math.nan):.4f} | "
                     f"{c.get('val_loss_after') or math.nan:.4f} | {r['latency_ms']:.2f} | {r['speedup']:.2f}x | "
                     f"{r['model_type']} |")
    lines += ["", "## Ranking agreement (Kendall tau) of the summed block loss with the whole model's validation loss",
              "", "| budget | before the short distillation | after it |", "|---|---|---|"]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    before = approx.get("kendall_tau_before", {})
    lines += [f"| {k} | {fmt(before.get(k))} | {fmt(v)} |" for k, v in approx["kendall_tau"].items()]
    lines += ["", "## Survivors per block, stage and bin (scored -> kept)", "", "| block | stage | bins |", "|---|---|---|"]
    for (k, s) in sorted({(c["block"], c["stage"]) for c in counts}):
        cells = ", ".join(f"{c['scored']}->{c['kept']}" for c in counts if c["block"] == k and c["stage"] == s)
        lines.append(f"| {k} | {s} | {cells} |")
    lines += ["", "## Block timeline (seconds from the first block's start)", "",
              "| block | stages | start | end |", "|---|---|---|---|"]
    lines += [f"| {t['block']} | {t['stages']} | {t['start_s']:.0f} | {t['end_s']:.0f} |" for t in timeline]
    if timeline:
        lines += ["", f"All {len(timeline)} blocks were training at once for {timeline[0]['overlap_s']:.0f} s."]
    report = run_dir(cfg) / "report.md"
    with atomic_file(report) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")
    return {"family": str(family_path), "report": str(report), "timeline": timeline, "counts": len(counts)}
