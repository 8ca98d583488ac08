"""raynas bench: benchmarks.

    raynas bench supernet                                  # 8 archs of autotinybert-mlm, batch 8 x 128
    raynas bench supernet --space nas-bert --archs 6
    raynas bench supernet --supernet runs/supernet --threads 4 --out runs/bench/mine.parquet
    raynas bench train                                     # supernet-tiny.yaml, 20 steps, 1 and 2 workers
    raynas bench train --config recipes/configs/supernet-tiny.yaml --steps 30 --workers 1,2,4 --no-deepspeed
    raynas bench fitness                                   # 100 archs of autotinybert-mlm, 2 batches of 8 x 128
    raynas bench fitness --supernet runs/supernet --archs 200 --batches 4
    raynas bench ranking --supernet runs/supernet-tiny/supernet --config recipes/configs/supernet-tiny.yaml
    raynas bench ranking --supernet DIR --config YAML --archs 10 --steps 120 --workers 2 --deepspeed lr=5e-4
    raynas bench search --supernet runs/supernet-tiny/supernet --predictor runs/latency-tiny/predictor \
        --out runs/bench-search budgets='[1.5x,2x,3x]' population=10 corpus.seq_len=64

``supernet`` times one MLM training step (zero_grad, forward, backward) of a
supernet's active path against the extracted standalone model on the same
batch, for archs sampled from the space, and reports the ratio of the two
(1.0: weight sharing costs nothing per step).

``fitness`` scores archs by validation MLM loss (the search's proxy fitness)
through one shared supernet, and again by extracting each arch, and reports
both wall times and the largest disagreement.

``train`` measures training throughput on Ray Train: the supernet (M sampled
sub-models per batch per worker) against its largest sub-model trained alone as
a plain transformers model, same data and engine, at each worker count.

``ranking`` trains K archs of a trained supernet stand-alone from scratch (same
data, objective and budget each) and compares their validation-loss ranking
with the supernet's proxy ranking: pairwise ranking accuracy (AutoTinyBERT
Appendix E: 96.7 %) and Kendall tau. It tells whether to trust the supernet
before spending on search.

``search`` runs evolution and random search with the same budgets and number of
evaluations for several seeds on the same validation batches, and reports the
best feasible proxy loss per budget and the hypervolume of each run's front.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa

from raynas.cli import add_dry_run, dry_run_done, run_recipe
from raynas.errors import ConfigError
from raynas.tables import to_table, write_parquet

DEFAULT_SPACE = "autotinybert-mlm"
DEFAULT_TRAIN_CONFIG = Path(__file__).resolve().parent / "configs" / "supernet-tiny.yaml"
SUPERNET_SCHEMA = pa.schema([
    ("arch", pa.string()), ("params", pa.int64()), ("supernet_ms", pa.float64()), ("extracted_ms", pa.float64()),
    ("ratio", pa.float64()), ("batch", pa.int32()), ("seq_len", pa.int32()), ("threads", pa.int32()),
    ("space", pa.string()),
])
SEARCH_SCHEMA = pa.schema([
    ("strategy", pa.string()), ("seed", pa.int64()), ("budget", pa.string()), ("budget_value", pa.float64()),
    ("best_loss", pa.float64()), ("best_arch", pa.string()), ("evaluations", pa.int64()), ("hypervolume", pa.float64()),
])
SEARCH_SUMMARY_SCHEMA = pa.schema([
    ("strategy", pa.string()), ("budget", pa.string()), ("mean", pa.float64()), ("std", pa.float64()),
    ("seeds", pa.int64()), ("wins", pa.int64()), ("better", pa.string()),
])
FITNESS_SCHEMA = pa.schema([
    ("arch", pa.string()), ("params", pa.int64()), ("shared_loss", pa.float64()), ("extracted_loss", pa.float64()),
    ("abs_diff", pa.float64()),
])


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="raynas bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Run 'raynas bench BENCHMARK --help' for a benchmark's options.")
    sub = p.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    s = sub.add_parser(
        "supernet", help="training-step time: supernet active path vs the extracted model",
        description="Time one MLM training step (zero_grad, forward with labels, backward) of the supernet's "
                    "active path and of the extracted standalone model, on the same seeded random batch, in train "
                    "mode, interleaved (warmup steps, then REPEATS rounds alternating which model goes first). "
                    "Prints one progress line per arch on stderr, then a table and the median ratio "
                    "supernet_ms / extracted_ms on stdout, and writes the table as Parquet.",
    )
    _supernet_args(s, archs=8, out="runs/bench/supernet.parquet")
    s.add_argument("--repeats", type=int, default=5, help="timed steps per model and arch; the median counts (default: 5)")
    s.add_argument("--warmup", type=int, default=1, help="untimed steps per model and arch first (default: 1)")
    add_dry_run(s)
    s.set_defaults(run=bench_supernet)

    f = sub.add_parser(
        "fitness", help="proxy fitness of N archs: one shared supernet vs extracting each",
        description="Score N archs sampled from the space (the largest and smallest included) by validation MLM "
                    "loss on seeded batches, once through one shared supernet (forward(arch=), batch-major) and "
                    "once by extracting each arch and evaluating the extracted model alone. Prints progress on "
                    "stderr, then both wall times, their ratio and the largest loss difference, and writes the "
                    "per-arch table as Parquet.",
    )
    _supernet_args(f, archs=100, out="runs/bench/fitness.parquet")
    f.add_argument("--batches", type=int, default=2, help="validation batches (default: 2)")
    add_dry_run(f)
    f.set_defaults(run=bench_fitness)

    t = sub.add_parser(
        "train", help="training tokens/s: supernet (M sub-models per batch) vs its largest sub-model alone, 1 vs N workers",
        description="Train, in one process on one Ray instance, the supernet of a TrainConfig and its largest "
                    "sub-model as a plain masked LM (extracted with the same seed, exported as a transformers "
                    "folder), with the same corpus, seq_len, global batch, steps and engine (DeepSpeed or DDP), at "
                    "each worker count. Each run gets a fresh OUT/<config>-<W>w folder (no resume); checkpoints "
                    "and evaluations happen only at the last step, after its rate is taken. Prints a table and "
                    "writes it as OUT/bench_train.parquet. tokens_per_s is the run's steady rate (steps 2..N) "
                    "counting every sub-model's tokens on every worker; sequences_per_s divides out the "
                    "passes per sequence (M for the supernet, 1 for plain); ratio_vs_plain is tokens/s over the "
                    "plain model's at the same worker count (read it with mean_params: sampled sub-models are "
                    "smaller than the largest); scaling is tokens/s over the same config's at the fewest workers.",
    )
    t.add_argument("--config", default=str(DEFAULT_TRAIN_CONFIG),
                   help="TrainConfig YAML with a space or init_from (default: recipes/configs/supernet-tiny.yaml)")
    t.add_argument("--steps", type=int, default=20, help="optimizer steps per run, >= 2 (default: 20)")
    t.add_argument("--workers", default="1,2", help="comma-separated worker counts (default: 1,2)")
    t.add_argument("--per-worker", type=int, metavar="M",
                   help="sub-models per batch per worker (sampler.per_worker; default: the config's)")
    t.add_argument("--no-deepspeed", action="store_true", help="DDP instead of DeepSpeed (deepspeed.enabled=false)")
    t.add_argument("--out", default="runs/bench-train",
                   help="folder for the runs and bench_train.parquet (default: runs/bench-train)")
    t.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted TrainConfig overrides, e.g. batch_size=16 corpus.seq_len=128 deepspeed.zero_stage=1")
    add_dry_run(t)
    t.set_defaults(run=bench_train)

    r = sub.add_parser(
        "ranking", help="ranking fidelity: supernet proxy loss vs stand-alone training of K archs",
        description="Pick K archs of a trained supernet spread over sizes (the smallest, the largest, the rest "
                    "closest to evenly spaced encoder-parameter targets; seeded), score each by its validation loss "
                    "with inherited weights (the search's proxy fitness), then train each stand-alone from a random "
                    "init (extracted from a fresh supernet of the same config, seeded) with the config's corpus, "
                    "objective, batch size, lr and steps through the same Ray Train engine, and score it on the same "
                    "validation batches. Prints progress (arch i/K, ETA) on stderr, then the per-arch table, the "
                    "pairwise ranking accuracy and Kendall tau; writes OUT/ranking.parquet and OUT/ranking.json. "
                    "A finished stand-alone run in OUT/standalone/ARCH is reused on a rerun, an interrupted one "
                    "resumes from its checkpoint; a rerun with other settings into the same OUT is refused.",
    )
    r.add_argument("--supernet", required=True, metavar="DIR", help="the trained supernet folder (OUT/supernet of a run)")
    r.add_argument("--config", required=True, metavar="YAML",
                   help="the TrainConfig YAML the supernet was trained with (same space, corpus and objective)")
    r.add_argument("--archs", type=int, default=8, metavar="K", help="archs to train stand-alone, >= 3 (default: 8)")
    r.add_argument("--steps", type=int, help="optimizer steps per stand-alone run (default: the config's)")
    r.add_argument("--workers", type=int, default=1, help="Ray Train workers per stand-alone run (default: 1)")
    r.add_argument("--deepspeed", action="store_true",
                   help="train with the config's DeepSpeed settings (default: DDP, deepspeed.enabled=false)")
    r.add_argument("--val-batches", type=int, default=16, metavar="N",
                   help="validation batches of batch_size rows that every model is scored on; fewer when the "
                        "validation split is smaller (default: 16)")
    r.add_argument("--seed", type=int, default=0, help="seeds the arch choice, the random init and the validation "
                                                      "masks (default: 0)")
    r.add_argument("--out", default="runs/bench-ranking",
                   help="folder for the runs, ranking.parquet and ranking.json (default: runs/bench-ranking)")
    r.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted TrainConfig overrides for the stand-alone runs, e.g. batch_size=16 lr=5e-4")
    add_dry_run(r)
    r.set_defaults(run=bench_ranking)

    q = sub.add_parser(
        "search", help="evolution vs random search at equal evaluations, over seeds",
        description="For each seed, run raynas search with strategy evolution and with strategy random (the same "
                    "budgets, generations and population, so the same number of evaluations), every run scored on "
                    "the same validation batches and kept in OUT/<strategy>-seed<S> (a rerun resumes). Prints per "
                    "budget the best feasible proxy loss of every run, the hypervolume of each run's (predicted "
                    "latency, loss) front against one shared reference point, and mean, std and wins over seeds; "
                    "writes OUT/bench_search.parquet (per run and budget) and OUT/bench_search_summary.parquet.",
    )
    q.add_argument("--supernet", required=True, metavar="DIR", help="trained supernet folder")
    q.add_argument("--predictor", metavar="DIR", help="latency predictor folder (raynas latency); for constraint=latency")
    q.add_argument("--out", default="runs/bench-search", help="folder for the runs and tables (default: runs/bench-search)")
    q.add_argument("--config", metavar="YAML", help="SearchConfig YAML (budgets, generations, population, corpus ...)")
    q.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: 0,1,2)")
    q.add_argument("overrides", nargs="*", metavar="key=value", help="SearchConfig overrides, e.g. budgets='[2x,4x]'")
    add_dry_run(q)
    q.set_defaults(run=bench_search)
    return p.parse_args(argv)


def _supernet_args(p: argparse.ArgumentParser, archs: int, out: str) -> None:
    """The options ``supernet`` and ``fitness`` share: which supernet, how many archs, batch shape, seed, threads."""
    src = p.add_mutually_exclusive_group()
    src.add_argument("--space", help=f"search space: a shipped name or a YAML path (default: {DEFAULT_SPACE}); "
                                     "the supernet is randomly initialised from it (seeded by --seed)")
    src.add_argument("--supernet", metavar="DIR", help="load this saved supernet folder instead (its own space)")
    p.add_argument("--archs", type=int, default=archs, metavar="N", help=f"archs sampled from the space (default: {archs})")
    p.add_argument("--batch", type=int, default=8, help="sequences per batch (default: 8)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default: 128)")
    p.add_argument("--seed", type=int, default=0, help="seeds arch sampling, the batches and the random init (default: 0)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--out", default=out, help=f"Parquet table to write (default: {out})")


def _positive(args: argparse.Namespace, *names: str, least: int = 1) -> None:
    for name in names:
        value = getattr(args, name.replace("-", "_"))
        if value is not None and value < least:
            what = "a positive integer" if least == 1 else f"an integer >= {least}"
            raise ConfigError(f"--{name}: expected {what}, got {value}")


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as aligned text, widest arch first column."""
    head = ("arch", "params", "supernet_ms", "extracted_ms", "ratio")
    cells = [(r["arch"], f"{r['params']:,}", f"{r['supernet_ms']:.1f}", f"{r['extracted_ms']:.1f}", f"{r['ratio']:.3f}")
             for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *cells, strict=True)]
    lines = ["  ".join(str(c).ljust(w) if j == 0 else str(c).rjust(w) for j, (c, w) in enumerate(zip(line, widths, strict=True)))
             for line in (head, *cells)]
    return "\n".join(lines)


