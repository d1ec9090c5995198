"""Scores of generated answers, as the instruction benchmarks define them.

Super-NaturalInstructions (Wang et al., 2022; allenai/natural-instructions,
eval/automatic/evaluation.py, its default track): ROUGE-L F-measure from Google's
`rouge-score` with the Porter stemmer, and exact match after SQuAD's normalisation
without the article removal (lower case, no punctuation, whitespace collapsed); each the
best over an instance's reference outputs, averaged over instances. Its cross-lingual
track (GPT-2 tokens) is not computed. Scores are fractions in [0, 1], not SuperNI's 0-100.

TRACE (Wang et al., 2023; BeyonderXX/TRACE, evaluations/ and metrics.py): accuracy is the
share of generated answers equal to the answer as strings, an empty one counting as wrong;
ScienceQA scores the option (an answer's first character) by accuracy and the reasoning
after it (from its third character) by ROUGE-L. TRACE computes ROUGE-L with the `rouge`
package (no stemming, its own tokenisation); here ROUGE-L is SuperNI's definition above
for every benchmark, so one name has one meaning, and TRACE's ROUGE-L figures may differ
slightly from these.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from functools import cache

import numpy as np


def normalize_answer(text: str) -> str:
    """SuperNI's normalisation: lower case, punctuation removed, whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(text.split())


@cache
def _rouge_scorer():
    from rouge_score import rouge_scorer  # nltk's stemmer behind it: imported when needed

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure of `prediction` against one `reference` (rouge-score, stemmed)."""
    return _rouge_scorer().score(target=reference, prediction=prediction)["rougeL"].fmeasure


def _exact_norm(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def _exact(prediction: str, reference: str) -> float:
    return float(prediction != "" and prediction == reference)


def _option(prediction: str, reference: str) -> float:
    return float(prediction[:1] != "" and prediction[:1] == reference[:1])


def _reasoning_rouge(prediction: str, reference: str) -> float:
    return rouge_l(prediction[2:], reference[2:])


SCORES: dict[str, Callable[[str, str], float]] = {
    "rougeL": rouge_l,
    "exact_match_norm": _exact_norm,
    "accuracy": _exact,
    "option_accuracy": _option,
    "reasoning_rougeL": _reasoning_rouge,
}


def score_answers(
    metrics: list[str], predictions: list[str], references: list[list[str]]
) -> dict[str, float]:
    """Each of `metrics` averaged over the predictions, each prediction scored against the
    best of its references (SuperNI's metric_max_over_ground_truths)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    pairs = list(zip(predictions, references))
    return {
        name: float(np.mean([max(SCORES[name](p, r) for r in refs) for p, refs in pairs]))
        for name in metrics
    }
