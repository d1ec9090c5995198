"""Replay buffers with a hard budget, in samples or in bytes of stored tensors.

Two policies: `reservoir` (every sample seen so far is kept with equal probability,
Vitter's algorithm R, as in Mammoth's ER) and `class_balanced` (the budget is split
evenly over the classes seen; a class with fewer samples gives its share to the
others, and a new class takes its share from the largest ones, as in REMIND).
Randomness comes from torch's global generator, which the runner seeds and
checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from forgetless.experiments.schema import ConfigError, param, positive
from forgetless.streams import Samples


@dataclass
class BufferConfig:
    size: int | None = param(None, "capacity in samples (give size or bytes)")
    bytes: int | None = param(None, "capacity in bytes of stored inputs and labels")
    policy: Literal["reservoir", "class_balanced"] = param("reservoir", "what to keep")

    def validate(self, where: str) -> None:
        if (self.size is None) == (self.bytes is None):
            raise ConfigError(f"{where}: give exactly one of size (samples) or bytes")
        positive(self.size, f"{where}.size")
        positive(self.bytes, f"{where}.bytes")


class ReplayBuffer:
    def __init__(self, config: BufferConfig, device: torch.device | str = "cpu") -> None:
        self.config = config
        self.device = device
        self.samples: Samples | None = None
        self.seen = 0  # samples offered so far (reservoir's n)

    def __len__(self) -> int:
        return 0 if self.samples is None else len(self.samples)

    def capacity(self, example: Samples) -> int:
        if self.config.size is not None:
            return self.config.size
        per_sample = example.nbytes // len(example)
        return self.config.bytes // per_sample

    @property
    def nbytes(self) -> int:
        return 0 if self.samples is None else self.samples.nbytes

    def add(self, new: Samples) -> None:
        if len(new) == 0:
            return
        new = new.to(self.device)
        capacity = self.capacity(new)
        if self.config.policy == "reservoir":
            self._reservoir_add(new, capacity)
        else:
            pool = new if self.samples is None else Samples.concat([self.samples, new])
            keep = class_balanced_keep(pool.y.cpu(), capacity).to(self.device)
            self.samples = pool.subset(keep)
        self.seen += len(new)

    def _reservoir_add(self, new: Samples, capacity: int) -> None:
        stored = 0 if self.samples is None else len(self.samples)
        free = min(capacity - stored, len(new))
        if free > 0:
            head = new.subset(torch.arange(free, device=self.device))
            self.samples = head if self.samples is None else Samples.concat([self.samples, head])
        # Algorithm R for the rest: the sample with global index n replaces a random
        # slot with probability capacity / (n + 1).
        rest = torch.arange(max(free, 0), len(new))
        if len(rest) == 0 or capacity == 0:
            return
        n = self.seen + rest
        slots = (torch.rand(len(rest)) * (n + 1)).long()
        accepted = slots < capacity
        # Later samples overwrite earlier ones in the same slot, as in the sequential loop.
        target = {int(s): int(i) for s, i in zip(slots[accepted], rest[accepted])}
        if target:
            where = torch.tensor(list(target.keys()), device=self.device)
            source = new.subset(torch.tensor(list(target.values()), device=self.device))
            self.samples.x[where] = source.x
            self.samples.y[where] = source.y
            if self.samples.task is not None:
                self.samples.task[where] = source.task

    def sample(self, n: int) -> Samples:
        """`n` stored samples drawn uniformly with replacement."""
        return self.samples.subset(torch.randint(len(self), (n,)).to(self.device))

    def state_dict(self) -> dict:
        s = self.samples
        stored = None if s is None else {"x": s.x, "y": s.y, "task": s.task}
        return {"samples": stored, "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        s = state["samples"]
        self.samples = None if s is None else Samples(s["x"], s["y"], s["task"]).to(self.device)
        self.seen = state["seen"]


def class_balanced_keep(labels: torch.Tensor, capacity: int) -> torch.Tensor:
    """Indices to keep: a random subset, as even over classes as their counts allow."""
    classes, counts = torch.unique(labels, return_counts=True)
    quota = torch.zeros_like(counts)
    left = capacity
    # Water-filling: the smallest classes first, each up to an even share of what is left.
    for rank, k in enumerate(torch.argsort(counts).tolist()):
        share = left // (len(classes) - rank)
        quota[k] = min(int(counts[k]), share)
        left -= int(quota[k])
    keep = []
    for c, q in zip(classes.tolist(), quota.tolist()):
        members = torch.nonzero(labels == c).flatten()
        keep.append(members[torch.randperm(len(members))[:q]])
    return torch.cat(keep).sort().values
