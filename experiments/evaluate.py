"""Scoring: one row of the accuracy matrix after each experience."""

from __future__ import annotations

import torch

from forgetless.strategies import Strategy
from forgetless.streams import Experience, Samples, Stream


@torch.no_grad()
def accuracy(strategy: Strategy, experience: Experience) -> float:
    """Top-1 accuracy of `strategy.logits` on the experience's test set."""
    model = strategy.model
    was_training = model.training
    model.eval()
    data: Samples = experience.test
    batch_size = strategy.train_config.eval_batch_size
    correct = torch.zeros((), dtype=torch.long, device=strategy.device)
    for start in range(0, len(data), batch_size):
        index = slice(start, start + batch_size)
        task = None if data.task is None else data.task[index]
        batch = Samples(data.x[index], data.y[index], task).to(strategy.device)
        correct += (strategy.logits(batch).argmax(dim=1) == batch.y).sum()
    model.train(was_training)
    return correct.item() / len(data)


def score_stream(strategy: Strategy, stream: Stream) -> list[float]:
    """Scores on every experience of the stream, seen or not (R[i, :], or b before training)."""
    return [accuracy(strategy, e) for e in stream]
