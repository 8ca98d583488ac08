"""raynas supernet: train a supernet (AutoTinyBERT batch-wise, sandwich or uniform) on Ray Train.

    raynas supernet --config recipes/configs/supernet-tiny.yaml
    raynas supernet --config recipes/configs/supernet-tiny.yaml steps=500 num_workers=4 deepspeed.zero_stage=1
    raynas supernet --config recipes/configs/supernet-kd-minilm.yaml      # distil from a teacher
    ray start --head && RAY_AUTH_MODE=token ray job submit --working-dir . -- raynas supernet --config recipes/configs/supernet-tiny.yaml out=/tmp/runs/supernet-tiny

Under ray job submit give out as an absolute or shared path (the job runs in Ray's copy
of the working dir); Ray >= 2.59 needs RAY_AUTH_MODE=token for the ray job CLI.

The corpus is tokenized once into OUT/corpus (memory-mapped by the workers),
checkpoints land once in OUT/checkpoints (Ray Train's run folder: Ray records them
there instead of copying them; a rerun with the same OUT resumes from the latest), sampled archs in OUT/archs/rank-R.jsonl,
the trained supernet in OUT/supernet (extract sub-models with raynas extract).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from raynas.cli import add_dry_run, dry_run_done, run_recipe
from raynas.config_loading import load_config
from raynas.errors import ConfigError


def parse_args(argv: Sequence[str], prog: str = "raynas supernet", doc: str = __doc__) -> argparse.Namespace:
    """Also raynas train's: both take a TrainConfig YAML and dotted overrides."""
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc.split("\n\n", 1)[1])
    p.add_argument("--config", help="YAML config (fields of TrainConfig); key=value overrides it")
    example = "model=runs/students/ARCH steps=100" if prog.endswith("train") else "sampler.per_worker=3 steps=100"
    p.add_argument("overrides", nargs="*", metavar="key=value", help=f"dotted overrides, e.g. {example}")
    add_dry_run(p)
    args = p.parse_args(argv)
    if args.config is None and not args.overrides:
        config = "train-tiny.yaml" if prog.endswith("train") else "supernet-tiny.yaml"
        raise ConfigError(f"nothing to run: give --config FILE (e.g. recipes/configs/{config}) and/or key=value "
                          f"overrides ({prog} --help)")
    return args


def dry_run(cfg: Any, prog: str) -> int:
    """Also raynas train's: the checks of a run (config, space / model / teacher, out) and what it would do."""
    from raynas.orchestration.supernet_training import preflight

    raw = preflight(cfg)
    what = cfg.model or (f"space {cfg.space}" if cfg.space else f"supernet {cfg.init_from}")
    return dry_run_done(prog, f"{what}: {cfg.steps} steps on {cfg.num_workers} worker(s) "
                              f"({'DeepSpeed ZeRO-' + str(cfg.deepspeed.zero_stage) if cfg.deepspeed.enabled else 'DDP'})"
                              f" into {raw['out']}")


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    from raynas.orchestration.supernet_training import TrainConfig, run_training

    cfg = load_config(TrainConfig, args.config, args.overrides)
    if cfg.model:
        raise ConfigError("model: raynas supernet trains a supernet (space or init_from); use raynas train for a model")
    if args.dry_run:
        return dry_run(cfg, "raynas supernet")
    metrics = run_training(cfg)
    print(json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, indent=2))
    print(f"trained supernet in {cfg.out}/supernet", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_recipe(main, sys.argv[1:], "raynas supernet"))