def _check_out(args: argparse.Namespace, table: bool) -> None:
    """``--out`` (a Parquet file when ``table``, else a folder) can be written: checked before any work."""
    from raynas.atomic_io import check_writable

    check_writable(Path(args.out).parent if table else args.out, "--out")


def _dry_run(args: argparse.Namespace, plan: str) -> int:
    """The source checked without building it (a fresh supernet of a shipped space is BERT-base sized), then done."""
    if getattr(args, "supernet", None) is not None:
        from raynas.supernet import load_supernet

        load_supernet(args.supernet)
    elif hasattr(args, "space"):
        from raynas.spaces import load_space

        load_space(args.space or DEFAULT_SPACE)
    return dry_run_done(f"raynas bench {args.bench}", plan)


def _supernet(args: argparse.Namespace) -> Any:
    """The supernet of ``--supernet`` or a seeded fresh one of ``--space``; sets ``--threads``."""
    import torch

    from raynas.spaces import load_space
    from raynas.supernet import Supernet, load_supernet

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.supernet is not None:
        if not Path(args.supernet).is_dir():
            raise ConfigError(f"--supernet {args.supernet}: no such folder")
        return load_supernet(args.supernet)
    space = load_space(args.space or DEFAULT_SPACE)
    torch.manual_seed(args.seed)
    return Supernet.from_space(space)


