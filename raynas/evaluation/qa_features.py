"""SQuAD pre- and post-processing for extractive-QA fine-tuning (the run_squad.py / run_qa.py recipe).

A question and a long context become several overlapping windows ("features") of
at most ``max_seq_len`` tokens, ``doc_stride`` tokens of overlap apart. Training
labels each window with the answer's token span, or with the [CLS] index when the
answer is not wholly inside it. Evaluation takes the ``n_best`` start and end
logits of every window, keeps valid spans (both ends in the context, start <= end,
at most ``max_answer_len`` tokens), maps the best back to context characters
through the tokenizer's offsets and keeps the best window per question. SQuAD v2
compares it with the best null score ([CLS] start + end, minimum over windows).

Questions longer than ``question_budget`` tokens are cut (BERT's
``max_query_length`` = 64), so the context always has room for a window and the
tokenizer's stride never exceeds it (the Rust tokenizer panics if it does).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from raynas.errors import ConfigError
from raynas.evaluation.squad_metrics import normalize_answer, squad_v1_scores_from_gold, squad_v2_scores_from_gold

MAX_QUERY_TOKENS = 64  # BERT's max_query_length
MIN_QUERY_TOKENS = 8
N_BEST = 20
MAX_ANSWER_TOKENS = 30
MODEL_INPUTS = ("input_ids", "token_type_ids", "attention_mask")

Examples = Mapping[str, Sequence[Any]]  # columns id, context, question, answers (the hub ``squad`` layout)


@dataclass
class EvalFeatures:
    """Windows to run the model on, and what maps their logits back to questions and text."""

    inputs: list[dict[str, list[int]]] = field(default_factory=list)
    example_index: list[int] = field(default_factory=list)  # which question each window belongs to
    offsets: list[list[tuple[int, int] | None]] = field(default_factory=list)  # None outside the context
    cls_index: list[int] = field(default_factory=list)


def question_budget(max_seq_len: int, doc_stride: int) -> int:
    """Most question tokens a window can hold so that the context part stays longer than the stride."""
    budget = min(MAX_QUERY_TOKENS, max_seq_len - 4 - doc_stride)  # [CLS] q [SEP] c [SEP], and stride < |c|
    if budget < MIN_QUERY_TOKENS:
        raise ConfigError(f"doc_stride: {doc_stride} leaves no room for a question in max_seq_len={max_seq_len} "
                          f"(need doc_stride <= max_seq_len - {4 + MIN_QUERY_TOKENS})")
    return budget


def _clip_questions(questions: Sequence[str], tokenizer: Any, max_tokens: int) -> list[str]:
    """Questions without leading blanks (some SQuAD questions have many), cut to ``max_tokens`` tokens."""
    stripped = [q.lstrip() for q in questions]
    enc = tokenizer(stripped, add_special_tokens=False, return_offsets_mapping=True)
    return [q if len(offsets) <= max_tokens else q[:offsets[max_tokens - 1][1]]
            for q, offsets in zip(stripped, enc["offset_mapping"])]


def _encode(examples: Examples, tokenizer: Any, max_seq_len: int, doc_stride: int) -> Any:
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError("model: extractive QA needs a fast (Rust) tokenizer for character offsets")
    questions = _clip_questions(examples["question"], tokenizer, question_budget(max_seq_len, doc_stride))
    return tokenizer(questions, list(examples["context"]), truncation="only_second", max_length=max_seq_len,
                     stride=doc_stride, return_overflowing_tokens=True, return_offsets_mapping=True)


def _inputs(enc: Any, i: int) -> dict[str, list[int]]:
    return {key: list(enc[key][i]) for key in MODEL_INPUTS if key in enc}


def _cls_index(input_ids: Sequence[int], tokenizer: Any) -> int:
    cls = tokenizer.cls_token_id
    return input_ids.index(cls) if cls is not None and cls in input_ids else 0


def _context_span(sequence_ids: Sequence[int | None]) -> tuple[int, int]:
    """First and last token index of the context (sequence 1) in a window."""
    context = [k for k, s in enumerate(sequence_ids) if s == 1]
    return context[0], context[-1]


def train_features(examples: Examples, tokenizer: Any, max_seq_len: int, doc_stride: int) -> list[dict[str, Any]]:
    """Model inputs plus ``start_positions`` / ``end_positions`` for every window of every question.

    The first gold answer is the target; a window that does not hold all of it (and a
    question without an answer, in SQuAD v2) points both positions at [CLS].
    """
    enc = _encode(examples, tokenizer, max_seq_len, doc_stride)
    features = []
    for i, example in enumerate(enc["overflow_to_sample_mapping"]):
        row = _inputs(enc, i)
        offsets = enc["offset_mapping"][i]
        start = end = _cls_index(row["input_ids"], tokenizer)
        answers = examples["answers"][example]
        if answers["answer_start"]:
            first_char = answers["answer_start"][0]
            end_char = first_char + len(answers["text"][0])
            first, last = _context_span(enc.sequence_ids(i))
            if offsets[first][0] <= first_char and offsets[last][1] >= end_char:
                start = first
                while start <= last and offsets[start][0] <= first_char:
                    start += 1
                start -= 1
                end = last
                while end >= first and offsets[end][1] >= end_char:
                    end -= 1
                end += 1
        features.append({**row, "start_positions": start, "end_positions": end})
    return features


def eval_features(examples: Examples, tokenizer: Any, max_seq_len: int, doc_stride: int) -> EvalFeatures:
    """The windows of every question, with context offsets for mapping spans back to text."""
    enc = _encode(examples, tokenizer, max_seq_len, doc_stride)
    out = EvalFeatures()
    for i, example in enumerate(enc["overflow_to_sample_mapping"]):
        row = _inputs(enc, i)
        sequence_ids = enc.sequence_ids(i)
        out.inputs.append(row)
        out.example_index.append(int(example))
        out.offsets.append([tuple(o) if s == 1 else None for o, s in zip(enc["offset_mapping"][i], sequence_ids)])
        out.cls_index.append(_cls_index(row["input_ids"], tokenizer))
    return out


def _top(logits: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` largest values, largest first (ties: lower index first)."""
    return np.argsort(-logits, kind="stable")[:n]


