"""Replay buffers with a hard budget, in samples or in bytes of stored tensors.

Two policies: `reservoir` (every sample seen so far is kept with equal probability,
Vitter's algorithm R, as in Mammoth's ER) and `class_balanced` (the budget is split
evenly over the classes seen; a class with fewer samples gives its share to the
others, and a new class takes its share from the largest ones, as in REMIND).
Randomness comes from torch's global generator, which the runner seeds and
checkpoints. With `compact`, images are held as an image file holds them (uint8 pixels,
uint8 labels) so a byte budget compares with methods that store compressed codes. Streams
of uint8 pixels (MNIST, CIFAR) are stored and replayed as uint8, compact or not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from forgetless.core.schema import ConfigError, param, positive
from forgetless.streams import Samples


@dataclass
class BufferConfig:
    size: int | None = param(None, "capacity in samples (give size or bytes)")
    bytes: int | None = param(None, "capacity in bytes of stored inputs and labels")
    policy: Literal["reservoir", "class_balanced"] = param("reservoir", "what to keep")
    compact: bool = param(
        False,
        "store inputs in [0, 1] as uint8 pixels (x * 255, rounded) and labels in the smallest "
        "integer type (an 8x8 digit: 64 + 1 bytes); replayed as float32 and int64",
    )

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
        self.pixels_in = False  # inputs offered as uint8 pixels: replayed as such

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
        # As stored by the stream: a training set that augments as it is drawn is kept raw.
        new = Samples(new.x, new.y, new.task).to(self.device)
        self.pixels_in = new.x.dtype == torch.uint8
        if self.config.compact:
            new = compact_images(new)
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
        drawn = self.samples.subset(torch.randint(len(self), (n,)).to(self.device))
        if not self.config.compact:
            return drawn
        task = None if drawn.task is None else drawn.task.long()
        x = drawn.x if self.pixels_in else drawn.x.float() / 255
        return Samples(x, drawn.y.long(), task)

    def state_dict(self) -> dict:
        s = self.samples
        stored = None if s is None else {"x": s.x, "y": s.y, "task": s.task}
        return {"samples": stored, "seen": self.seen, "pixels_in": self.pixels_in}

    def load_state_dict(self, state: dict) -> None:
        s = state["samples"]
        self.samples = None if s is None else Samples(s["x"], s["y"], s["task"]).to(self.device)
        self.seen = state["seen"]
        self.pixels_in = state.get("pixels_in", False)


def label_dtype(n_values: int) -> torch.dtype:
    """The smallest integer type for labels 0 .. n_values - 1: uint8 up to 256 classes."""
    return torch.uint8 if n_values <= 256 else torch.int16 if n_values <= 2**15 else torch.int64


def compact_images(samples: Samples) -> Samples:
    """Inputs in [0, 1] as uint8 pixels (uint8 inputs, already pixels, as they are), labels
    and task labels in their smallest type."""
    x = samples.x
    pixels = x.dtype == torch.uint8
    if not pixels and (not x.is_floating_point() or x.min() < 0 or x.max() > 1):
        seen = f"[{x.min().item():.3g}, {x.max().item():.3g}] ({x.dtype})"
        raise ValueError(
            f"buffer.compact: inputs range over {seen}; uint8 storage holds float images in "
            "[0, 1]: set compact: false for other inputs"
        )
    pixels = x if pixels else (x * 255).round().to(torch.uint8)
    task = samples.task
    task = None if task is None else task.to(label_dtype(int(task.max()) + 1))
    return Samples(pixels, samples.y.to(label_dtype(int(samples.y.max()) + 1)), task)


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
