"""raynas pipeline: one family from one teacher -- search family -> task fine-tuning -> L0 pruning -> quantization.

    raynas pipeline --config recipes/configs/pipeline-tiny.yaml
    raynas pipeline --config recipes/configs/pipeline-tiny.yaml family.recipe=null family.run=runs/autotinybert-kd-minilm
    raynas pipeline --config FILE "family.models={mine: path/to/pretrained}" prune=null  # your own models, no pruning

Stages read the previous stage's model folders: the family (an AutoTinyBERT or
NAS-BERT run folder, the recipe run here first, or your own folders; the teacher
too), every member fine-tuned on the task (members distil the fine-tuned teacher),
`raynas prune` on the models named in prune.models, `raynas quantize` on those in
quantize.models, and a last step that times every model of every stage
interleaved on its runtime and marks the Pareto front of size, latency and score.
OUT holds family-run/, finetuned/NAME/, prune/NAME/, quantize/NAME/ (each a full
recipe run folder with its own tables), pareto.parquet, pareto.md and pareto.png.
A rerun of the same OUT skips what is done; bad input is one line and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from raynas.cli import add_dry_run, dry_run_done, run_recipe


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="raynas pipeline", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--config", required=True, help="YAML config (fields of PipelineRunConfig: task, teacher, family, "
                                                   "finetune, prune, quantize, latency, ...)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. out=runs/x prune=null")
    add_dry_run(p)
    return p.parse_intermixed_args(argv)


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    from raynas.config_loading import load_config
    from raynas.orchestration.compression_pipeline import PipelineRunConfig, check, run_compression_pipeline

    cfg = load_config(PipelineRunConfig, args.config, args.overrides)
    if args.dry_run:
        checked = check(cfg)
        steps = ["family", "finetune", *(["prune"] if checked["prune_cfg"] else []),
                 *(["quantize"] if checked["quant_cfg"] else []), "pareto"]
        return dry_run_done("raynas pipeline", f"stages {' -> '.join(steps)} in {checked['run'].root}: "
                                               f"{checked['run'].status()}")
    result = run_compression_pipeline(cfg)
    print(result["text"])
    print(f"table:   {result['table']}")
    print(f"report:  {result['markdown']}" + (f", {result['plot']}" if result.get("plot") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(run_recipe(main, sys.argv[1:], "raynas pipeline"))
