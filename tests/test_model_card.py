"""Every exported folder has a model card whose numbers are the model's and whose load snippet runs.

Folder kinds: extracted bert and raynas, a task head, a pruned model, a packed
(quantized) model, a further-trained model. The untrained-MLM-head note appears
(card, config.json, stderr) for a supernet seeded from a teacher without a
masked-LM head, and goes once a run has trained the head.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_supernet
from test_compression_packed_format import encode_all, tiny_bert
from test_prune import TRAIN, finetuned  # noqa: F401  (fixture)
from transformers import BertConfig, BertForMaskedLM, BertModel

from raynas.cli import main
from raynas.compression.packed_format import save_compressed
from raynas.compression.prune_run import PruneJob, run_prune_job
from raynas.export import export_model
from raynas.model_card import CARD_FILE, FLOPS_SEQ_LEN, PROVENANCE_KEY, provenance_of, set_card_latency
from raynas.models import RaynasConfig, RaynasForSequenceClassification
from raynas.spaces.ops import encoder_flops
from raynas.supernet import load_supernet
from raynas.training.factories import freeze_unreached, save_final

UNTRAINED = "MLM head untrained"


def _teacher(path: Path, tokenizer, head: bool) -> Path:
    """A tiny BERT teacher saved with (BertForMaskedLM, every weight perturbed) or without (BertModel) an MLM head."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    model = BertForMaskedLM(config) if head else BertModel(config)
    for p in model.parameters():
        p.data.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _card(folder: Path) -> str:
    return (Path(folder) / CARD_FILE).read_text()


def _number(card: str, row: str) -> int:
    """The first integer (with thousands commas) of a card table row."""
    line = next(ln for ln in card.splitlines() if ln.startswith(f"| {row} |"))
    return int(re.search(r"\| ([\d,]+)", line[len(row) + 3:]).group(1).replace(",", ""))


def _snippet(card: str) -> str:
    return re.search(r"```python\n(.*?)\n```", card, re.S).group(1)


def _front(card: str) -> str:
    return card.split("---")[1]


def _check_numbers(folder: Path, model: torch.nn.Module) -> None:
    card = _card(folder)
    assert _number(card, "parameters") == sum(p.numel() for p in model.parameters())
    from raynas.export import raynas_config_of

    config = raynas_config_of(model.config)
    assert _number(card, "FLOPs") == encoder_flops(config.hidden_size, config.ops, FLOPS_SEQ_LEN)


def _run_in_place(snippet: str, capsys) -> str:
    exec(compile(snippet, "<card>", "exec"), {})
    return capsys.readouterr().out


