"""Scoring: one row of the accuracy matrix after each experience.

Classification scores top-1 accuracy. Generation scores exact match with one
teacher-forced forward pass: an answer is generated exactly by greedy decoding iff
every answer token (and the EOS) is the argmax given the true prefix, so the two
agree at a fraction of the cost (tests/test_language_models.py checks it against
`generate`). Token accuracy and loss come from the same pass.
"""

from __future__ import annotations

import torch

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
    """(batch, logits) over `data` in evaluation batches, the model in eval mode."""
    model = strategy.model
    was_training = model.training
    model.eval()
    batch_size = strategy.train_config.eval_batch_size
    try:
        for start in range(0, len(data), batch_size):
            index = slice(start, start + batch_size)
            task = None if data.task is None else data.task[index]
            batch = Samples(data.x[index], data.y[index], task).to(strategy.device)
            if kind == "generation":
                batch = trim_padding(batch)
            yield batch, strategy.logits(batch)
    finally:
        model.train(was_training)


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
        from forgetless.experiments.editing import score_edits

        return score_edits(strategy, stream)
    primary = PRIMARY[stream.kind]
    row, extra = [], {}
    for j, experience in enumerate(stream):
        scores = evaluate(strategy, experience.test, experience.kind)
        row.append(scores.pop(primary))
        extra.update({f"{key}/exp_{j}": value for key, value in scores.items()})
    if stream.general is not None:
        extra["general_acc"] = evaluate(strategy, stream.general, stream.kind)[primary]
    return row, extra
