"""raynas supernet: train a supernet (AutoTinyBERT batch-wise, sandwich or uniform) on Ray Train.

    raynas supernet --config recipes/configs/supernet-tiny.yaml
    raynas supernet --config recipes/configs/supernet-tiny.yaml steps=500 num_workers=4 deepspeed.zero_stage=1
    raynas supernet --config recipes/configs/supernet-kd-minilm.yaml      # distil from a teacher
    ray start --head && RAY_AUTH_MODE=token ray job submit --working-dir . -- raynas supernet --config recipes/configs/supernet-tiny.yaml out=/tmp/runs/supernet-tiny

Under ray job submit give out as an absolute or shared path (the job runs in Ray's copy
of the working dir); Ray >= 2.59 needs RAY_AUTH_MODE=token for the ray job CLI.

The corpus is tokenized once into OUT/corpus (memory-mapped by the workers),
checkpoints land in OUT/checkpoints (Ray's copies in OUT/ray_results; a rerun
with the same OUT resumes from the latest), sampled archs in OUT/archs/rank-R.jsonl,
the trained supernet in OUT/supernet (extract sub-models with raynas extract).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from raynas.cli import run_recipe
from raynas.config_loading import load_config
from raynas.errors import ConfigError
from raynas.orchestration.supernet_training import TrainConfig, run_training


def parse_args(argv: Sequence[str], prog: str = "raynas supernet", doc: str = __doc__) -> argparse.Namespace:
    """Also raynas train's: both take a TrainConfig YAML and dotted overrides."""
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc.split("\n\n", 1)[1])
    p.add_argument("--config", help="YAML config (fields of TrainConfig); key=value overrides it")
    example = "model=runs/students/ARCH steps=100" if prog.endswith("train") else "sampler.per_worker=3 steps=100"
    p.add_argument("overrides", nargs="*", metavar="key=value", help=f"dotted overrides, e.g. {example}")
    args = p.parse_args(argv)
    if args.config is None and not args.overrides:
        config = "train-tiny.yaml" if prog.endswith("train") else "supernet-tiny.yaml"
        raise ConfigError(f"nothing to run: give --config FILE (e.g. recipes/configs/{config}) and/or key=value "
                          f"overrides ({prog} --help)")
    return args


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    cfg = load_config(TrainConfig, args.config, args.overrides)
    if cfg.model:
        raise ConfigError("model: raynas supernet trains a supernet (space or init_from); use raynas train for a model")
    metrics = run_training(cfg)
    print(json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, indent=2))
    print(f"trained supernet in {cfg.out}/supernet", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_recipe(main, sys.argv[1:], "raynas supernet"))