@pytest.mark.parametrize("head", [False, True])
def test_extracted_family_cards_and_the_untrained_head_note(tmp_path, tokenizer, capsys, head):
    teacher = _teacher(tmp_path / "teacher", tokenizer, head)
    assert main(["init", "--teacher", str(teacher), "--out", str(tmp_path / "sn")]) == 0
    init_err = capsys.readouterr().err
    net = load_supernet(tmp_path / "sn")
    archs = [str(net.space.largest()), "1-32-32-2-16"]  # bert-expressible / q != hidden: raynas
    assert main(["extract", "--supernet", str(tmp_path / "sn"), *[a for x in archs for a in ("--arch", x)],
                 "--out", str(tmp_path / "fam")]) == 0
    extract_err = capsys.readouterr().err
    assert provenance_of(net)["mlm_head"] == ("teacher" if head else "untrained")
    assert (UNTRAINED in init_err) is (not head) and (UNTRAINED in extract_err) is (not head)
    assert sum(UNTRAINED in line for line in extract_err.splitlines()) == (0 if head else 1)  # once, not per model
    kinds = {}
    for arch in archs:
        folder = tmp_path / "fam" / arch
        card, config = _card(folder), json.loads((folder / "config.json").read_text())
        kinds[config["model_type"]] = folder
        _check_numbers(folder, net.extract(arch))
        assert _number(card, "parameters") == sum(p.numel() for p in net.extract(arch).parameters())
        assert _number(card, "FLOPs") == net.space.flops(arch, FLOPS_SEQ_LEN)
        assert f"`{arch}`" in card and str(tmp_path / "sn") in card and f"`{teacher}`" in card
        assert config[PROVENANCE_KEY]["mlm_head"] == ("teacher" if head else "untrained")
        assert (UNTRAINED in card) is (not head) and ("raynas_notes" in config) is (not head)
        assert ("pipeline_tag: fill-mask" in _front(card)) is head
        assert "library_name: transformers" in _front(card) and "- raynas" in _front(card)
    assert set(kinds) == {"bert", "raynas"}
    if head:
        return
    # the bert folder's snippet runs without raynas, in a fresh process; the raynas one here
    code = _snippet(_card(kinds["bert"])) + "\nimport sys\nassert 'raynas' not in sys.modules\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "torch.Size([1," in done.stdout
    assert "import raynas" in _card(kinds["raynas"])
    assert "torch.Size([1," in _run_in_place(_snippet(_card(kinds["raynas"])), capsys)


def test_a_run_that_trains_the_mlm_head_clears_the_note_and_one_that_freezes_it_keeps_it(tmp_path, tokenizer, capsys):
    teacher = _teacher(tmp_path / "teacher", tokenizer, head=False)
    assert main(["init", "--teacher", str(teacher), "--out", str(tmp_path / "sn")]) == 0
    for logits in (False, True):
        net = load_supernet(tmp_path / "sn").train()
        freeze_unreached(net, logits)  # what build_student does: the head trains only under an MLM / logits loss
        out = tmp_path / f"run-{logits}"
        save_final(net, out, tokenizer, step=7)
        saved = load_supernet(out / "supernet")
        prov = provenance_of(saved)
        assert prov["mlm_head"] == ("trained" if logits else "untrained")
        assert prov["training"][-1]["steps"] == 7 and prov["training"][-1]["mlm_head_trained"] is logits
        capsys.readouterr()
        assert main(["extract", "--supernet", str(out / "supernet"), "--arch", "1-32-32-2-16",
                     "--out", str(tmp_path / f"fam-{logits}")]) == 0
        card = _card(tmp_path / f"fam-{logits}" / "1-32-32-2-16")
        assert (UNTRAINED in capsys.readouterr().err) is (not logits) and (UNTRAINED in card) is (not logits)
        assert "7 steps" in card
    # further training of an extracted (plain) model: its folder's card adds the run
    model = load_supernet(tmp_path / "run-True" / "supernet").extract("1-32-32-2-16").train()
    model.config.raynas_provenance = provenance_of(load_supernet(tmp_path / "run-True" / "supernet"))
    freeze_unreached(model, True)
    path = save_final(model, tmp_path / "further", tokenizer, step=3)
    card = _card(path)
    assert card.count("- Training (") == 2 and "3 steps" in card and "pipeline_tag: fill-mask" in card
    _check_numbers(path, model)


def test_random_space_supernet_says_its_weights_are_random(tmp_path, capsys):
    from raynas.model_card import seeded_provenance
    from recipes.extract import extract_family

    net = tiny_supernet("mlm")
    net.raynas_provenance = seeded_provenance(net.space.name)  # as raynas init --space records it
    extract_family(net, None, ["2-48-64-2-32"], tmp_path)
    card = _card(tmp_path / "2-48-64-2-32")
    assert "weights random" in card and "weights random" in capsys.readouterr().err
    _check_numbers(tmp_path / "2-48-64-2-32", net.extract("2-48-64-2-32"))


def test_task_head_card(tmp_path, tokenizer, capsys):
    config = RaynasConfig(vocab_size=100, hidden_size=32, num_labels=3, max_position_embeddings=64,
                          layers=[{"op": "mha", "heads": 2, "head_dim": 16}, {"op": "ffn", "inner": 40}])
    torch.manual_seed(0)
    model = RaynasForSequenceClassification(config).eval()
    exported = export_model(model, tmp_path / "cls", tokenizer)
    card = _card(exported.path)
    assert exported.model_type == "bert" and "pipeline_tag: text-classification" in card
    assert "Not recorded" in card  # no provenance given: said, not invented
    _check_numbers(exported.path, model)
    assert "torch.Size([1, 3])" in _run_in_place(_snippet(card), capsys)


def test_packed_folder_card(tmp_path, capsys):
    model = tiny_bert()
    model.config.raynas_provenance = {"teacher": "t", "init": "teacher", "mlm_head": "untrained", "training": []}
    folder = save_compressed(model, encode_all(model, "int4"), tmp_path / "packed")
    card, config = _card(folder), json.loads((folder / "config.json").read_text())
    assert "- quantized" in card and "import raynas" in card and "int4" in card
    assert config[PROVENANCE_KEY]["quantization"]["encoding"] == "int4"
    assert config[PROVENANCE_KEY]["quantization"]["weights_bytes"] == (folder / "model.safetensors").stat().st_size
    assert UNTRAINED not in card and "raynas_notes" not in config  # a classifier: no MLM head to speak of
    _check_numbers(folder, model)
    assert "torch.Size([1, 3])" in _run_in_place(_snippet(card), capsys)


def test_pruned_folder_card(finetuned, tmp_path, capsys):  # noqa: F811
    model, data = finetuned
    job = PruneJob("p", "sst2", str(model), str(tmp_path / "job"), {"kind": "params", "target": 0.5},
                   {**TRAIN, "epochs": 1, "data_dir": str(data)})
    record = run_prune_job(job)
    card = _card(Path(record["path"]))
    assert "- pruned" in card and "Task: `sst2`" in card and "Pruning: method l0, kind params" in card
    from transformers import AutoModelForSequenceClassification

    pruned = AutoModelForSequenceClassification.from_pretrained(record["path"])
    _check_numbers(Path(record["path"]), pruned)
    assert "torch.Size([1, 2])" in _run_in_place(_snippet(card), capsys)


def test_measured_latency_replaces_the_block(tmp_path):
    from raynas.orchestration.autotinybert import _cards_with_latency
    from raynas.search.latency_data import LatencyConfig

    net = tiny_supernet("mlm")
    path = export_model(net.extract("2-48-64-2-32"), tmp_path / "m").path
    assert "Not measured" in _card(path)
    assert set_card_latency(path, {"latency_ms": 1.5, "speedup": 2.0, "reference": "ref", "reference_ms": 3.0,
                                   "batch_size": 1, "seq_len": 128, "threads": 1})
    card = _card(path)
    assert "Not measured" not in card and "1.50 ms" in card and "2.00× the speed of `ref`" in card
    assert not set_card_latency(tmp_path, {"latency_ms": 1.0})  # no card there
    # raynas autotinybert's measure stage: rows without a model (no arch met the budget) are skipped
    _cards_with_latency([{"path": str(path), "measured_latency_ms": 0.75, "measured_latency_p90_ms": 0.8,
                          "measured_speedup": 4.0}, {"budget": "3x"}], "largest", 3.0, LatencyConfig())
    card = _card(path)
    assert card.count("<!-- raynas:latency -->") == 1 and "0.75 ms (p90 0.80 ms)" in card and "4.00×" in card
