"""GLUE metrics against sklearn/scipy on seeded random inputs; SQuAD scoring on hand-made cases."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from raynas.errors import ConfigError
from raynas.evaluation import (
    average_ranks,
    find_best_thresh,
    glue_metrics,
    load_squad_articles,
    normalize_answer,
    primary_metric,
    squad_v1_scores,
    squad_v2_scores,
    token_f1,
)
from raynas.evaluation import metrics as m

SQUAD_DEV = Path(__file__).parents[2] / "shared/data/squad/dev-v1.1.json"


def class_cases(num_classes: int = 2) -> list[tuple[np.ndarray, np.ndarray]]:
    """20 seeded (predictions, labels) pairs; the first few are the degenerate ones."""
    cases = []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        n = int(rng.integers(5, 80))
        pred, label = rng.integers(0, num_classes, n), rng.integers(0, num_classes, n)
        if seed == 0:
            pred[:] = 0  # constant prediction
        elif seed == 1:
            label[:] = 1  # constant labels
        elif seed == 2:
            pred[:], label[:] = 0, 0  # no positives anywhere: F1 is 0/0
        elif seed == 3:
            pred = label.copy()  # perfect
        elif seed == 4:
            pred = num_classes - 1 - label  # perfectly wrong
        cases.append((pred, label))
    return cases


def score_cases() -> list[tuple[np.ndarray, np.ndarray]]:
    """20 seeded STS-B-like (predictions, gold) pairs with ties, constants and n = 2."""
    cases = []
    for seed in range(20):
        rng = np.random.default_rng(100 + seed)
        n = int(rng.integers(3, 60))
        gold = rng.integers(0, 26, n) / 5.0  # 0..5 in steps of 0.2: many ties
        pred = gold + rng.normal(0, 1.5, n)
        if seed % 3 == 0:
            pred = np.round(pred)  # ties in the predictions too
        if seed == 0:
            pred[:] = 2.5
        elif seed == 1:
            gold[:] = 3.0
        elif seed == 2:
            pred, gold = pred[:2], gold[:2] + np.array([0.0, 1.0])
        cases.append((pred, gold))
    return cases


def quiet(fn, *args, **kwargs):
    """Call a reference that warns on the degenerate cases (which is what they test)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def same(ours: float, reference: float) -> bool:
    return (math.isnan(ours) and math.isnan(reference)) or ours == pytest.approx(reference, abs=1e-12)


@pytest.mark.parametrize("case", range(20))
def test_classification_metrics_match_sklearn(case):
    pred, label = class_cases()[case]
    assert same(m.accuracy(pred, label), skm.accuracy_score(label, pred))
    assert same(m.binary_f1(pred, label), quiet(skm.f1_score, label, pred))
    assert same(m.matthews_corrcoef(pred, label), quiet(skm.matthews_corrcoef, label, pred))


@pytest.mark.parametrize("case", range(20))
def test_multiclass_mcc_matches_sklearn(case):
    pred, label = class_cases(num_classes=3)[case]
    assert same(m.matthews_corrcoef(pred, label), quiet(skm.matthews_corrcoef, label, pred))


@pytest.mark.parametrize("case", range(20))
def test_correlations_match_scipy(case):
    pred, gold = score_cases()[case]
    assert same(m.pearson(pred, gold), float(quiet(stats.pearsonr, pred, gold)[0]))
    assert same(m.spearman(pred, gold), float(quiet(stats.spearmanr, pred, gold)[0]))


def test_degenerate_values_are_documented_ones():
    assert m.matthews_corrcoef([1, 1, 1], [0, 1, 0]) == 0.0
    assert m.binary_f1([0, 0], [0, 0]) == 0.0
    assert math.isnan(m.pearson([1.0, 1.0, 1.0], [0.0, 1.0, 2.0]))
    assert math.isnan(m.spearman([0.0, 1.0, 2.0], [4.0, 4.0, 4.0]))
    assert math.isnan(m.pearson([0.0, np.nan, 1.0], [0.0, 1.0, 2.0]))
    assert math.isnan(glue_metrics("stsb", [2.0, 2.0, 2.0], [0.0, 1.0, 2.0])["combined"])


def test_average_ranks_match_scipy():
    values = np.array([3.0, 1.0, 3.0, 2.0, 3.0, 1.0, 7.0])
    assert average_ranks(values).tolist() == stats.rankdata(values, method="average").tolist()


