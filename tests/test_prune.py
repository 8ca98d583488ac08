"""Structured pruning end to end on a tiny fine-tuned BERT and synthetic SST-2: target met, removal exact, loads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_finetune import _bert_dir, _write_sst2

from raynas.compression.prune_run import PruneJob, finished, run_prune_job
from raynas.errors import ConfigError
from raynas.evaluation.finetune import FinetuneConfig, finetune

TRAIN = {"lr": 1e-3, "epochs": 2, "batch_size": 16, "max_seq_len": 32, "seed": 0, "kd_alpha": 0.5}


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("prune")
    data = _write_sst2(root / "glue", train=128, dev=32)
    base = _bert_dir(root / "base", hidden=32, layers=2)
    out = root / "finetuned"
    finetune(FinetuneConfig(task="sst2", model=str(base), data_dir=str(data), lr=2e-3, epochs=2, batch_size=16,
                            max_seq_len=32, seed=0, output_dir=str(out)))
    return out, data


@pytest.mark.parametrize("kind,target,method,blocks", [("params", 0.5, "l0", False), ("flops", 0.7, "l0", True),
                                                        ("params", 0.5, "magnitude", False)])
def test_a_pruned_model_meets_its_target_and_equals_the_gated_model(finetuned, tmp_path, kind, target, method, blocks):
    model, data = finetuned
    job = PruneJob(f"{kind}-{method}", "sst2", str(model), str(tmp_path / "job"),
                   {"kind": kind, "target": target, "method": method, "gate_lr": 0.2, "lambda_lr": 0.2,
                    "block_gates": blocks},
                   {**TRAIN, "data_dir": str(data)})
    record = run_prune_job(job)
    sparsity = record["params_sparsity" if kind == "params" else "flops_sparsity"]
    assert abs(sparsity - target) <= 0.02, record  # within +-2 % of the target
    assert abs((1 - record["achieved_fraction"]) - sparsity) < 1e-9
    assert record["max_abs_diff"] <= 1e-5
    assert record["model_type"] == "raynas"  # per-layer heads: not a plain bert
    assert finished(tmp_path / "job")["name"] == job.name
    heads = [layer["heads"] for layer in record["layers"] if layer["op"] == "mha"]
    ffn = [layer["inner"] for layer in record["layers"] if layer["op"] == "ffn"]
    assert sum(heads) < 8 or sum(ffn) < 128  # something was removed
    if method == "l0":  # the gates were learned: the Lagrangian moved the expected size down from 1
        assert record["expected_fraction"] < 0.99
    else:
        assert record["expected_fraction"] != record["expected_fraction"]  # nan: no gates were learned


def test_the_exported_model_loads_in_a_fresh_process_through_auto_classes_and_pipeline(finetuned, tmp_path):
    model, data = finetuned
    job = PruneJob("p", "sst2", str(model), str(tmp_path / "job"), {"kind": "params", "target": 0.4},
                   {**TRAIN, "epochs": 1, "data_dir": str(data)})
    record = run_prune_job(job)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import raynas  # noqa: F401

    path = record["path"]
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(["the movie was good", "the plot was bad and long"], padding=True, return_tensors="pt")
    here = AutoModelForSequenceClassification.from_pretrained(path).eval()(**ids).logits
    code = (f"import json, raynas, torch\nfrom transformers import AutoModel, AutoModelForSequenceClassification, "
            f"AutoTokenizer, pipeline\np = {path!r}\ntok = AutoTokenizer.from_pretrained(p)\n"
            "ids = tok(['the movie was good', 'the plot was bad and long'], padding=True, return_tensors='pt')\n"
            "m = AutoModelForSequenceClassification.from_pretrained(p).eval()\n"
            "AutoModel.from_pretrained(p)\n"
            "clf = pipeline('text-classification', model=m, tokenizer=tok)\n"
            "print(json.dumps({'logits': m(**ids).logits.tolist(), 'pipe': clf(['the movie was good'])}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert torch.allclose(torch.tensor(result["logits"]), here, atol=1e-5)
    assert result["pipe"][0]["label"] in ("negative", "positive")


def test_an_out_of_reach_target_fails_before_training(finetuned, tmp_path):
    model, data = finetuned
    job = PruneJob("x", "sst2", str(model), str(tmp_path / "job"), {"kind": "params", "target": 0.9999},
                   {**TRAIN, "data_dir": str(data)})
    with pytest.raises(ConfigError, match="out of reach"):
        run_prune_job(job)
    assert not (tmp_path / "job" / "prune.json").exists()


@pytest.mark.parametrize("fault_step", [5, 10])  # 16 steps, gates learned for 8: in phase 1 and in phase 2
def test_a_job_killed_after_a_checkpoint_resumes_exactly(finetuned, tmp_path, monkeypatch, fault_step):
    from safetensors.torch import load_file

    from raynas.evaluation.finetune_state import FAULT_ENV

    model, data = finetuned
    train = {**TRAIN, "data_dir": str(data), "checkpoint_every": 5}
    settings = {"kind": "params", "target": 0.5, "gate_lr": 0.2, "lambda_lr": 0.2, "prune_fraction": 0.5}
    whole = run_prune_job(PruneJob("a", "sst2", str(model), str(tmp_path / "whole"), settings, train))
    monkeypatch.setenv(FAULT_ENV, str(fault_step))  # raised right after that step's checkpoint
    with pytest.raises(RuntimeError, match="injected fault"):
        run_prune_job(PruneJob("a", "sst2", str(model), str(tmp_path / "cut"), settings, train))
    assert (tmp_path / "cut" / "finetune-checkpoint.pt").is_file() and not (tmp_path / "cut" / "prune.json").exists()
    resumed = run_prune_job(PruneJob("a", "sst2", str(model), str(tmp_path / "cut"), settings, train))
    assert not (tmp_path / "cut" / "finetune-checkpoint.pt").exists()  # removed when the run ended
    assert resumed["layers"] == whole["layers"] and resumed["results"]["score"] == whole["results"]["score"]
    a = load_file(str(tmp_path / "whole" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_layerwise_hidden_distillation_pairs_every_bert_layer(finetuned, tmp_path):
    from raynas.evaluation.finetune import layer_pairs

    states = tuple(torch.full((1, 2, 4), float(i)) for i in range(5))  # raynas: embeddings + 2 layers x (mha, ffn)
    teacher = tuple(torch.full((1, 2, 4), float(2 * i)) for i in range(3))  # bert: embeddings + 2 layers
    assert all(torch.equal(s, t) for s, t in layer_pairs(states, teacher))
    with pytest.raises(ConfigError, match="as deep as the teacher"):
        layer_pairs(states[:4], teacher)
    model, data = finetuned
    job = PruneJob("h", "sst2", str(model), str(tmp_path / "job"), {"kind": "params", "target": 0.4},
                   {**TRAIN, "epochs": 1, "data_dir": str(data), "kd_hidden_weight": 1.0, "kd_hidden_layers": "all"})
    record = run_prune_job(job)
    assert record["max_abs_diff"] <= 1e-5 and abs(record["params_sparsity"] - 0.4) <= 0.02
