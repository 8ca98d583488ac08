"""SQuAD v1.1 and v2.0 scoring, re-implemented from the official evaluation scripts.

Numbers match ``evaluate-v1.1.py`` and ``evaluate-v2.0.py`` exactly (same answer
normalisation, token F1, max over gold answers, percentages), so results are
comparable with published ones. Two differences, both about missing predictions:
nothing is printed (the count is returned as ``missing``), and in v2 a missing
prediction scores 0 and stays in every denominator, as in v1 -- the official v2
script drops it from ``total`` and then fails on the HasAns/NoAns breakdown.

``dataset_articles`` is the ``data`` list of the official JSON
(:func:`raynas.evaluation.tasks.load_squad_articles` reads it).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Any, Iterable, Mapping

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(gold)


def token_f1(prediction: str, gold: str) -> float:
    """Bag-of-tokens F1 of v1.1: 0.0 when nothing overlaps, including two empty answers."""
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1_v2(prediction: str, gold: str) -> float:
    """v2.0's F1: where either answer is empty (no-answer), 1.0 if both are, else 0.0."""
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    return token_f1(prediction, gold)


def _questions(dataset_articles: Iterable[Mapping[str, Any]]) -> Iterable[Mapping[str, Any]]:
    for article in dataset_articles:
        for paragraph in article["paragraphs"]:
            yield from paragraph["qas"]


def gold_answers(dataset_articles: Iterable[Mapping[str, Any]], version: str = "1.1") -> dict[str, list[str]]:
    """Question id -> gold answer texts. v2.0 drops answers that normalise to nothing;
    a question left without one is a no-answer question, whose only gold answer is ``""``."""
    if version not in ("1.1", "2.0"):
        raise ValueError(f"SQuAD version {version!r}: expected '1.1' or '2.0'")
    gold = {}
    for qa in _questions(dataset_articles):
        texts = [a["text"] for a in qa["answers"]]
        if version == "2.0":
            texts = [t for t in texts if normalize_answer(t)] or [""]
        gold[qa["id"]] = texts
    return gold


def squad_v1_scores_from_gold(gold: Mapping[str, list[str]], predictions: Mapping[str, str]) -> dict[str, float]:
    """v1.1 scores from ``{qid: [gold texts]}``: see :func:`squad_v1_scores`."""
    em = f1 = 0.0
    missing = 0
    for qid, answers in gold.items():
        if qid not in predictions:
            missing += 1
            continue
        prediction = predictions[qid]
        em += max(float(exact_match(prediction, a)) for a in answers)
        f1 += max(token_f1(prediction, a) for a in answers)
    total = len(gold)
    if total == 0:
        raise ValueError("no questions to score")
    return {"exact_match": 100.0 * em / total, "f1": 100.0 * f1 / total, "total": total, "missing": missing}


def squad_v1_scores(dataset_articles: Iterable[Mapping[str, Any]], predictions: Mapping[str, str]) -> dict[str, float]:
    """Official v1.1 metric: ``exact_match`` and ``f1`` in percent over every question.

    A question without a prediction scores 0 and is counted in ``missing``
    (the official script prints "Unanswered question ... will receive score 0").
    """
    return squad_v1_scores_from_gold(gold_answers(dataset_articles, "1.1"), predictions)


def find_best_thresh(
    predictions: Mapping[str, str],
    scores: Mapping[str, float],
    na_probs: Mapping[str, float],
    qid_to_has_ans: Mapping[str, bool],
) -> tuple[float, float]:
    """The no-answer threshold that maximises the score, as ``evaluate-v2.0.py`` finds it.

    Start with every question answered "no answer" (each no-answer question right),
    then, in increasing ``na_probs`` order, switch each question to its predicted
    text: an answerable question gains its ``scores`` value, a no-answer question
    with a non-empty prediction loses 1. Returns (best score in percent, the
    no-answer probability at which it is reached); predict "no answer" when
    ``na_prob > thresh``. Questions absent from ``scores`` (no prediction) score 0
    and count in the denominator, ``len(qid_to_has_ans)``. Ties in ``na_probs``
    are walked one question at a time and the initial threshold is 0.0, both as
    in the official script.
    """
    score = best = sum(1 for qid, has in qid_to_has_ans.items() if not has and qid in scores)
    best_thresh = 0.0
    for qid in sorted(na_probs, key=lambda k: na_probs[k]):
        if qid not in scores:
            continue
        if qid_to_has_ans[qid]:
            score += scores[qid]
        elif predictions[qid]:
            score -= 1
        if score > best:
            best, best_thresh = score, na_probs[qid]
    return 100.0 * best / len(qid_to_has_ans), float(best_thresh)