def test_glue_metrics_sets_and_inputs():
    labels = np.array([0, 1, 1, 0, 1])
    logits = np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [5.0, 1.0], [0.0, 1.0]])  # argmax: 0 1 0 0 1
    assert glue_metrics("CoLA", logits, labels).keys() == {"mcc"}
    for task in ("SST-2", "MNLI-m", "MNLI-mm", "qnli", "rte", "wnli", "mnli"):
        assert glue_metrics(task, logits, labels) == {"accuracy": pytest.approx(0.8)}
    mrpc = glue_metrics("MRPC", logits, labels)
    assert mrpc == {"f1": pytest.approx(0.8), "accuracy": pytest.approx(0.8), "combined": pytest.approx(0.8)}
    assert glue_metrics("qqp", [0, 1, 0, 0, 1], labels) == mrpc  # ids and logits agree
    stsb = glue_metrics("STS-B", np.array([[0.1], [0.4], [0.35], [0.8]]), [0.0, 1.0, 2.0, 3.0])
    assert stsb["pearson"] == pytest.approx(stats.pearsonr([0.1, 0.4, 0.35, 0.8], [0, 1, 2, 3])[0])
    assert stsb["spearmanr"] == pytest.approx(0.8)
    assert stsb["combined"] == pytest.approx((stsb["pearson"] + stsb["spearmanr"]) / 2)


def test_primary_metric_is_a_reported_key():
    expected = {"cola": "mcc", "stsb": "spearmanr", "mrpc": "f1", "qqp": "f1", "sst2": "accuracy",
                "MNLI-m": "accuracy", "mnli_mm": "accuracy", "qnli": "accuracy", "rte": "accuracy",
                "wnli": "accuracy", "squad": "f1", "squad_v2": "f1"}
    for task, metric in expected.items():
        assert primary_metric(task) == metric
        if "squad" not in task:
            assert metric in glue_metrics(task, [0, 1, 1], [0, 1, 0] if task != "stsb" else [0.0, 1.0, 0.5])


