"""raynas autotinybert: supernet -> latency predictor -> search -> extract -> further training -> re-measure -> report.

    raynas autotinybert                                                   # offline demo (~10 min on 2 CPUs)
    raynas autotinybert --config recipes/configs/autotinybert-tiny.yaml out=runs/mine search.budgets=[2x,3x]
    raynas autotinybert --config recipes/configs/autotinybert-kd-minilm.yaml      # KD from MiniLM (about an hour)
    ray job submit --working-dir . -- raynas autotinybert --config recipes/configs/autotinybert-tiny.yaml

One run folder (OUT) holds every stage: supernet-train/ (the trained supernet),
latency/ (dataset, predictor, report), search/ (evaluated.parquet, chosen.parquet),
extracted/ and further/ (transformers folders), models.parquet, pareto.png and
report.md. A rerun with the same OUT skips finished stages and resumes an
interrupted one; a changed config for a stage already run is refused (exit 2).
Without --config the embedded offline default (autotinybert-tiny.yaml) runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from raynas.cli import add_dry_run, dry_run_done, run_recipe
from raynas.config_loading import load_config

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "autotinybert-tiny.yaml"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="raynas autotinybert", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--config", default=str(DEFAULT_CONFIG),
                   help="pipeline YAML (sections init, supernet, latency, search, further; default: the offline demo)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. out=runs/x search.generations=2 further.steps=0")
    add_dry_run(p)
    return p.parse_args(argv)


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    from raynas.orchestration.autotinybert import PipelineConfig, check, run_dir, run_pipeline

    cfg = load_config(PipelineConfig, args.config, args.overrides)
    if args.dry_run:
        stages, _ = check(cfg)
        return dry_run_done("raynas autotinybert", f"run folder {run_dir(cfg)}: {stages.status()}")
    result = run_pipeline(cfg)
    width = max([6, *(len(str(r.get("budget"))) for r in result["models"])])
    print(f"{'budget':<{width}}  {'arch':<22} {'params':>11} {'proxy':>7} {'pred ms':>8} {'meas ms':>8} "
          f"{'speedup':>7}  meets")
    num = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731  (baselines have no prediction)
    for r in result["models"]:
        if not r.get("arch"):
            print(f"{r['budget']:<{width}}  (no arch fits: {r.get('note')})")
            continue
        meets = {True: "yes", False: "NO (over budget)", None: "(baseline)"}[r.get("meets_budget")]
        print(f"{r['budget']:<{width}}  {r['arch']:<22} {r['params']:>11,} {num(r.get('proxy_loss'), '>7.3f'):>7} "
              f"{num(r.get('predicted_latency_ms'), '>8.2f'):>8} {r['measured_latency_ms']:>8.2f} "
              f"{r['measured_speedup']:>6.2f}x  {meets}")
    print(f"models:  {Path(result['run']) / 'further'} (one transformers folder per arch; see models.parquet)")
    print(f"tables:  {result['table']} (and search/evaluated.parquet, latency/latency.parquet)")
    print(f"plot:    {result.get('plot') or '(skipped: pip install matplotlib)'}")
    print(f"report:  {result['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(run_recipe(main, sys.argv[1:], "raynas autotinybert"))
