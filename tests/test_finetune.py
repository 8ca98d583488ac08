"""Fine-tuning and task distillation on tiny models and synthetic GLUE / SQuAD data, in seconds."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_supernet
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertModel, BertTokenizer

from raynas.errors import ConfigError
from raynas.evaluation import qa_features
from raynas.evaluation.finetune import FinetuneConfig, finetune
from raynas.export import export_model

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
NEUTRAL = ["the", "a", "movie", "film", "plot", "actor", "story", "scene", "was", "is", "very", "really", "quite",
           "and", "but", "with", "music", "ending", "cast", "script", "long", "short", "old", "new", "it"]
QA_WORDS = ["cat", "dog", "sat", "ran", "on", "in", "mat", "park", "where", "did", "who", "what", "color", "red",
            "blue", "door", "house", "lives", "bob", "alice", "paris", "rome", "city", "of", "to", "went", "?", ".",
            "near", "green", "tree", "big", "small", "river", "at", "which", "by"]
WORDS = SPECIALS + ["good", "bad"] + NEUTRAL + QA_WORDS  # < 100, so a tiny supernet's vocab covers it
GLUE_KEYS = {"task", "model", "teacher", "accuracy", "score", "lr", "epochs", "batch_size", "seed", "epoch", "steps",
             "train_loss", "train_samples", "eval_samples", "train_time_s", "eval_time_s", "device"}


def _tokenizer() -> BertTokenizer:
    return BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)})


def _bert_dir(path: Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(WORDS), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=2 * hidden, max_position_embeddings=64)
    BertModel(config).save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path


def _sentence(rng: random.Random, positive: bool) -> str:
    words = [rng.choice(NEUTRAL) for _ in range(rng.randint(3, 8))]
    words.insert(rng.randint(0, len(words)), "good" if positive else rng.choice(["bad", "the"]))
    return " ".join(words)


def _write_sst2(root: Path, train: int = 256, dev: int = 64) -> Path:
    rng = random.Random(0)
    (root / "SST-2").mkdir(parents=True)
    for name, n in (("train.tsv", train), ("dev.tsv", dev)):
        labels = [i % 2 for i in range(n)]
        lines = ["sentence\tlabel"] + [f"{_sentence(rng, y == 1)}\t{y}" for y in labels]
        (root / "SST-2" / name).write_text("\n".join(lines) + "\n")
    return root


def _write_stsb(root: Path, train: int = 96, dev: int = 32) -> Path:
    """Score = 5 x the share of the first sentence's words that the second repeats."""
    rng = random.Random(1)
    (root / "STS-B").mkdir(parents=True)
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    for name, n in (("train.tsv", train), ("dev.tsv", dev)):
        lines = [header]
        for i in range(n):
            a = [rng.choice(NEUTRAL) for _ in range(4)]
            kept = rng.randint(0, 4)
            b = a[:kept] + [rng.choice(QA_WORDS[:10]) for _ in range(4 - kept)]
            lines.append(f"{i}\tmain-captions\tMSRvid\t2012test\t{i:04d}\tnone\tnone\t{' '.join(a)}\t{' '.join(b)}\t"
                         f"{5.0 * kept / 4:.3f}")
        (root / "STS-B" / name).write_text("\n".join(lines) + "\n")
    return root


PARAGRAPHS = [
    ("the cat sat on the mat near the red door of the big house . the dog ran in the park near the river .",
     [("where did the cat sit ?", "on the mat"), ("where did the dog run ?", "in the park")]),
    ("bob lives in paris . alice lives in rome . bob went to the river by the green tree .",
     [("who lives in rome ?", "alice"), ("where did bob go ?", "to the river")]),
    ("the door of the small house is blue . the tree near the house is green . the city is big .",
     [("what color is the door ?", "blue"), ("what color is the tree ?", "green")]),
    ("alice went to the park with the dog . the dog sat near the tree . bob sat on the mat in the house .",
     [("who went to the park ?", "alice"), ("where did the dog sit ?", "near the tree")]),
]


