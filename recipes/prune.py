"""raynas prune: structured pruning of a fine-tuned model (L0 gates on heads + FFN neurons), a family of targets.

    raynas prune --config recipes/configs/prune-tiny.yaml                 # offline demo, minutes on 2 CPUs
    raynas prune --config recipes/configs/prune-sst2-minilm.yaml          # MiniLM on SST-2 at 1.5x / 2x / 3x
    raynas prune --config recipes/configs/prune-squad-proxy.yaml          # SQuAD v1.1 proxy (dev split by article)
    raynas prune --config recipes/configs/prune-paper.yaml                # BERT-base on SQuAD 2.0, GPU cluster
    raynas prune --config recipes/configs/prune-sst2-minilm.yaml model=runs/ft/sst2 finetune_from=null "targets=[{kind: params, target: 0.6}]" baselines=[magnitude]

Each target (a fraction of encoder parameters or FLOPs to remove, or a CPU speedup
through a latency model fitted on this machine) is one Ray Tune trial: hard-concrete
gates on every head and FFN neuron, a Lagrangian that drives the expected size to
the target, distillation from the unpruned model, then the mask is fixed and the
weights recover. The zero-gated units are removed physically; the exported folder
(plain bert when uniform, else raynas) loads with AutoModelFor* after `import raynas`,
and computes what the gated model computed (the max difference is in every row).
OUT holds jobs/NAME/{model, prune.json}, trials.parquet, pruning.md, report.md,
report.parquet and score_vs_speedup.png. A rerun of the same OUT skips finished
stages and jobs; a changed config for a finished stage is refused (exit 2).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from raynas.cli import add_dry_run, dry_run_done, run_recipe


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="raynas prune", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--config", required=True, help="YAML config (fields of PruneRunConfig: task, model, targets, "
                                                   "baselines, prune, train, latency, ...)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. out=runs/x prune.gate_lr=0.1")
    add_dry_run(p)
    return p.parse_intermixed_args(argv)


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    from raynas.config_loading import load_config
    from raynas.orchestration.prune_pipeline import check, run_pruning
    from raynas.orchestration.prune_tune import PruneRunConfig

    cfg = load_config(PruneRunConfig, args.config, args.overrides)
    if args.dry_run:
        checked, stages = check(cfg)
        jobs = len(checked.targets) * (1 + len(checked.baselines))
        return dry_run_done("raynas prune", f"{len(checked.targets)} target(s), baselines {checked.baselines or 'none'} "
                                            f"({jobs} job(s)) in {stages.root}: {stages.status()}")
    result = run_pruning(cfg)
    print(result["text"])
    print(f"tables:  {result['table']}, {result['report']['parquet']}")
    print(f"report:  {result['markdown']}, {result['report']['markdown']}, {result['report']['plot']}")
    failed = [r["name"] for r in result["rows"] if r["status"] != "ok"]
    if failed:
        print(f"failed jobs: {', '.join(failed)} (rerun the same command to retry them)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_recipe(main, sys.argv[1:], "raynas prune"))
