"""raynas supernet: train a supernet (AutoTinyBERT batch-wise, sandwich or uniform) on Ray Train.

    raynas supernet --config recipes/configs/supernet-tiny.yaml
    raynas supernet --config recipes/configs/supernet-tiny.yaml steps=500 num_workers=4 deepspeed.zero_stage=1
    raynas supernet --config my.yaml init_from=runs/supernet out=runs/supernet-trained

The corpus is tokenized once into OUT/corpus (memory-mapped by the workers),
checkpoints land in OUT/checkpoints (and Ray's copies in OUT/ray_results; a rerun
with the same OUT resumes from the latest), the trained supernet in OUT/supernet.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from raynas.cli import run_recipe
from raynas.config_loading import load_config
from raynas.orchestration.supernet_training import SupernetTrainConfig, train_supernet


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="raynas supernet", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--config", help="YAML config (fields of SupernetTrainConfig); key=value overrides it")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. sampler.per_worker=3")
    return p.parse_args(argv)


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    cfg = load_config(SupernetTrainConfig, args.config, args.overrides)
    metrics = train_supernet(cfg)
    print(json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, indent=2))
    print(f"trained supernet in {cfg.out}/supernet", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_recipe(main, sys.argv[1:], "raynas supernet"))
