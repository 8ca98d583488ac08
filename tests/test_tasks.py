"""Task registry and loaders: small GLUE-layout TSV and SQuAD JSON files in tmp_path, no network."""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets
import pytest

from raynas.errors import ConfigError
from raynas.evaluation import GLUE_TASKS, TASKS, canonical_task, get_task, load_task_split, task_file

SHARED = Path(__file__).parents[2] / "shared/data"
MNLI_DEV_HEADER = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
                   "sentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label")
STSB_HEADER = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"


def write(root: Path, relative: str, lines: list[str]) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def no_hub(monkeypatch):
    """With a data_dir nothing may reach for the hub: make any attempt fail loudly."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"load_dataset called: {args}")
    monkeypatch.setattr(datasets, "load_dataset", refuse)


def test_registry():
    assert GLUE_TASKS == ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "mnli_m", "mnli_mm", "qnli", "rte", "wnli")
    for task in TASKS.values():
        if task.kind == "classification":
            assert task.num_labels == len(task.label_names) >= 2
    assert get_task("stsb").num_labels == 1 and get_task("stsb").kind == "regression"
    assert (get_task("squad").hub_path, get_task("squad_v2").hub_path) == ("rajpurkar/squad", "rajpurkar/squad_v2")
    assert get_task("mnli_mm").hub_config == "mnli"
    assert [canonical_task(n) for n in ("SST-2", "STS-B", "MNLI-m", "MNLI-mm", "CoLA", "SQuAD_v2")] == [
        "sst2", "stsb", "mnli_m", "mnli_mm", "cola", "squad_v2"]
    assert task_file("MNLI-mm", "dev", "/d") == Path("/d/MNLI/dev_mismatched.tsv")
    assert task_file("squad", "dev", "/d") == Path("/d/dev-v1.1.json")


def test_sst2_with_header(tmp_path):
    write(tmp_path, "SST-2/dev.tsv", ["sentence\tlabel", "a charming journey . \t1", 'bleak "and desperate \t0'])
    ds = load_task_split("sst2", "validation", tmp_path)
    assert ds.column_names == ["text_a", "label"]
    assert list(ds["text_a"]) == ["a charming journey . ", 'bleak "and desperate ']  # unbalanced quote kept (QUOTE_NONE)
    assert list(ds["label"]) == [1, 0]
    assert ds.features["label"].names == ["negative", "positive"]


def test_cola_headerless(tmp_path):
    write(tmp_path, "CoLA/train.tsv", ["gj04\t1\t\tOur friends won't buy this analysis.",
                                       "gj04\t0\t*\tThey drank the pub."])
    ds = load_task_split("cola", "train", tmp_path)
    assert ds.column_names == ["text_a", "label"]
    assert list(ds["text_a"]) == ["Our friends won't buy this analysis.", "They drank the pub."]
    assert list(ds["label"]) == [1, 0]


def test_qnli_string_labels(tmp_path):
    write(tmp_path, "QNLI/dev.tsv", ["index\tquestion\tsentence\tlabel",
                                     "0\tWhat is it?\tIt is a test.\tentailment",
                                     "1\tWho?\tNobody \"here.\tnot_entailment"])
    ds = load_task_split("qnli", "dev", tmp_path)
    assert ds.column_names == ["text_a", "text_b", "label"]
    assert (list(ds["text_a"]), list(ds["text_b"]), list(ds["label"])) == (
        ["What is it?", "Who?"], ["It is a test.", 'Nobody "here.'], [0, 1])


def test_stsb_float_scores(tmp_path):
    write(tmp_path, "STS-B/dev.tsv", [STSB_HEADER, "0\tmain-captions\tMSRvid\t2012test\t0000\tnone\tnone\tA man."
                                      "\tA person.\t5.000", "1\tmain-news\tx\t2012\t1\tnone\tnone\tOne.\tTwo.\t0.75"])
    ds = load_task_split("STS-B", "dev", tmp_path)
    assert (list(ds["text_a"]), list(ds["text_b"])) == (["A man.", "One."], ["A person.", "Two."])
    assert list(ds["label"]) == pytest.approx([5.0, 0.75])
    assert ds.features["label"].dtype == "float32"


def test_mnli_dev_matched(tmp_path):
    rows = [f"{i}\t1\t1e\tfiction\t(x)\t(y)\t(X)\t(Y)\tPremise {i}.\tHypothesis {i}.\t{g}\t{g}\t{g}\t{g}\t{g}\t{g}"
            for i, g in enumerate(["neutral", "contradiction", "entailment"])]
    write(tmp_path, "MNLI/dev_matched.tsv", [MNLI_DEV_HEADER, *rows])
    expected = ([f"Premise {i}." for i in range(3)], [f"Hypothesis {i}." for i in range(3)], [1, 2, 0])
    for task, split in (("mnli", "validation_matched"), ("mnli", "dev_matched"), ("mnli_m", "validation")):
        ds = load_task_split(task, split, tmp_path)
        assert (list(ds["text_a"]), list(ds["text_b"]), list(ds["label"])) == expected
        assert ds.features["label"].names == ["entailment", "neutral", "contradiction"]  # the hub's order


def test_mrpc_with_bom_and_qqp_short_rows(tmp_path):
    path = tmp_path / "MRPC/dev.tsv"
    path.parent.mkdir()
    path.write_text("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tHe said \"yes.\tHe agreed.\n",
                    encoding="utf-8")
    ds = load_task_split("mrpc", "dev", tmp_path)
    assert (list(ds["text_a"]), list(ds["text_b"]), list(ds["label"])) == (['He said "yes.'], ["He agreed."], [1])
    write(tmp_path, "QQP/dev.tsv", ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate", "1\t1\t2\tWhy?\tHow?\t0",
                                    "2\t3\t4\tTruncated?", "3\t5\t6\tWhat?\tWhat is it?\t1"])
    assert list(load_task_split("qqp", "dev", tmp_path)["label"]) == [0, 1]


def test_squad_json(tmp_path):
    doc = {"version": "v2.0", "data": [{"title": "Rome", "paragraphs": [{"context": "Rome is in Italy.", "qas": [
        {"id": "q1", "question": "Where is Rome?", "answers": [{"text": "Italy", "answer_start": 11}]},
        {"id": "q2", "question": "Where is Paris?", "answers": [], "is_impossible": True},
    ]}]}]}
    (tmp_path / "dev-v2.0.json").write_text(json.dumps(doc), encoding="utf-8")
    ds = load_task_split("squad_v2", "validation", tmp_path)
    assert ds.column_names == ["id", "title", "context", "question", "answers"]
    assert list(ds["id"]) == ["q1", "q2"] and list(ds["title"]) == ["Rome", "Rome"]
    assert list(ds["answers"]) == [{"text": ["Italy"], "answer_start": [11]}, {"text": [], "answer_start": []}]


def test_errors_name_the_task_or_file(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown task 'glu' \(known: cola, sst2, .*squad_v2\)"):
        load_task_split("glu", "dev", tmp_path)
    with pytest.raises(ConfigError, match="task mnli: unknown split 'validation'.*validation_matched"):
        load_task_split("mnli", "validation", tmp_path)
    with pytest.raises(ConfigError, match="no such file " + re.escape(str((tmp_path / "SST-2" / "dev.tsv").absolute()))):
        load_task_split("sst2", "dev", tmp_path)

    bad = write(tmp_path, "SST-2/dev.tsv", ["text\tlabel", "x\t1"])
    with pytest.raises(ConfigError, match=f"{re.escape(str(bad))}: .*columns sentence, label; the header has: text, label"):
        load_task_split("sst2", "dev", tmp_path)
    bad = write(tmp_path, "CoLA/dev.tsv", ["source\tlabel\toriginal_label\tsentence", "gj04\t1\t\tFine."])
    with pytest.raises(ConfigError, match=f"{re.escape(str(bad))}: .*no header and 4 .*line 1 has: source, label"):
        load_task_split("cola", "dev", tmp_path)
    bad = write(tmp_path, "QNLI/dev.tsv", ["index\tquestion\tsentence\tlabel", "0\tQ\tS\tentailment", "1\tQ\tS\tmaybe"])
    with pytest.raises(ConfigError, match=f"{re.escape(str(bad))}:3: unknown label 'maybe'"):
        load_task_split("qnli", "dev", tmp_path)
    bad = write(tmp_path, "STS-B/dev.tsv", [STSB_HEADER, "0\tg\tf\ty\to\ts\ts\tA.\tB.\thigh"])
    with pytest.raises(ConfigError, match=f"{re.escape(str(bad))}:2: score 'high' is not a number"):
        load_task_split("stsb", "dev", tmp_path)
    bad = write(tmp_path, "RTE/dev.tsv", ["index\tsentence1\tsentence2\tlabel", "0\tonly one sentence"])
    with pytest.raises(ConfigError, match=f"{re.escape(str(bad))}:2: expected at least 4 tab-separated columns, got 2"):
        load_task_split("rte", "dev", tmp_path)

    bad = tmp_path / "dev-v1.1.json"
    bad.write_text('{"data": [', encoding="utf-8")
    with pytest.raises(ConfigError, match=f"{re.escape(str(bad))}: malformed JSON"):
        load_task_split("squad", "dev", tmp_path)
    bad.write_text(json.dumps({"data": [{"paragraphs": [{"context": "c"}]}]}), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"not the SQuAD layout: data\[0\].paragraphs\[0\] should be"):
        load_task_split("squad", "dev", tmp_path)


def test_hub_columns_are_renamed(monkeypatch):
    hub = datasets.Dataset.from_dict(
        {"premise": ["P."], "hypothesis": ["H."], "label": [2], "idx": [0]},
        features=datasets.Features({"premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
                                    "label": datasets.ClassLabel(names=["entailment", "neutral", "contradiction"]),
                                    "idx": datasets.Value("int32")}))
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or hub)
    ds = load_task_split("MNLI-mm", "validation")
    assert calls == [(("nyu-mll/glue", "mnli"), {"split": "validation_mismatched"})]
    assert ds.column_names == ["text_a", "text_b", "label"] and ds[0] == {"text_a": "P.", "text_b": "H.", "label": 2}

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConfigError, match="task sst2: cannot load nyu-mll/glue .*pass a data_dir"):
        load_task_split("sst2", "train")


@pytest.mark.skipif(not (SHARED / "glue/SST-2/dev.tsv").is_file(), reason="shared GLUE SST-2 dev not present")
def test_real_sst2_dev():
    labels = list(load_task_split("sst2", "dev", SHARED / "glue")["label"])
    assert (len(labels), labels.count(1), labels.count(0)) == (872, 444, 428)


@pytest.mark.skipif(not (SHARED / "glue/QNLI/dev.tsv").is_file(), reason="shared GLUE QNLI dev not present")
def test_real_qnli_dev():
    labels = list(load_task_split("qnli", "dev", SHARED / "glue")["label"])
    assert (len(labels), labels.count(0), labels.count(1)) == (5463, 2702, 2761)


@pytest.mark.skipif(not (SHARED / "squad/dev-v1.1.json").is_file(), reason="shared SQuAD dev not present")
def test_real_squad_dev():
    ds = load_task_split("squad", "validation", SHARED / "squad")
    assert ds.num_rows == 10570 and len(set(list(ds["id"]))) == 10570
