"""raynas evaluate: fine-tune models on GLUE / SQuAD as a Ray Tune sweep, then report the family.

    raynas evaluate --config recipes/configs/evaluate-quick.yaml
    raynas evaluate --models runs/family/*/ --tasks sst2 qnli --data-dir ../shared/data/glue --reference teacher/
    raynas evaluate --config recipes/configs/evaluate-glue.yaml models='[a, b]' search.lr='[2e-5]'

Every trial lands in OUT/trials.parquet, the best setting per (model, task) in
OUT/best.parquet, and the family table (params, CPU latency and speedup vs the
reference, task scores, GLUE averages) in OUT/report.{md,parquet} with
OUT/score_vs_speedup.png. Runs on a local Ray (a laptop) or the cluster that
`ray job submit` points it at.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from raynas.atomic_io import check_writable
from raynas.cli import add_dry_run, dry_run_done, run_recipe
from raynas.config_loading import load_config
from raynas.errors import ConfigError
from raynas.orchestration.finetune_sweep import TRIAL_SCHEMA, SweepConfig, best_per_task, run_sweep
from raynas.tables import to_table, write_parquet


@dataclass
class LatencyConfig:
    """AutoTinyBERT's protocol: CPU, batch 1, sequence length 128, interleaved rounds.

    ``device: cuda`` times on the driver's GPU instead (synchronized around each forward);
    speedups are then GPU speedups, which differ from the papers' CPU ones.
    """

    enabled: bool = True
    device: str = "cpu"
    seq_len: int = 128
    batch_size: int = 1
    threads: int | None = None
    repeats: int = 20


@dataclass
class EvaluateConfig(SweepConfig):
    out: str = "runs/evaluate"
    reference: str | None = None  # speedups are relative to it (the teacher); default: the first model
    title: str = "raynas model family"
    latency: LatencyConfig = field(default_factory=LatencyConfig)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="raynas evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--config", help="YAML config (fields of EvaluateConfig); flags and key=value override it")
    p.add_argument("--models", nargs="+", help="model folders or hub names")
    p.add_argument("--tasks", nargs="+", help="cola sst2 mrpc stsb qqp mnli_m mnli_mm qnli rte wnli squad squad_v2")
    p.add_argument("--data-dir", help="GLUE TSV folders (SST-2/ ...) or SQuAD JSON folder; default: the hub")
    p.add_argument("--reference", help="model the speedups are measured against (default: the first model)")
    p.add_argument("--out", help="output folder (default: runs/evaluate)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides anywhere on the line, e.g. search.lr='[2e-5]'")
    add_dry_run(p)
    # key=value tokens are overrides wherever they stand (--tasks a b would otherwise swallow them)
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    args = p.parse_args([a for a in argv if a not in overrides])
    args.overrides = overrides
    return args


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    flags = {k: v for k, v in {"models": args.models, "tasks": args.tasks, "data_dir": args.data_dir,
                               "reference": args.reference, "out": args.out}.items() if v is not None}
    cfg = load_config(EvaluateConfig, args.config, [*args.overrides, *(_as_override(k, v) for k, v in flags.items())])
    out = check_writable(cfg.out, "out")
    from raynas.orchestration.finetune_sweep import check_same_sweep, preflight
    from raynas.run_lock import check_run_lock, run_lock

    tasks = preflight(cfg)  # every check before the lock creates the folder: bad input leaves nothing
    check_same_sweep(cfg, out)
    check_run_lock(out)
    if args.dry_run:
        return dry_run_done("raynas evaluate", f"{len(cfg.models)} model(s) x tasks {tasks} into {out}")
    with run_lock(out):  # one writer per folder: a second sweep here would restore and run the same trials
        return evaluate(cfg, out, tasks)


def evaluate(cfg: EvaluateConfig, out: Path, tasks: list[str]) -> int:
    """The sweep, its tables and the family report (under the folder's lock)."""
    rows = run_sweep(cfg, out, tasks)
    write_parquet(to_table(rows, TRIAL_SCHEMA), out / "trials.parquet")
    best = best_per_task(rows)
    write_parquet(to_table(best, TRIAL_SCHEMA), out / "best.parquet")
    failed = [r for r in rows if r["status"] != "ok"]
    print(f"{len(rows)} trial(s), {len(failed)} failed; best per task in {out / 'best.parquet'}", file=sys.stderr)
    if not best:
        raise ConfigError(f"no trial finished; see {out / 'trials.parquet'} (first error: {failed[0]['error']})")

    family = family_rows(cfg, best)
    from raynas.evaluation.report import family_report

    files = family_report(family, out, title=cfg.title, reference=cfg.reference or cfg.models[0])
    print(Path(files["markdown"]).read_text() if "markdown" in files else "")
    print(f"wrote {', '.join(str(p) for p in files.values())}", file=sys.stderr)
    return 0


def family_rows(cfg: EvaluateConfig, best: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per model: size, measured latency and speedup, best score per task in percent."""
    from raynas.evaluation.latency import compare_latency, measure_latency
    from raynas.evaluation.report import score_scale

    reference = cfg.reference or cfg.models[0]
    models = list(dict.fromkeys([*cfg.models, reference]))
    if cfg.latency.enabled:
        measured = compare_latency(models, reference=reference, seq_len=cfg.latency.seq_len,
                                   batch_size=cfg.latency.batch_size, threads=cfg.latency.threads,
                                   repeats=cfg.latency.repeats, device=cfg.latency.device)
        by_model = {r["model"]: r for r in measured}
    else:
        by_model = {m: {"params": measure_latency(m, repeats=1, warmup=0)["params"]} for m in models}
    resolved = {str(Path(m).resolve()) if Path(m).exists() else m: m for m in models}
    rows = []
    for model in models:
        row: dict[str, Any] = {"model": model, "params": by_model[model]["params"],
                               "latency_ms": by_model[model].get("latency_ms", float("nan")),
                               "speedup": by_model[model].get("speedup", float("nan"))}
        for r in best:
            if resolved.get(r["model"], r["model"]) == model:
                row[r["task"]] = r["score"] * score_scale(r["task"])
        rows.append(row)
    return rows


def _as_override(key: str, value: Any) -> str:
    if isinstance(value, list):
        return f"{key}=[{', '.join(_quote(v) for v in value)}]"
    return f"{key}={_quote(value)}"


def _quote(value: Any) -> str:
    return "'" + str(value).replace("'", "''") + "'"


if __name__ == "__main__":
    sys.exit(run_recipe(main, sys.argv[1:], "raynas evaluate"))
