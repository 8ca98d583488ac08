"""Archs a BertConfig can express export as plain ``bert``, usable without raynas."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import torch
from conftest import batch, tiny_supernet

from raynas.export import export_model

BERT_ARCHS = {
    "mlm": ["2-32-64-2-32", "3-48-128-3-48", "1-64-16-4-64"],
    "kd": ["2-36-40-4-36", "3-64-128-4-64"],
    "layerwise": ["48:mha48,ffn64,id,mha48,ffn64,id", "48:mha48,id,ffn32,id,mha48,ffn32"],
}
NOT_BERT = {"mlm": "2-48-64-2-32", "kd": "2-40-64-4-32", "layerwise": "48:mha48,ffn64,conv3_16,id,id,id"}


def test_bert_archs_load_and_match_in_a_process_without_raynas(tmp_path, tokenizer):
    ids, mask = batch(5)
    cases = []
    for kind, archs in BERT_ARCHS.items():
        net = tiny_supernet(kind).eval()
        for arch in archs:
            net.set_active(arch)
            with torch.no_grad():
                ref = net(ids, mask)
            exported = export_model(net.extract(), tmp_path / f"{kind}-{len(cases)}", tokenizer)
            assert exported.model_type == "bert", arch
            torch.save({"h": ref.last_hidden_state, "p": ref.pooler_output, "l": ref.logits}, exported.path / "ref.pt")
            cases.append(str(exported.path))
    torch.save({"ids": ids, "mask": mask}, tmp_path / "batch.pt")
    script = textwrap.dedent(f"""
        import json, sys, torch
        from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoTokenizer
        from transformers.utils import logging
        logging.set_verbosity_error()
        b = torch.load({str(tmp_path / "batch.pt")!r})
        real = b["mask"].bool()
        worst = 0.0
        for path in json.loads(sys.argv[1]):
            ref = torch.load(path + "/ref.pt")
            assert AutoConfig.from_pretrained(path).model_type == "bert"
            AutoTokenizer.from_pretrained(path)
            base = AutoModel.from_pretrained(path).eval()
            mlm = AutoModelForMaskedLM.from_pretrained(path).eval()
            with torch.no_grad():
                out = base(input_ids=b["ids"], attention_mask=b["mask"])
                logits = mlm(input_ids=b["ids"], attention_mask=b["mask"]).logits
            worst = max(worst, (out.last_hidden_state - ref["h"])[real].abs().max().item(),
                        (out.pooler_output - ref["p"]).abs().max().item(), (logits - ref["l"])[real].abs().max().item())
        print(json.dumps({{"worst": worst, "raynas_imported": any(m.startswith("raynas") for m in sys.modules)}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(cases)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["raynas_imported"] is False
    assert result["worst"] < 1e-5


def test_other_archs_export_as_raynas(tmp_path):
    for kind, arch in NOT_BERT.items():
        net = tiny_supernet(kind)
        net.set_active(arch)
        assert export_model(net.extract(), tmp_path / kind).model_type == "raynas"
        config = json.loads((tmp_path / kind / "config.json").read_text())
        assert config["model_type"] == "raynas" and len(config["layers"]) == len(net.active_ops)


def test_export_refuses_to_overwrite_and_leaves_no_temp(tmp_path):
    net = tiny_supernet("mlm")
    export_model(net.extract(), tmp_path / "m")
    try:
        export_model(net.extract(), tmp_path / "m")
    except ValueError as exc:
        assert "already exists" in str(exc)
    else:
        raise AssertionError("expected an error")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
