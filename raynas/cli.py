"""The ``raynas`` command: each subcommand is a recipe in ``recipes/``.

``raynas NAME ARGS`` runs ``recipes.NAME.main(ARGS)`` (``python -m recipes.NAME``
does the same). A :class:`ConfigError` from anywhere becomes one line on
stderr and exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, Sequence

from raynas.errors import ConfigError

# subcommand -> (module, one-line description); order is the order of --help
RECIPES: dict[str, tuple[str, str]] = {
    "autotinybert": ("recipes.autotinybert", "the main job: supernet -> latency predictor -> search -> extract -> further training -> re-measured family + report"),
    "init": ("recipes.init", "create a supernet folder from a search space, or around a teacher (seeded with its weights)"),
    "supernet": ("recipes.supernet", "train a supernet on Ray Train (batch-wise / sandwich sub-models, DeepSpeed ZeRO or DDP)"),
    "train": ("recipes.train", "further training of an extracted model (MLM or distillation) on Ray Train + DeepSpeed"),
    "extract": ("recipes.extract", "extract sub-models from a supernet checkpoint into transformers folders"),
    "latency": ("recipes.latency", "measure archs of a space on this hardware (Ray tasks), fit and save a latency predictor (MLP vs FLOPs-linear)"),
    "search": ("recipes.search", "evolutionary (AutoTinyBERT), random or Fast search for the best arch per latency budget on Ray Tune; Parquet rows, resumable"),
    "nasbert": ("recipes.nasbert", "NAS-BERT: teacher pairs -> K blocks trained concurrently (Ray actors) and shrunk bin-wise on Ray Tune -> a family by budget"),
    "prune": ("recipes.prune", "structured pruning of a fine-tuned model: L0 gates on heads + FFN, Lagrangian to a params / FLOPs / speedup target, distillation, exact removal; one Ray Tune trial per target"),
    "quantize": ("recipes.quantize", "further compression of a fine-tuned model: int8 (ONNX Runtime / torch / torchao compared), QAT, k-means weight sharing, mixed precision, gradual / block pruning; one Ray Tune trial per variant, bytes + latency + score table"),
    "pipeline": ("recipes.pipeline", "one family from one teacher: AutoTinyBERT / NAS-BERT family -> task fine-tuning -> L0 pruning -> quantization, and one Pareto table (size, latency, score) across all stages"),
    "evaluate": ("recipes.evaluate", "fine-tune on GLUE / SQuAD as a Ray Tune sweep; family report (size, latency, scores)"),
    "bench": ("recipes.bench", "benchmarks: bench supernet (active path vs extracted step time), bench fitness (shared supernet vs extracting each), bench train (training tokens/s), bench ranking (supernet proxy vs stand-alone ranking), bench search (evolution vs random at equal evaluations)"),
}


def usage() -> str:
    width = max(map(len, RECIPES))
    lines = ["usage: raynas COMMAND [ARGS...]", "", "Neural-architecture search and compression for BERT-family models.",
             "", "commands:"]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc) in RECIPES.items()]
    lines += ["", "Run 'raynas COMMAND --help' for a command's options."]
    return "\n".join(lines)


DRY_RUN_HELP = ("check the config, every input and the output location, say what would run, and stop before any "
                "work: nothing is written, no Ray is started")


def add_dry_run(parser: Any) -> None:
    """The one ``--dry-run`` flag every recipe takes (the documented examples are tested with it)."""
    parser.add_argument("--dry-run", action="store_true", help=DRY_RUN_HELP)


def dry_run_done(prog: str, plan: str) -> int:
    """What a dry run prints once every check has passed; exit code 0."""
    print(f"{prog}: dry run: all checks passed; {plan}; nothing written")
    return 0


def run_recipe(main: Callable[[Sequence[str]], int | None], argv: Sequence[str], prog: str) -> int:
    """Run a recipe's ``main``; bad input -> one message and exit 2."""
    try:
        return int(main(list(argv)) or 0)
    except ConfigError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if args else 2
    if args[0] == "--version":
        from raynas import __version__

        print(f"raynas {__version__}")
        return 0
    name = args[0]
    if name not in RECIPES:
        print(f"raynas: error: unknown command {name!r} (choose from {', '.join(RECIPES)})", file=sys.stderr)
        return 2
    module = importlib.import_module(RECIPES[name][0])
    return run_recipe(module.main, args[1:], f"raynas {name}")


if __name__ == "__main__":
    sys.exit(main())