def bench_fitness(args: argparse.Namespace) -> int:
    _positive(args, "batches", "batch", "seq-len", "threads")
    _positive(args, "archs", least=2)
    _check_out(args, table=True)
    if args.dry_run:
        return _dry_run(args, f"{args.archs} archs x {args.batches} batches of {args.batch} x {args.seq_len}")
    import torch

    from raynas.benchmarks.proxy_fitness import bench_proxy_fitness, mlm_batches

    net = _supernet(args)
    space = net.space
    if args.seq_len > space.embeddings.max_position_embeddings:
        raise ConfigError(f"--seq-len {args.seq_len}: the space has {space.embeddings.max_position_embeddings} "
                          "positions")
    rng = random.Random(args.seed)
    archs = [space.largest(), space.smallest(), *(space.sample(rng) for _ in range(args.archs - 2))]
    batches = mlm_batches(space.embeddings.vocab_size, args.batches, args.batch, args.seq_len, args.seed)
    print(f"space {space.name}: {len(archs)} archs, {args.batches} batches of {args.batch} x {args.seq_len}, "
          f"{torch.get_num_threads()} threads", file=sys.stderr, flush=True)
    rows, summary = bench_proxy_fitness(net, archs, batches, progress=lambda s: print(s, file=sys.stderr, flush=True))
    out = write_parquet(to_table(rows, FITNESS_SCHEMA), args.out)
    print(f"{'path':<28}{'wall s':>10}{'ms / arch':>12}")
    for name, key in (("shared supernet", "shared_s"), ("extract + evaluate each", "extracted_total_s"),
                      ("  of which extraction", "extract_s")):
        print(f"{name:<28}{summary[key]:>10.2f}{1000 * summary[key] / len(archs):>12.1f}")
    print(f"extracted / shared: {summary['speedup']:.2f}x; max |loss difference| {summary['max_abs_diff']:.2e} "
          f"over {len(archs)} archs")
    print(f"wrote {out}", file=sys.stderr)
    return 0