def _sigmoid(x: float) -> float:
    return 0.5 * (1.0 + math.tanh(0.5 * x)) if math.isfinite(x) else float(x > 0)


def postprocess(
    examples: Examples,
    features: EvalFeatures,
    start_logits: Sequence[np.ndarray],
    end_logits: Sequence[np.ndarray],
    version_2: bool = False,
    n_best: int = N_BEST,
    max_answer_len: int = MAX_ANSWER_TOKENS,
    null_threshold: float = 0.0,
) -> tuple[dict[str, str], dict[str, float]]:
    """``(predictions, na_probs)``: question id -> answer text, and (v2) -> probability of no answer.

    v1: the best valid span ("" only if no window has one). v2: "" when the null score
    exceeds the best span's score by more than ``null_threshold`` (BERT's
    ``null_score_diff_threshold``); ``na_probs`` is the sigmoid of that difference, so
    the official best-threshold search sees the same ordering. v1 returns no na_probs.
    """
    windows: dict[int, list[int]] = defaultdict(list)
    for f, example in enumerate(features.example_index):
        windows[example].append(f)
    predictions: dict[str, str] = {}
    na_probs: dict[str, float] = {}
    for example, (qid, context) in enumerate(zip(examples["id"], examples["context"])):
        best_score, best_text, null_score = -math.inf, "", math.inf
        for f in windows.get(example, []):
            starts, ends, offsets = start_logits[f], end_logits[f], features.offsets[f]
            cls = features.cls_index[f]
            null_score = min(null_score, float(starts[cls] + ends[cls]))
            top_ends = _top(ends, n_best)
            for i in _top(starts, n_best):
                if offsets[i] is None:
                    continue
                for j in top_ends:
                    if offsets[j] is None or j < i or j - i + 1 > max_answer_len:
                        continue
                    score = float(starts[i] + ends[j])
                    if score > best_score:
                        best_score, best_text = score, context[offsets[i][0]:offsets[j][1]]
        if version_2:
            diff = null_score - best_score  # +inf when no window has a valid span
            predictions[qid] = "" if diff > null_threshold else best_text
            na_probs[qid] = _sigmoid(diff)
        else:
            predictions[qid] = best_text
    return predictions, na_probs


def squad_scores(examples: Examples, predictions: Mapping[str, str], na_probs: Mapping[str, float] | None = None,
                 version_2: bool = False) -> dict[str, float]:
    """Official SQuAD v1.1 / v2.0 scores, with gold answers taken from the dataset rows."""
    ids, answers = examples["id"], examples["answers"]
    if not version_2:
        gold = {qid: list(a["text"]) or [""] for qid, a in zip(ids, answers)}
        return squad_v1_scores_from_gold(gold, predictions)
    gold = {qid: [t for t in a["text"] if normalize_answer(t)] or [""] for qid, a in zip(ids, answers)}
    has_answer = {qid: bool(a["text"]) for qid, a in zip(ids, answers)}
    return squad_v2_scores_from_gold(gold, predictions, na_probs, has_answer=has_answer)
