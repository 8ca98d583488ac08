"""raynas quantize: further compression of a fine-tuned model -- pruning and quantization, in bytes and CPU latency.

    raynas quantize --config recipes/configs/quantize-tiny.yaml          # offline demo, minutes on 2 CPUs
    raynas quantize --config recipes/configs/quantize-sst2-minilm.yaml   # MiniLM on SST-2: the full table
    raynas quantize --config recipes/configs/quantize-sst2-minilm.yaml model=runs/ft/sst2 finetune_from=null "variants=[{name: k4, method: kmeans, settings: {bits: 4}}]"

Each variant is one Ray Tune trial: post-training int8 (per-channel weights, run by
ONNX Runtime's int8 kernels), QAT (fake quantization, straight-through estimator) at 8
or 4 bits, k-means weight sharing (2^b centroids per matrix, centroids fine-tuned),
mixed precision (bits per layer from measured sensitivity under a size budget), or
gradual pruning (cubic schedule; unstructured, rows, columns or blocks, optional group
lasso). A variant can start from another's folder ("source"), e.g. k-means on a pruned
model. Every folder is packed (b-bit codes, scales / codebooks, bit masks) and loads
with AutoModelFor*.from_pretrained after `import raynas`. The measuring step reloads
every folder, checks it predicts what the model in memory did, and times all encoders
interleaved beside the fp32 model, the teacher, and the fp32 model on each int8
backend (torch quantize_dynamic, torchao, ONNX Runtime). OUT holds jobs/NAME/{model,
compress.json}, compression.parquet, int8_backends.parquet, compression.md and
compression.png. A rerun of the same OUT skips finished variants; bad input is one
line and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from raynas.cli import add_dry_run, dry_run_done, run_recipe


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="raynas quantize", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--config", required=True, help="YAML config (fields of QuantizeRunConfig: task, model, teacher, "
                                                   "extra_models, variants, train, backends, latency, ...)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. out=runs/x train.max_steps=50")
    add_dry_run(p)
    return p.parse_intermixed_args(argv)


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    from raynas.config_loading import load_config
    from raynas.orchestration.quantize_pipeline import check, run_quantize
    from raynas.orchestration.quantize_tune import QuantizeRunConfig

    cfg = load_config(QuantizeRunConfig, args.config, args.overrides)
    if args.dry_run:
        stages = check(cfg)
        names = ", ".join(v.name for v in cfg.variants)
        return dry_run_done("raynas quantize", f"{len(cfg.variants)} variant(s) ({names}) in {stages.root}: "
                                               f"{stages.status()}")
    result = run_quantize(cfg)
    print(result["text"])
    print(f"tables:  {result['parquet']}" + (f", {result['backends']}" if "backends" in result and isinstance(
        result["backends"], str) else ""))
    print(f"report:  {result['markdown']}" + (f", {result['plot']}" if "plot" in result else ""))
    failed = [r["name"] for r in result["rows"] if r.get("status") != "ok"]
    if failed:
        print(f"failed variants: {', '.join(failed)} (rerun the same command to retry them)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_recipe(main, sys.argv[1:], "raynas quantize"))