def bench_supernet(args: argparse.Namespace) -> int:
    _positive(args, "archs", "batch", "seq-len", "repeats", "threads")
    _positive(args, "warmup", least=0)
    _check_out(args, table=True)
    if args.dry_run:
        return _dry_run(args, f"{args.archs} archs, batch {args.batch} x {args.seq_len}, {args.repeats} repeats")
    import torch

    from raynas.benchmarks import bench_step_time

    net = _supernet(args)
    space = net.space  # bench_step_time checks --seq-len against the space's positions
    rng = random.Random(args.seed)
    archs = [space.sample(rng) for _ in range(args.archs)]
    print(f"space {space.name}: {len(archs)} archs, batch {args.batch} x {args.seq_len}, {args.repeats} repeats "
          f"after {args.warmup} warmup, {torch.get_num_threads()} threads", file=sys.stderr, flush=True)

    def progress(i: int, row: dict[str, Any]) -> None:
        print(f"[{i}/{len(archs)}] {row['arch']}  {row['params']:,} params  supernet {row['supernet_ms']:.1f} ms  "
              f"extracted {row['extracted_ms']:.1f} ms  ratio {row['ratio']:.3f}", file=sys.stderr, flush=True)

    rows = bench_step_time(net, archs, batch=args.batch, seq_len=args.seq_len, repeats=args.repeats,
                           warmup=args.warmup, seed=args.seed, progress=progress)
    out = write_parquet(to_table(rows, SUPERNET_SCHEMA), args.out)
    print(format_table(rows))
    print(f"median ratio (supernet / extracted): {statistics.median(r['ratio'] for r in rows):.3f} over {len(rows)} archs")
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _workers(text: str) -> list[int]:
    try:
        ws = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        ws = []
    if not ws or any(w < 1 for w in ws):
        raise ConfigError(f"--workers {text!r}: expected comma-separated positive integers, e.g. 1,2")
    return ws


