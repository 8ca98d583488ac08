"""raynas nasbert: NAS-BERT block-wise search: teacher pairs -> K blocks shrunk on Ray Tune -> a family by budget.

    raynas nasbert                                                    # offline demo (MiniLM teacher, ~11 min on 2 CPUs)
    raynas nasbert --config recipes/configs/nasbert-tiny.yaml out=runs/mine "approx.budgets=[15M,18M]"
    raynas nasbert --config recipes/configs/nasbert-paper.yaml       # BERT-base teacher, 4 x 6 op-layers, GPU cluster
    ray job submit --working-dir . -- raynas nasbert --config recipes/configs/nasbert-tiny.yaml out=/abs/run

One run folder (OUT) holds every stage: init/ (the seeded supernet), pairs/ (the
teacher's hidden states at every block boundary, computed once), blocks/ (each
block's checkpoint, shrink_state.json, stages.parquet: every scored path per
block, bin and stage), supernet/ (the gathered blocks), candidates/ and short/
(the top-T per budget, before and after their short distillation),
candidates.parquet, family.parquet and report.md. Each family model is a
transformers folder (plain bert when expressible) for raynas train / evaluate.
A rerun with the same OUT skips finished stages and resumes an interrupted one
(the shrinking resumes from its saved state and each block's checkpoint); a
changed config for a stage already run is refused (exit 2).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from raynas.cli import add_dry_run, dry_run_done, run_recipe

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "nasbert-tiny.yaml"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="raynas nasbert", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--config", default=str(DEFAULT_CONFIG),
                   help="pipeline YAML (teacher, space, blocks, pairs, shrink, train, approx, short, measure; "
                        "default: the offline demo)")
    p.add_argument("--until", choices=["init", "pairs", "blocks", "approximate", "measure"],
                   help="stop after this stage (a later run with the same OUT goes on from there)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. out=runs/x shrink.steps_per_stage=20 approx.top_t=2")
    add_dry_run(p)
    return p.parse_intermixed_args(argv)  # overrides may come before and after --until


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    from raynas.config_loading import load_config
    from raynas.orchestration.nasbert import NasbertConfig, check, run_dir, run_pipeline

    cfg = load_config(NasbertConfig, args.config, args.overrides)
    if args.dry_run:
        stages, _ = check(cfg, args.until)
        until = f" (until {args.until})" if args.until else ""
        return dry_run_done("raynas nasbert", f"run folder {run_dir(cfg)}{until}: {stages.status()}")
    result = run_pipeline(cfg, args.until)
    if args.until:
        print(f"stopped after stage {args.until!r}: {Path(cfg.out).expanduser().resolve()} (rerun without --until "
              "to go on)")
        return 0
    print(f"{'budget':<8} {'arch':<60} {'params':>11} {'ms':>7} {'speedup':>7}  within")
    for r in result["models"]:
        arch = r["arch"] if len(r["arch"]) <= 60 else r["arch"][:57] + "..."
        print(f"{r['budget']:<8} {arch:<60} {r['measured_params']:>11,} {r['latency_ms']:>7.2f} "
              f"{r['speedup']:>6.2f}x  {'yes' if r['within_budget'] else 'NO'}")
    taus = ", ".join(f"{k} {v:.2f}" for k, v in result["kendall_tau"].items() if v is not None)
    print(f"ranking (Kendall tau, summed block loss vs short distillation): {taus or 'n/a (one candidate)'}")
    print(f"models:  {Path(result['run']) / 'short'} (see family.parquet for each budget's folder)")
    print(f"tables:  {result['family']}, {Path(result['run']) / 'blocks' / 'stages.parquet'}")
    print(f"report:  {result['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(run_recipe(main, sys.argv[1:], "raynas nasbert"))
