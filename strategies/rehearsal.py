"""Rehearsal (experience replay): replay stored samples of past experiences beside new ones.

Each step appends a batch drawn from a replay buffer with a hard budget (samples or
bytes; reservoir or class-balanced); after an experience its samples are offered to
the buffer. Chaudhry et al., "On Tiny Episodic Memories in Continual Learning", 2019.

Deviation: the paper adds every incoming batch to the memory as it trains; here an
experience's samples join the buffer when the experience ends, so replay draws from
earlier experiences only.
"""

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from forgetless.core.schema import param, positive
from forgetless.strategies.base import Strategy, TrainConfig, register_strategy
from forgetless.strategies.buffers import BufferConfig, ReplayBuffer
from forgetless.streams import Experience, Samples, Stream


@dataclass
class RehearsalConfig:
    buffer: BufferConfig = param(BufferConfig(size=200), "the replay buffer and its budget")
    replay_batch_size: int | None = param(None, "replayed samples per step (default: batch_size)")
    per_task: int | None = param(
        None,
        "offer the buffer only this many random samples of each finished experience (SSR's "
        "instances_per_task, for a comparison at the same count per task); default: all",
    )

    def validate(self, where: str) -> None:
        positive(self.replay_batch_size, f"{where}.replay_batch_size")
        positive(self.per_task, f"{where}.per_task")


@register_strategy("rehearsal")
class Rehearsal(Strategy):
    Config = RehearsalConfig
    supports = ("classification", "generation")

    def __init__(self, model: nn.Module, config: Any, train: TrainConfig, stream: Stream) -> None:
        super().__init__(model, config, train, stream)
        self.buffer = ReplayBuffer(self.buffer_config(stream), self.device)
        self.replay_batch_size = self.config.replay_batch_size or self.train_config.batch_size

    def buffer_config(self, stream: Stream) -> BufferConfig:
        """The buffer's budget and policy (SSR sizes its own from the stream)."""
        return self.config.buffer

    def compose(self, batch: Samples) -> Samples:
        batch = super().compose(batch)
        if len(self.buffer) == 0:
            return batch
        return Samples.concat([batch, self.buffer.sample(self.replay_batch_size)])

    def after_experience(self, experience: Experience) -> None:
        super().after_experience(experience)
        offered = self.to_store(experience)
        if offered is not None:
            self.buffer.add(offered)

    def to_store(self, experience: Experience) -> Samples | None:
        """What the buffer is offered of a finished experience: its data (SSR: what the
        model writes instead)."""
        offered = experience.train
        if self.config.per_task is not None:
            offered = offered.subset(torch.randperm(len(offered))[: self.config.per_task])
        return offered

    def memory_bytes(self) -> int:
        return super().memory_bytes() + self.buffer.nbytes

    def state_dict(self) -> dict:
        return {**super().state_dict(), "buffer": self.buffer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.buffer.load_state_dict(state["buffer"])