def bench_train(args: argparse.Namespace) -> int:
    _positive(args, "per-worker")
    _positive(args, "steps", least=2)
    workers = _workers(args.workers)
    from raynas.benchmarks.train_throughput import TABLE_FILE, format_table, write_table
    from raynas.benchmarks.train_throughput import bench_train as run_bench
    from raynas.config_loading import load_config
    from raynas.orchestration.supernet_training import TrainConfig

    overrides = list(args.overrides) + [f"steps={args.steps}"]
    if args.per_worker is not None:
        overrides.append(f"sampler.per_worker={args.per_worker}")
    if args.no_deepspeed:
        overrides.append("deepspeed.enabled=false")
    cfg = load_config(TrainConfig, args.config, overrides)
    _check_out(args, table=False)
    if args.dry_run:
        from raynas.orchestration.supernet_training import preflight

        preflight(cfg)
        return _dry_run(args, f"{cfg.steps} steps at {workers} worker(s), supernet and its largest sub-model")

    def progress(row: dict[str, Any]) -> None:
        print(f"bench train: {row['config']} x{row['workers']}: {row['tokens_per_s']:,.0f} tokens/s "
              f"({row['sequences_per_s']:.2f} seq/s), run {row['wall_s']:.1f} s", file=sys.stderr, flush=True)

    df = run_bench(cfg, workers, args.out, progress=progress)
    out = write_table(df, Path(args.out) / TABLE_FILE)
    first = df.iloc[0]
    print(f"{first['space']}: largest {first['largest']}, {first['engine']}, {first['steps']} steps, global batch "
          f"{first['batch_size']} x {first['seq_len']} tokens")
    print(format_table(df))
    print(f"wrote {out}", file=sys.stderr)
    return 0


