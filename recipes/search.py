"""raynas search: the best arch of a trained supernet for each latency (or params / FLOPs) budget, on Ray Tune.

    raynas search --supernet runs/at/supernet --predictor runs/at/latency/predictor --out runs/at/search
    raynas search --supernet DIR --predictor DIR --out DIR budgets='[2x, 4x, 8x]' strategy=random seed=1
    raynas search --supernet DIR --out DIR constraint=params budgets='[20M, 10M]'
    raynas search --supernet DIR --predictor DIR --out DIR --answer 3x 6ms     # from stored rows, no search

AutoTinyBERT's evolutionary search (Algorithm 2: T generations of S archs per
budget, roulette selection on validation loss, mutation and exploration with
probability 1/2), random search, or the AutoTinyBERT-Fast rule. Candidates over
a budget are filtered by the latency predictor before they cost an evaluation;
each trial scores a chunk of archs by the validation loss of the sub-model
inherited from the supernet (put once in Ray's object store). Every evaluated
arch is a row of OUT/evaluated.parquet as soon as its trial completes; a rerun
with the same OUT resumes (nothing evaluated twice). The chosen arch per budget
is printed and written to OUT/chosen.parquet.

Bad input (missing supernet or predictor folder, a budget faster than the
space's smallest arch, unknown keys) is reported in one line, exit 2, before
Ray starts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from raynas.atomic_io import check_writable
from raynas.cli import add_dry_run, dry_run_done, run_recipe
from raynas.config_loading import load_config
from raynas.errors import ConfigError


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="raynas search", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--supernet", required=True, metavar="DIR", help="trained supernet folder (raynas supernet)")
    p.add_argument("--predictor", metavar="DIR",
                   help="latency predictor folder (raynas latency); needed for constraint=latency")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for evaluated.parquet, chosen.parquet")
    p.add_argument("--config", metavar="YAML", help="SearchConfig YAML (default: the paper's settings)")
    p.add_argument("--max-trials", type=int, metavar="N",
                   help="stop after N trials in this run (a rerun with the same --out continues)")
    p.add_argument("--answer", nargs="+", metavar="BUDGET",
                   help="answer these budgets from OUT/evaluated.parquet without searching")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="SearchConfig overrides, e.g. budgets='[2x, 4x]' generations=2 population=10")
    add_dry_run(p)
    return p.parse_args(argv)


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    from raynas.search.config import SearchConfig
    from raynas.search.constraints import Constraint, human
    from raynas.search.results import CHOSEN_FILE, EVALUATED_FILE, format_chosen

    cfg = load_config(SearchConfig, args.config, args.overrides)
    if args.max_trials is not None and args.max_trials < 1:
        raise ConfigError(f"--max-trials: expected a positive integer, got {args.max_trials}")
    if not Path(args.supernet).is_dir():
        raise ConfigError(f"--supernet {args.supernet}: no such folder")
    predictor = None
    if args.predictor is not None:
        if not Path(args.predictor).is_dir():
            raise ConfigError(f"--predictor {args.predictor}: no such folder")
        from raynas.search.predictor import LatencyPredictor

        predictor = LatencyPredictor.load(args.predictor)
    from raynas.supernet import load_supernet, load_supernet_tokenizer

    net = load_supernet(args.supernet)
    constraint = Constraint(net.space, cfg.constraint, predictor, seq_len=cfg.seq_len)
    budgets = constraint.budgets(cfg.budgets)  # every budget checked here, before Ray starts
    if args.answer:
        if args.dry_run:
            return dry_run_done("raynas search", f"answer {args.answer} from {Path(args.out) / EVALUATED_FILE}")
        return answer(args.answer, constraint, Path(args.out))
    check_writable(args.out, "--out")
    if args.dry_run:
        from raynas.run_lock import check_run_lock

        check_run_lock(args.out)
        return dry_run_done("raynas search", f"{cfg.strategy} search in space {net.space.name!r} for budgets "
                                             f"{[b.label for b in budgets]} into {args.out}")

    from raynas.orchestration.search_tune import run_search

    print(f"space {net.space.name}: budgets " + ", ".join(f"{b.label} ({human(b.value, b.unit)})" for b in budgets),
          file=sys.stderr, flush=True)
    run = run_search(cfg, net, constraint, args.out, tokenizer=load_supernet_tokenizer(args.supernet),
                     max_trials=args.max_trials)
    t = run.timing
    if t:
        print(f"evaluation: {t['eval_s_per_arch']:.3f} s per arch ({t['archs']:.0f} archs in {t['trials']:.0f} "
              f"trials); Tune overhead: {t['tune_overhead_s_per_trial']:.2f} s per trial (median "
              f"{t['tune_overhead_s_median']:.2f}), start-up {t['startup_s']:.1f} s, wall {t['wall_s']:.1f} s",
              file=sys.stderr)
    if not run.done:
        print(f"search stopped after {len(run.evaluated)} evaluations (--max-trials); rerun with the same --out "
              "to continue", file=sys.stderr)
        return 0
    print(format_chosen(run.chosen))
    print(f"wrote {Path(args.out) / EVALUATED_FILE} ({len(run.evaluated)} archs) and {Path(args.out) / CHOSEN_FILE}",
          file=sys.stderr)
    return 0


def answer(texts: Sequence[str], constraint: Any, out: Path) -> int:
    """Print the best stored arch for each budget and whether the stored search covers it."""
    from raynas.search.pareto import answer_budget
    from raynas.search.results import EVALUATED_FILE, ResultStore

    path = out / EVALUATED_FILE
    if not path.is_file():
        raise ConfigError(f"{path}: no such file (run the search first)")
    rows = ResultStore(path).rows()
    for text in texts:
        result = answer_budget(rows, constraint.parse_budget(text))
        print(("covered: " if result.covered else "NOT covered: ") + result.reason)
    return 0


if __name__ == "__main__":
    sys.exit(run_recipe(main, sys.argv[1:], "raynas search"))