def _squad_doc(version_2: bool) -> dict:
    articles = []
    for p, (context, qas) in enumerate(PARAGRAPHS):
        rows = [{"id": f"q{p}-{k}", "question": q, "answers": [{"text": a, "answer_start": context.index(a)}]}
                for k, (q, a) in enumerate(qas)]
        if version_2:
            for row in rows:
                row["is_impossible"] = False
            rows.append({"id": f"q{p}-none", "question": "which city is red ?", "answers": [], "is_impossible": True})
        articles.append({"title": f"t{p}", "paragraphs": [{"context": context, "qas": rows}]})
    return {"version": "2.0" if version_2 else "1.1", "data": articles}


def _write_squad(root: Path, version_2: bool) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    version = "2.0" if version_2 else "1.1"
    for split in ("train", "dev"):
        (root / f"{split}-v{version}.json").write_text(json.dumps(_squad_doc(version_2)))
    return root


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("finetune")
    _bert_dir(root / "base")
    _write_sst2(root / "glue")
    _write_stsb(root / "glue")
    return root


def _sst2(work: Path, **overrides) -> FinetuneConfig:
    values = {"task": "SST-2", "model": str(work / "base"), "data_dir": str(work / "glue"), "lr": 2e-3,
              "epochs": 4, "batch_size": 16, "max_seq_len": 32, "warmup_ratio": 0.1, "seed": 0, "threads": 2}
    return FinetuneConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def sst2_teacher(work: Path) -> tuple[Path, dict, list[dict]]:
    """One seeded fine-tuning run, saved: the basic test checks it, distillation uses it as the teacher."""
    calls: list[dict] = []
    out = work / "sst2-teacher"
    results = finetune(_sst2(work, output_dir=str(out)), on_eval=calls.append)
    return out, results, calls