def bench_ranking(args: argparse.Namespace) -> int:
    _positive(args, "steps", "workers", "val-batches")
    _positive(args, "archs", least=3)
    from raynas.benchmarks.ranking import bench_ranking as run_bench
    from raynas.benchmarks.ranking import format_summary, format_table
    from raynas.config_loading import load_config
    from raynas.training.config import TrainConfig

    overrides = [*args.overrides, f"num_workers={args.workers}", f"deepspeed.enabled={str(args.deepspeed).lower()}"]
    if args.steps is not None:
        overrides.append(f"steps={args.steps}")
    cfg = load_config(TrainConfig, args.config, overrides)
    _check_out(args, table=False)
    if not Path(args.supernet).is_dir():
        raise ConfigError(f"--supernet {args.supernet}: no such folder")
    if args.dry_run:
        return _dry_run(args, f"{args.archs} archs trained stand-alone for {cfg.steps} steps each")
    rows, summary = run_bench(cfg, args.supernet, args.out, k=args.archs, seed=args.seed, val_batches=args.val_batches)
    print(format_table(rows))
    print(format_summary(summary))
    print(f"wrote {Path(args.out) / 'ranking.parquet'} and ranking.json", file=sys.stderr)
    return 0


def bench_search(args: argparse.Namespace) -> int:
    import pandas as pd

    from raynas.benchmarks.search_strategies import compare_strategies, summarize
    from raynas.config_loading import load_config
    from raynas.orchestration.search_tune import corpus_validation_batches
    from raynas.search.config import SearchConfig
    from raynas.search.constraints import Constraint
    from raynas.supernet import load_supernet, load_supernet_tokenizer

    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--seeds: expected comma-separated integers, got {args.seeds!r}") from None
    if not seeds:
        raise ConfigError("--seeds: give at least one seed")
    cfg = load_config(SearchConfig, args.config, args.overrides)
    net = load_supernet(args.supernet)
    predictor = None
    if args.predictor:
        from raynas.search.predictor import LatencyPredictor

        predictor = LatencyPredictor.load(args.predictor)
    constraint = Constraint(net.space, cfg.constraint, predictor, seq_len=cfg.seq_len)
    constraint.budgets(cfg.budgets)  # every budget checked before Ray starts
    _check_out(args, table=False)
    if args.dry_run:
        return _dry_run(args, f"evolution and random search, seeds {seeds}, budgets {cfg.budgets}")
    out = Path(args.out)
    batches = corpus_validation_batches(cfg, load_supernet_tokenizer(args.supernet), out)
    per_budget, per_run = compare_strategies(args.supernet, constraint, cfg, out, batches, seeds=seeds,
                                             progress=lambda line: print(line, file=sys.stderr, flush=True))
    summary = summarize(per_budget, per_run)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(pd.DataFrame(per_budget).drop(columns=["budget_value"]).to_string(index=False))
        print(pd.DataFrame(per_run).to_string(index=False))
        print(pd.DataFrame(summary).to_string(index=False))
    runs = {(r["strategy"], r["seed"]): r for r in per_run}
    write_parquet(to_table([{**r, "hypervolume": runs[r["strategy"], r["seed"]]["hypervolume"]} for r in per_budget],
                           SEARCH_SCHEMA), out / "bench_search.parquet")
    write_parquet(to_table(summary, SEARCH_SUMMARY_SCHEMA), out / "bench_search_summary.parquet")
    print(f"wrote {out / 'bench_search.parquet'} and bench_search_summary.parquet", file=sys.stderr)
    return 0


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(run_recipe(main, sys.argv[1:], "raynas bench"))
