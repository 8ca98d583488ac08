"""raynas extract: supernet checkpoint + archs -> transformers model folders.

    raynas extract --supernet runs/supernet --arch 5-312-1200-12-384 --out models/
    raynas extract --supernet runs/supernet --archs search.parquet --column arch --limit 4 --out models/

Every arch is validated before anything is written; each folder is written
atomically and loads with ``AutoModel.from_pretrained`` (plain ``bert`` where the
arch allows, else model type ``raynas`` after ``import raynas``). Each folder has a
model card (README.md: arch, parameters, FLOPs, where it came from, how to load
it); a supernet whose MLM head was never trained (seeded from an encoder-only
teacher) is said once on stderr, in every card and in config.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import pyarrow as pa

from raynas.atomic_io import check_writable
from raynas.cli import add_dry_run, dry_run_done, run_recipe
from raynas.errors import ConfigError

if TYPE_CHECKING:
    from raynas.supernet import Supernet

SCHEMA = pa.schema([
    ("arch", pa.string()), ("path", pa.string()), ("model_type", pa.string()),
    ("params_base", pa.int64()), ("params_mlm", pa.int64()), ("space", pa.string()),
])


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="raynas extract", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--supernet", required=True, help="supernet folder (supernet.json + model.safetensors)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--arch", action="append", help="arch string; repeat for several")
    src.add_argument("--archs", help="Parquet table with one arch string per row")
    p.add_argument("--column", default="arch", help="column of --archs holding the arch strings (default: arch)")
    p.add_argument("--limit", type=int, help="take only the first K rows of --archs")
    p.add_argument("--out", required=True, help="output folder; one sub-folder per arch + extracted.parquet")
    p.add_argument("--overwrite", action="store_true", help="replace existing model folders")
    p.add_argument("--raynas-format", action="store_true", help="always write model type raynas, never plain bert")
    add_dry_run(p)
    return p.parse_args(argv)


def folder_name(arch: str) -> str:
    """A readable, filesystem-safe folder name; long archs get a hash suffix."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", arch)
    if len(safe) <= 80:
        return safe
    return f"{safe[:40]}-{hashlib.sha1(arch.encode()).hexdigest()[:12]}"


def extract_family(net: Supernet, tokenizer: Any, archs: Sequence[str], out: Path, overwrite: bool = False,
                   raynas_format: bool = False) -> list[dict[str, Any]]:
    """Export each arch's sub-model to ``out/<folder_name(arch)>``; one row (SCHEMA) per model.

    Refuses (before writing anything) when a target exists and ``overwrite`` is off.
    Also the extraction stage of ``raynas autotinybert``.
    """
    from raynas.export import export_model
    from raynas.model_card import provenance_of, untrained_note, with_step

    targets = refuse_clash(archs, out, overwrite)
    provenance = with_step(provenance_of(net), "space", net.space.name)
    note = untrained_note(provenance)
    if note and archs:
        print(f"note: {len(archs)} model(s) from {provenance.get('supernet', 'this supernet')}: {note}",
              file=sys.stderr, flush=True)
    rows = []
    for i, (arch, target) in enumerate(zip(archs, targets), 1):
        model = net.extract(arch)
        exported = export_model(model, target, tokenizer, overwrite=True, bert_if_possible=not raynas_format,
                                provenance=with_step(provenance, "arch", arch))
        (target / "raynas_arch.json").write_text(json.dumps({"arch": arch, "space": net.space.name}) + "\n")
        rows.append({"arch": arch, "path": str(target.resolve()), "model_type": exported.model_type,
                     "params_base": net.space.params(arch, "base"), "params_mlm": net.space.params(arch, "mlm"),
                     "space": net.space.name})
        print(f"[{i}/{len(archs)}] {arch} -> {target} ({exported.model_type}, {rows[-1]['params_base']:,} params)",
              file=sys.stderr, flush=True)
    return rows


def refuse_clash(archs: Sequence[str], out: Path, overwrite: bool) -> list[Path]:
    """The target folders; refused (nothing written yet) when one exists and ``overwrite`` is off."""
    targets = [out / folder_name(a) for a in archs]
    clash = [str(t) for t in targets if t.exists()]
    if clash and not overwrite:
        raise ConfigError(f"{clash[0]}: already exists (use --overwrite to replace)")
    return targets


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit: expected a positive integer, got {args.limit}")
    check_writable(args.out, "--out")  # before torch loads: a bad --out costs a tenth of a second
    from raynas.supernet import load_supernet, load_supernet_tokenizer
    from raynas.tables import read_column, to_table, write_parquet

    net = load_supernet(args.supernet)
    tokenizer = load_supernet_tokenizer(args.supernet)
    raw = args.arch if args.arch else read_column(args.archs, args.column)[: args.limit]
    if not raw:
        raise ConfigError(f"{args.archs}: no archs in column {args.column!r}")
    archs = [str(net.space.validate(str(a))) for a in raw]  # all checked before anything is written
    if args.dry_run:
        refuse_clash(archs, Path(args.out), args.overwrite)
        return dry_run_done("raynas extract", f"{len(archs)} arch(s) of space {net.space.name!r} into {args.out}")
    rows = extract_family(net, tokenizer, archs, Path(args.out), args.overwrite, args.raynas_format)
    table = write_parquet(to_table(rows, SCHEMA), Path(args.out) / "extracted.parquet")
    print(f"wrote {len(rows)} model folder(s) and {table}")
    return 0


if __name__ == "__main__":
    sys.exit(run_recipe(main, sys.argv[1:], "raynas extract"))