def test_bad_inputs():
    with pytest.raises(ConfigError, match="unknown task 'glu'.*sst2"):
        glue_metrics("glu", [0], [0])
    with pytest.raises(ValueError, match="not a GLUE task"):
        glue_metrics("squad", [0], [0])
    with pytest.raises(ValueError, match="3 predictions but 2 labels"):
        m.accuracy([0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="no predictions"):
        m.accuracy([], [])


# --- SQuAD -------------------------------------------------------------------


def articles(questions: dict[str, list[str]]) -> list[dict]:
    """An official-layout ``data`` list: one paragraph holding each question and its gold texts."""
    qas = [{"id": qid, "question": "q?", "answers": [{"text": t, "answer_start": 0} for t in gold]}
           for qid, gold in questions.items()]
    return [{"title": "T", "paragraphs": [{"context": "c", "qas": qas}]}]


def test_normalize_answer():
    assert normalize_answer("  The  Eiffel-Tower, in Paris! ") == "eiffeltower in paris"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words


def test_squad_v1_hand_cases():
    gold = {
        "punct": ["paris"],
        "article": ["Eiffel Tower"],
        "multi_em": ["Broncos", "Denver Broncos", "the Panthers"],
        "multi_f1": ["Denver Broncos", "Broncos"],
        "partial": ["1066"],
        "repeat": ["rain in Spain"],
        "empty": ["something"],
        "missing": ["anything"],
    }
    predictions = {"punct": "Paris.", "article": "the Eiffel Tower", "multi_em": "Denver Broncos",
                   "multi_f1": "Broncos team", "partial": "in the year 1066 AD", "repeat": "rain rain rain",
                   "empty": ""}
    # multi_f1: vs "Denver Broncos" P = R = 1/2 -> 1/2; vs "Broncos" P = 1/2, R = 1 -> 2/3; the max is taken
    assert token_f1("Broncos team", "Broncos") == pytest.approx(2 / 3)
    # partial: tokens [in, year, 1066, ad] vs [1066]: P = 1/4, R = 1 -> 2 * (1/4) / (5/4) = 0.4
    assert token_f1("in the year 1066 AD", "1066") == pytest.approx(0.4)
    # repeat: the Counter overlap counts "rain" once: P = 1/3, R = 1/3 -> 1/3
    assert token_f1("rain rain rain", "rain in Spain") == pytest.approx(1 / 3)
    scores = squad_v1_scores(articles(gold), predictions)
    em = [1, 1, 1, 0, 0, 0, 0, 0]
    f1 = [1, 1, 1, 2 / 3, 0.4, 1 / 3, 0, 0]
    assert scores["exact_match"] == pytest.approx(100 * sum(em) / 8)
    assert scores["f1"] == pytest.approx(100 * sum(f1) / 8)
    assert scores["total"] == 8 and scores["missing"] == 1


V2_GOLD = {"a": ["Rome"], "b": ["blue whale"], "c": [], "d": []}
V2_PRED = {"a": "rome", "b": "whale", "c": "x", "d": "y"}
V2_NA = {"a": 0.1, "b": 0.3, "c": 0.4, "d": 0.9}


def test_squad_v2_no_answer_scoring():
    s = squad_v2_scores(articles({"na": [], "na2": [], "has": ["cat"]}), {"na": "", "na2": "a dog", "has": ""})
    assert s["exact"] == s["f1"] == pytest.approx(100 / 3)  # only the abstention on a no-answer question is right
    assert (s["NoAns_exact"], s["NoAns_total"], s["HasAns_exact"], s["HasAns_total"]) == (50.0, 2, 0.0, 1)
    assert "best_exact" not in s
    # a gold answer that normalises to nothing: gold becomes "", yet the question counts as answerable
    s = squad_v2_scores(articles({"q": ["The"]}), {"q": ""})
    assert (s["exact"], s["HasAns_total"], "NoAns_total" in s) == (100.0, 1, False)

    s = squad_v2_scores(articles(V2_GOLD), V2_PRED)
    assert s["exact"] == pytest.approx(25.0)  # only "a"
    assert s["f1"] == pytest.approx(100 * (1 + 2 / 3) / 4)  # "whale" vs "blue whale": P 1, R 1/2
    assert s["HasAns_f1"] == pytest.approx(100 * (1 + 2 / 3) / 2) and s["NoAns_f1"] == 0.0


def test_squad_v2_threshold_search():
    # Walk in na_prob order from "abstain on all" (c, d right: 2): a +1 -> 3 (best EM, 0.1);
    # b +0 EM / +2/3 F1 -> 3 / 3.67 (best F1, 0.3); c -1; d -1.
    s = squad_v2_scores(articles(V2_GOLD), V2_PRED, na_probs=V2_NA)
    assert (s["best_exact"], s["best_exact_thresh"]) == (pytest.approx(75.0), 0.1)
    assert (s["best_f1"], s["best_f1_thresh"]) == (pytest.approx(100 * (3 + 2 / 3) / 4), 0.3)
    # abstaining above the best threshold reproduces the best score
    at_best = squad_v2_scores(articles(V2_GOLD), V2_PRED, na_probs=V2_NA, na_prob_thresh=0.1)
    assert at_best["exact"] == pytest.approx(s["best_exact"])
    at_best = squad_v2_scores(articles(V2_GOLD), V2_PRED, na_probs=V2_NA, na_prob_thresh=0.3)
    assert at_best["f1"] == pytest.approx(s["best_f1"])
    has_ans = {q: bool(g) for q, g in V2_GOLD.items()}
    assert find_best_thresh(V2_PRED, {"a": 1.0, "b": 0.0, "c": 0.0, "d": 0.0}, V2_NA, has_ans) == (75.0, 0.1)


def test_squad_v2_missing_prediction_counts_as_wrong():
    s = squad_v2_scores(articles(V2_GOLD), {"a": "Rome", "c": ""}, na_probs={"a": 0.2, "c": 0.5})
    assert s["total"] == 4 and s["missing"] == 2
    assert s["exact"] == 50.0 and s["NoAns_exact"] == 50.0 and s["HasAns_exact"] == 50.0
    assert s["best_exact"] == 50.0
    with pytest.raises(ValueError, match="na_probs has no value"):
        squad_v2_scores(articles(V2_GOLD), V2_PRED, na_probs={"a": 0.5})


@pytest.mark.skipif(not SQUAD_DEV.is_file(), reason=f"{SQUAD_DEV} not present")
def test_squad_v1_dev_first_gold_answer_scores_100():
    data = load_squad_articles(SQUAD_DEV)
    predictions = {qa["id"]: qa["answers"][0]["text"] for a in data for p in a["paragraphs"] for qa in p["qas"]}
    scores = squad_v1_scores(data, predictions)
    assert scores == {"exact_match": 100.0, "f1": 100.0, "total": 10570, "missing": 0}