def test_finetune_sst2_learns_the_rule(sst2_teacher) -> None:
    out, results, calls = sst2_teacher
    assert set(results) == GLUE_KEYS and results["device"] == "cpu"
    assert results["task"] == "sst2" and results["score"] == results["accuracy"]
    assert results["accuracy"] >= 0.8, results
    assert results["steps"] == 4 * math.ceil(256 / 16) and results["train_samples"] == 256
    assert results["eval_samples"] == 64
    assert [c["epoch"] for c in calls] == [1, 2, 3, 4] and calls[-1] == results
    json.dumps(results)  # JSON-able
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.num_labels == 2 and model.config.id2label[1] == "positive"
    enc = tokenizer(["the movie was good", "the movie was bad"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert model(**enc).logits.argmax(-1).tolist() == [1, 0]
    saved = json.loads((out / "finetune.json").read_text())
    assert saved["results"]["accuracy"] == results["accuracy"] and saved["config"]["task"] == "SST-2"


def test_finetune_is_seeded_and_caps_steps(work: Path) -> None:
    a = finetune(_sst2(work, max_steps=5, max_train_samples=50, max_eval_samples=20))
    b = finetune(_sst2(work, max_steps=5, max_train_samples=50, max_eval_samples=20))
    assert a["steps"] == 5 and a["train_samples"] == 50 and a["eval_samples"] == 20 and a["epoch"] == 5 / 4
    assert a["train_loss"] == b["train_loss"] and a["accuracy"] == b["accuracy"]


def test_distillation_into_a_narrower_student(work: Path, sst2_teacher, tmp_path: Path) -> None:
    teacher, _, _ = sst2_teacher
    student = _bert_dir(tmp_path / "student", hidden=16, layers=1, seed=1)
    calls: list[dict] = []
    results = finetune(_sst2(work, model=str(student), teacher=str(teacher), kd_alpha=0.5, kd_temperature=2.0,
                             kd_hidden_weight=1.0, epochs=8), on_eval=calls.append)
    assert len(calls) == 8 and results["teacher"] == str(teacher)
    assert all(math.isfinite(results[k]) for k in ("accuracy", "train_loss"))
    assert results["accuracy"] >= 0.8, results
    # the soft loss alone (no label is seen) carries the rule over from the teacher
    soft_only = finetune(_sst2(work, model=str(student), teacher=str(teacher), kd_alpha=1.0, epochs=8))
    assert soft_only["accuracy"] >= 0.8, soft_only


def test_stsb_regression(work: Path, tmp_path: Path) -> None:
    results = finetune(FinetuneConfig(task="STS-B", model=str(work / "base"), data_dir=str(work / "glue"), lr=2e-3,
                                      epochs=3, batch_size=16, max_seq_len=32, seed=0, output_dir=str(tmp_path / "o")))
    assert set(results) == GLUE_KEYS - {"accuracy"} | {"pearson", "spearmanr", "combined"}
    assert results["score"] == results["spearmanr"]
    assert results["combined"] == (results["pearson"] + results["spearmanr"]) / 2
    assert results["steps"] == 3 * math.ceil(96 / 16) and (results["train_samples"], results["eval_samples"]) == (96, 32)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "o")
    assert model.config.num_labels == 1 and model.config.problem_type == "regression"


def test_stsb_distillation(work: Path, tmp_path: Path) -> None:
    """Regression KD (MSE on the score) with the same width: the hidden loss needs no projection."""
    common = {"task": "stsb", "data_dir": str(work / "glue"), "lr": 2e-3, "batch_size": 16, "max_seq_len": 32}
    finetune(FinetuneConfig(model=str(work / "base"), epochs=1, output_dir=str(tmp_path / "t"), **common))
    results = finetune(FinetuneConfig(model=str(work / "base"), teacher=str(tmp_path / "t"), kd_hidden_weight=0.5,
                                      max_steps=4, **common))
    assert results["steps"] == 4 and math.isfinite(results["train_loss"])


@pytest.mark.parametrize("task", ["squad", "squad_v2"])
def test_squad_end_to_end(work: Path, tmp_path: Path, task: str) -> None:
    data = _write_squad(tmp_path / "squad", version_2=task == "squad_v2")
    calls: list[dict] = []
    cfg = FinetuneConfig(task=task, model=str(work / "base"), data_dir=str(data), lr=3e-3, epochs=2, batch_size=8,
                         max_seq_len=32, doc_stride=8, seed=0)
    results = finetune(cfg, on_eval=calls.append)
    assert len(calls) == 2 and results["eval_features"] > results["eval_samples"]  # long contexts: several windows
    em, f1 = ("exact_match", "f1") if task == "squad" else ("exact", "f1")
    assert 0.0 <= results[em] <= 100.0 and 0.0 <= results[f1] <= 100.0 and results["score"] == results["f1"]
    assert results["missing"] == 0 and results["total"] == results["eval_samples"]
    if task == "squad_v2":
        assert {"HasAns_f1", "NoAns_f1", "best_f1"} <= set(results)
    # QA distillation from the model just trained (saved), into a narrower student
    teacher = tmp_path / "qa-teacher"
    finetune(FinetuneConfig(**{**cfg.__dict__, "epochs": 1, "output_dir": str(teacher)}))
    student = _bert_dir(tmp_path / "student", hidden=16, layers=1, seed=2)
    kd = finetune(FinetuneConfig(**{**cfg.__dict__, "model": str(student), "teacher": str(teacher),
                                    "kd_hidden_weight": 1.0, "max_steps": 3}))
    assert kd["steps"] == 3 and math.isfinite(kd["train_loss"])


def test_qa_features_round_trip(work: Path) -> None:
    """Training targets point at the answer text; oracle logits on them score 100."""
    tokenizer = AutoTokenizer.from_pretrained(work / "base")
    rows = [(c, q, a) for c, qas in PARAGRAPHS for q, a in qas]
    examples = {"id": [f"q{i}" for i in range(len(rows))], "context": [r[0] for r in rows],
                "question": [r[1] for r in rows],
                "answers": [{"text": [a], "answer_start": [c.index(a)]} for c, _, a in rows]}
    train = qa_features.train_features(examples, tokenizer, 32, 8)
    evals = qa_features.eval_features(examples, tokenizer, 32, 8)
    assert len(train) == len(evals.inputs) > len(rows)
    starts, ends, covered = [], [], set()
    for f, feature in enumerate(train):
        ex, offsets = evals.example_index[f], evals.offsets[f]
        s, e = feature["start_positions"], feature["end_positions"]
        if s != evals.cls_index[f]:
            covered.add(ex)
            assert examples["context"][ex][offsets[s][0]:offsets[e][1]] == examples["answers"][ex]["text"][0]
        start, end = np.zeros(len(offsets)), np.zeros(len(offsets))
        start[s], end[e] = 10.0, 10.0
        starts.append(start)
        ends.append(end)
    assert covered == set(range(len(rows)))  # every answer lies inside at least one window
    predictions, na_probs = qa_features.postprocess(examples, evals, starts, ends)
    assert na_probs == {}
    assert qa_features.squad_scores(examples, predictions) == {"exact_match": 100.0, "f1": 100.0, "total": len(rows),
                                                               "missing": 0}


def test_raynas_model_finetunes(work: Path, tmp_path: Path) -> None:
    net = tiny_supernet("layerwise")
    folder = tmp_path / "raynas-model"
    exported = export_model(net.extract("48:mha48,ffn64,conv3_16,id,id,id"), folder, _tokenizer())
    assert exported.model_type == "raynas"
    out = tmp_path / "ft"
    results = finetune(_sst2(work, model=str(folder), lr=1e-3, epochs=2, output_dir=str(out)))
    assert results["steps"] == 2 * 16
    again = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert type(again).__name__ == "RaynasForSequenceClassification" and again.config.num_labels == 2
    # the saved model is the evaluated one: its dev accuracy, recomputed here, is the reported one
    rows = [line.split("\t") for line in (work / "glue" / "SST-2" / "dev.tsv").read_text().splitlines()[1:]]
    enc = AutoTokenizer.from_pretrained(out)([r[0] for r in rows], return_tensors="pt", padding=True)
    with torch.no_grad():
        predicted = again(**enc).logits.argmax(-1)
    assert (predicted == torch.tensor([int(r[1]) for r in rows])).float().mean().item() == results["accuracy"]


@pytest.mark.parametrize("overrides, field", [
    ({"task": "nope"}, "unknown task"),
    ({"model": "/no/such/model"}, "model:"),
    ({"lr": 0.0}, "lr:"),
    ({"batch_size": 0}, "batch_size:"),
    ({"kd_alpha": 1.5}, "kd_alpha:"),
    ({"kd_alpha": -0.1}, "kd_alpha:"),
    ({"teacher": "/no/such/teacher"}, "teacher:"),
    ({"kd_hidden_weight": 1.0}, "kd_hidden_weight:"),
    ({"max_seq_len": 128}, "max_seq_len:"),
    ({"max_steps": 0}, "max_steps:"),
])
def test_bad_input_names_the_field(work: Path, overrides: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        finetune(_sst2(work, **overrides))


def test_teacher_must_match_the_task(work: Path, sst2_teacher) -> None:
    teacher, _, _ = sst2_teacher
    with pytest.raises(ConfigError, match=r"teacher: .* 2 label\(s\); task stsb needs 1"):
        finetune(FinetuneConfig(task="stsb", model=str(work / "base"), data_dir=str(work / "glue"), max_seq_len=32,
                                teacher=str(teacher)))
    with pytest.raises(ConfigError, match="teacher: .* no trained classification head"):
        finetune(_sst2(work, teacher=str(work / "base")))
    with pytest.raises(ConfigError, match="output_dir:"):
        finetune(_sst2(work, output_dir=str(work / "base")))


def test_squad_stride_must_leave_room(work: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="doc_stride:"):
        finetune(FinetuneConfig(task="squad", model=str(work / "base"), data_dir=str(tmp_path), max_seq_len=32,
                                doc_stride=24))