def _percent(values: Mapping[str, float], qids: list[str]) -> float:
    return 100.0 * sum(values.get(qid, 0.0) for qid in qids) / len(qids)


def squad_v2_scores_from_gold(
    gold: Mapping[str, list[str]],
    predictions: Mapping[str, str],
    na_probs: Mapping[str, float] | None = None,
    na_prob_thresh: float = 1.0,
    has_answer: Mapping[str, bool] | None = None,
) -> dict[str, float]:
    """v2.0 scores from ``{qid: [gold texts]}`` (``[""]`` for no-answer): see :func:`squad_v2_scores`.

    ``has_answer`` defaults to "gold is not ``[""]``"; the official script instead asks
    whether the raw answer list is non-empty, which differs only for gold answers that
    normalise to nothing (such as "the"), so :func:`squad_v2_scores` passes that.
    """
    if not gold:
        raise ValueError("no questions to score")
    has_ans = dict(has_answer) if has_answer is not None else {qid: answers != [""] for qid, answers in gold.items()}
    exact_raw: dict[str, float] = {}
    f1_raw: dict[str, float] = {}
    for qid, answers in gold.items():
        if qid in predictions:
            exact_raw[qid] = max(float(exact_match(predictions[qid], a)) for a in answers)
            f1_raw[qid] = max(token_f1_v2(predictions[qid], a) for a in answers)
    probs = na_probs if na_probs is not None else dict.fromkeys(predictions, 0.0)
    absent = [qid for qid in exact_raw if qid not in probs]
    if absent:
        raise ValueError(f"na_probs has no value for {len(absent)} predicted question(s), e.g. {absent[0]!r}")

    def thresholded(raw: Mapping[str, float]) -> dict[str, float]:
        # predicted no-answer: right exactly when the question has none
        return {qid: float(not has_ans[qid]) if probs[qid] > na_prob_thresh else s for qid, s in raw.items()}

    exact, f1 = thresholded(exact_raw), thresholded(f1_raw)
    everyone = list(gold)
    out: dict[str, float] = {
        "exact": _percent(exact, everyone), "f1": _percent(f1, everyone), "total": len(everyone),
        "missing": len(gold) - len(exact_raw),
    }
    for prefix, wanted in (("HasAns", True), ("NoAns", False)):
        qids = [qid for qid in everyone if has_ans[qid] == wanted]
        if qids:  # as the official script, a group with no question has no keys
            out.update({f"{prefix}_exact": _percent(exact, qids), f"{prefix}_f1": _percent(f1, qids),
                        f"{prefix}_total": len(qids)})
    if na_probs is not None:
        out["best_exact"], out["best_exact_thresh"] = find_best_thresh(predictions, exact_raw, na_probs, has_ans)
        out["best_f1"], out["best_f1_thresh"] = find_best_thresh(predictions, f1_raw, na_probs, has_ans)
    return out


def squad_v2_scores(
    dataset_articles: Iterable[Mapping[str, Any]],
    predictions: Mapping[str, str],
    na_probs: Mapping[str, float] | None = None,
    na_prob_thresh: float = 1.0,
) -> dict[str, float]:
    """Official v2.0 metric, in percent: ``exact``, ``f1``, ``total``, ``missing``,
    ``HasAns_{exact,f1,total}`` and ``NoAns_{exact,f1,total}``.

    An empty prediction means "no answer". ``na_probs`` (question id -> probability
    of no answer) overrides a prediction with "no answer" where it exceeds
    ``na_prob_thresh``; when given, ``best_exact``/``best_f1`` and their thresholds
    (:func:`find_best_thresh`) are added.
    """
    dataset_articles = list(dataset_articles)
    has_answer = {qa["id"]: bool(qa["answers"]) for qa in _questions(dataset_articles)}
    gold = gold_answers(dataset_articles, "2.0")
    return squad_v2_scores_from_gold(gold, predictions, na_probs, na_prob_thresh, has_answer)
