"""Scoring: one row of the accuracy matrix after each experience.

Classification scores top-1 accuracy. Generation scores exact match with one
teacher-forced forward pass: an answer is generated exactly by greedy decoding iff
every answer token (and the EOS) is the argmax given the true prefix, so the two
agree at a fraction of the cost (tests/test_language_models.py checks it against
`generate`). Token accuracy and loss come from the same pass.

Tasks whose benchmark scores generated text (SuperNI's ROUGE-L, TRACE's accuracy: their
experience's `info["metrics"]`) are also decoded greedily, and those scores are extras
beside the matrix (experiments.instruction_metrics).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from forgetless.experiments.editing import SCORES, applied_scores, edit_summary
from forgetless.experiments.instruction_metrics import score_answers
from forgetless.models.causal_lm import IGNORE, trim_padding
from forgetless.strategies import Strategy
from forgetless.streams import Samples, Stream

PRIMARY = {"classification": "accuracy", "generation": "exact_match", "edit": "exact_match"}


@torch.no_grad()
def evaluate(strategy: Strategy, data: Samples, kind: str) -> dict[str, float]:
    """Scores of `strategy` on `data`; the PRIMARY one fills the accuracy matrix."""
    totals: dict[str, torch.Tensor] = {}
    for batch, logits in _batch_logits(strategy, data, kind):
        counts = _generation_counts(logits, batch.y) if kind == "generation" else {
            "accuracy": (logits.argmax(dim=1) == batch.y).sum(),
        }  # fmt: skip
        for key, value in counts.items():
            totals[key] = totals.get(key, 0) + value
    n = len(data)
    if kind != "generation":
        return {"accuracy": totals["accuracy"].item() / n}
    tokens = totals["tokens"].item()
    return {
        "exact_match": totals["exact"].item() / n,
        "token_accuracy": totals["correct_tokens"].item() / tokens,
        "loss": totals["loss_sum"].item() / tokens,
    }


@torch.no_grad()
def exact_rows(strategy: Strategy, data: Samples) -> list[bool]:
    """Per row of a generation set, whether greedy decoding gives its answer exactly."""
    return [
        flag
        for batch, logits in _batch_logits(strategy, data, "generation")
        for flag in _exact(logits, batch.y).tolist()
    ]


def _batch_logits(strategy: Strategy, data: Samples, kind: str):
    """(batch, logits) over `data` in evaluation batches, the model in eval mode and under
    the training's precision; each batch moves to the device as it is used (its padding
    columns dropped first)."""
    model = strategy.model
    was_training = model.training
    model.eval()
    batch_size = strategy.train_config.eval_batch_size
    try:
        for start in range(0, len(data), batch_size):
            index = slice(start, start + batch_size)
            task = None if data.task is None else data.task[index]
            batch = Samples(data.x[index], data.y[index], task)
            if kind == "generation":
                batch = trim_padding(batch)
            batch = batch.to(strategy.device)
            with _autocast(strategy):
                logits = strategy.logits(batch)
            yield batch, logits
    finally:
        model.train(was_training)


def _autocast(strategy: Strategy) -> contextlib.AbstractContextManager:
    autocast = getattr(strategy, "autocast", None)  # what evaluate reads of a strategy is small
    return autocast() if autocast is not None else contextlib.nullcontext()


@torch.no_grad()
def generated_answers(strategy: Strategy, data: Samples) -> list[str]:
    """Greedy answers to the prompts of a generation set, as text.

    A row's prompt is its tokens before the first labelled one, left-padded into batches;
    decoding stops at the EOS or after as many tokens as the batch's longest answer and
    its EOS (a longer answer cannot score better). Special tokens are dropped and spaces
    left as decoded, as TRACE's inference does."""
    model = strategy.model
    was_training = model.training
    model.eval()
    tokenizer, pad = model.tokenizer, model.pad_id
    batch_size = strategy.train_config.eval_batch_size
    answers = []
    try:
        for start in range(0, len(data), batch_size):
            x, y = data.x[start : start + batch_size], data.y[start : start + batch_size]
            labelled = y != IGNORE
            lengths = labelled.int().argmax(dim=1).tolist()  # the prompts' token counts
            width = max(lengths)
            ids = torch.full((len(x), width), pad, dtype=torch.long)
            mask = torch.zeros((len(x), width), dtype=torch.long)
            for i, n in enumerate(lengths):
                ids[i, width - n :], mask[i, width - n :] = x[i, :n], 1
            with _autocast(strategy):
                out = model.model.generate(
                    input_ids=ids.to(strategy.device),
                    attention_mask=mask.to(strategy.device),
                    max_new_tokens=int(labelled.sum(dim=1).max()),
                    do_sample=False,
                    pad_token_id=pad,
                    eos_token_id=tokenizer.eos_token_id,
                )
            answers += tokenizer.batch_decode(
                out[:, width:], skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
    finally:
        model.train(was_training)
    return answers


def _answer_tokens(logits: torch.Tensor, labels: torch.Tensor):
    """Which answer tokens (and EOS) are the argmax given the true prefix, and which are
    answer tokens at all."""
    scored = labels[:, 1:] != IGNORE
    return (logits[:, :-1].argmax(dim=-1) == labels[:, 1:]) & scored, scored


def _exact(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Rows whose every answer token is right: greedy decoding writes the answer."""
    correct, scored = _answer_tokens(logits, labels)
    return (correct | ~scored).all(dim=1)


def _generation_counts(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    correct, scored = _answer_tokens(logits, labels)
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2).float(), labels[:, 1:], ignore_index=IGNORE, reduction="sum"
    )
    return {
        "exact": (correct | ~scored).all(dim=1).sum(),
        "correct_tokens": correct.sum(),
        "tokens": scored.sum(),
        "loss_sum": loss,
    }


def score_stream(strategy: Strategy, stream: Stream) -> tuple[list[float], dict[str, float]]:
    """R[i, :] (or b before training) and the secondary scores keyed `<score>/exp_<j>`."""
    if stream.kind == "edit":
        return score_edits(strategy, stream)
    primary = PRIMARY[stream.kind]
    row, extra = [], {}
    for j, experience in enumerate(stream):
        scores = evaluate(strategy, experience.test, experience.kind)
        row.append(scores.pop(primary))
        if experience.info.get("metrics"):
            answers = generated_answers(strategy, experience.test)
            references = experience.info["references"]
            scores.update(score_answers(experience.info["metrics"], answers, references))
        extra.update({f"{key}/exp_{j}": value for key, value in scores.items()})
    if stream.general is not None:
        extra["general_acc"] = evaluate(strategy, stream.general, stream.kind)[primary]
    return row, extra


def score_edits(strategy: Strategy, stream: Stream) -> tuple[list[float], dict[str, float]]:
    """R[i, :] (reliability per experience) and the other scores, as score_stream returns.

    `reliability`, `generalization` and `locality` (exact match over every edit of the
    stream that is not to be forgotten, applied or not yet) and their `*_token_acc`;
    `<score>/exp_<j>` per experience, and `forget/exp_<j>` for the experiences whose edits
    are forgotten. The runner reads the scores of the edits applied so far from the row and
    the extras.
    """
    row, extra = [], {}
    totals = {f"{s}{k}": [] for s in SCORES for k in ("", "_token_acc")}
    for j, e in enumerate(stream):
        for score in SCORES:
            scores = evaluate(strategy, getattr(e.test, score), "generation")
            extra[f"{score}/exp_{j}"] = scores["exact_match"]
            if e.test.pre_edit is None:
                totals[score].append(scores["exact_match"])
                totals[f"{score}_token_acc"].append(scores["token_accuracy"])
        if e.test.pre_edit is not None:
            pre_edit = evaluate(strategy, e.test.pre_edit, "generation")
            extra[f"forget/exp_{j}"] = pre_edit["exact_match"]
        row.append(extra[f"reliability/exp_{j}"])
    locality = evaluate(strategy, stream.general, "generation")
    extra["locality"] = extra["general_acc"] = locality["exact_match"]
    extra["locality_token_acc"] = locality["token_accuracy"]
    extra.update({k: float(np.mean(v)) for k, v in totals.items()})
    return row, extra


def edit_results(strategy: Strategy, stream: Stream) -> dict[str, list]:
    """Per edit, its raw final result as table columns (EasyEdit users ask for these beside
    the means to check a reproduction): experience, the request, whether it is forgotten,
    whether its prompt gives the new target, and the share of its paraphrases that do
    (None for an edit without any)."""
    names = ("experience", "subject", "relation", "prompt", "target", "original")
    columns: dict[str, list] = {k: [] for k in (*names, "forgotten", "reliable", "generalization")}
    for j, e in enumerate(stream):
        reliable = exact_rows(strategy, e.test.reliability)
        paraphrased = exact_rows(strategy, e.test.generalization)
        any_paraphrase = any(r.paraphrases for r in e.train)  # else: the prompts, rescored
        start = 0
        for k, request in enumerate(e.train):
            rows = paraphrased[start : start + (len(request.paraphrases) if any_paraphrase else 1)]
            start += len(rows)
            for name in names[1:]:
                columns[name].append(getattr(request, name))
            columns["experience"].append(j)
            columns["forgotten"].append("forgotten_at" in e.info)
            columns["reliable"].append(reliable[k])
            columns["generalization"].append(float(np.mean(rows)) if rows else None)
    return columns


def benchmark_scores(stream: Stream, extra: dict[str, float]) -> dict[str, float]:
    """The scores the tasks' benchmarks report (SuperNI's ROUGE-L, TRACE's accuracy, ...) at
    the end of the stream: per task, `<score>/exp_<j>`, and `<score>` averaged over the tasks
    scored by it, so that a cell's final metrics hold what the benchmark's papers compare,
    not only the exact match of the matrix."""
    scores, by_score = {}, {}
    for j, experience in enumerate(stream):
        for name in experience.info.get("metrics", ()):
            scores[f"{name}/exp_{j}"] = extra[f"{name}/exp_{j}"]
            by_score.setdefault(name, []).append(extra[f"{name}/exp_{j}"])
    scores.update({name: float(np.mean(values)) for name, values in by_score.items()})
    return scores


@dataclass
class FinalScores:
    """What a cell logs beside its matrix once the stream is done."""

    summary: dict[str, float]
    tables: dict[str, dict[str, list]]  # MLflow tables, by file name
    warnings: list[str]


def step_scores(R: np.ndarray, i: int, extra: dict[str, float], stream: Stream) -> dict:
    """Per-step curves beside the row: an edit stream's scores over the edits held."""
    return applied_scores(R, i, extra, stream) if stream.kind == "edit" else {}


def final_scores(strategy: Strategy, stream: Stream, extra: dict[str, float],
                 base_general: float | None, train_time_s: float) -> FinalScores:  # fmt: skip
    """An edit stream's final scores and per-edit table; a language-model stream's
    benchmark scores and retention of the base model's general ability."""
    final = FinalScores({}, {}, [])
    if stream.kind == "edit":
        final.summary.update(edit_summary(extra, stream, train_time_s))
        final.tables["edits.json"] = edit_results(strategy, stream)
    final.summary.update(benchmark_scores(stream, extra))
    if base_general:
        final.summary["general_retention"] = extra["general_acc"] / base_general
    elif base_general is not None:
        final.warnings.append(
            "the base model scores 0 on its general set: general_retention undefined"
        )
    return final
