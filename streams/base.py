"""The stream types (Samples, Example, Experience, Stream) and the stream registry.

A `Stream` is an ordered list of `Experience`s. Streams are built by factories
registered under a name (`@register_stream`), by installed plugins (entry-point
group `forgetless.streams`) or by a `package.module:function` written in the grid.
A factory takes its declared parameters (a dataclass) and the cell seed, which
fixes everything random about the stream, class order included.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from forgetless.core.registry import Registry

Kind = Literal["classification", "generation", "edit"]
Scenario = Literal["class", "domain", "task", "instruction", "editing"]


@dataclass
class Samples:
    """Inputs, labels and (for task-incremental streams) task labels, as tensors."""

    x: torch.Tensor
    y: torch.Tensor
    task: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: torch.Tensor) -> Samples:
        task = None if self.task is None else self.task[index]
        return Samples(self.x[index], self.y[index], task)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Samples:
        task = None if self.task is None else self.task.to(device, non_blocking=non_blocking)
        x, y = (t.to(device, non_blocking=non_blocking) for t in (self.x, self.y))
        return Samples(x, y, task)

    def __getitem__(self, i: int) -> tuple:
        """One sample as a torch Dataset serves it (task -1 where the stream has none)."""
        return self.x[i], self.y[i], -1 if self.task is None else self.task[i]

    def loader(
        self, batch_size: int, num_workers: int = 0, pin_memory: bool = False
    ) -> torch.utils.data.DataLoader:
        """A shuffling DataLoader over the samples, yielding Samples: worker processes
        gather (and, for augmented sets, transform) the batches while the model trains;
        pinned memory lets a batch's copy to the GPU overlap the step before it."""

        def collate(rows: list[tuple]) -> Samples:
            x, y, task = (torch.stack([torch.as_tensor(r[k]) for r in rows]) for k in range(3))
            return Samples(x, y, None if self.task is None else task)

        return torch.utils.data.DataLoader(
            self, batch_size=batch_size, shuffle=True, num_workers=num_workers,
            pin_memory=pin_memory, collate_fn=collate, persistent_workers=num_workers > 0,
        )  # fmt: skip

    @property
    def nbytes(self) -> int:
        tensors = [self.x, self.y] + ([] if self.task is None else [self.task])
        return sum(t.element_size() * t.nelement() for t in tensors)

    def digest(self) -> str:
        """A content hash, logged in the stream manifest to catch repeated data."""
        h = hashlib.sha1()
        for t in (self.x, self.y):
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    @staticmethod
    def concat(parts: list[Samples]) -> Samples:
        tasks = [p.task for p in parts]
        task = None if any(t is None for t in tasks) else torch.cat(tasks)
        return Samples(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]), task)


@dataclass(frozen=True)
class Example:
    """One instruction example: the model reads `prompt` and must write `answer`."""

    prompt: str
    answer: str


@dataclass
class Experience:
    index: int
    name: str
    train: Any
    test: Any
    kind: Kind = "classification"
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Stream:
    name: str
    scenario: Scenario
    experiences: list[Experience]
    num_classes: int = 0
    input_shape: tuple[int, ...] = ()
    task_classes: list[list[int]] | None = None
    """Task-incremental streams: the classes of each task label; outputs are masked to them."""
    general: Any = None
    """Language-model streams: a held-out set of the base model's general mixture, scored
    after every experience to measure how much general ability survives."""
    base: Any = None
    """Language-model streams: how to pre-train the base model (see streams.instructions)."""

    @property
    def kind(self) -> Kind:
        return self.experiences[0].kind

    def __len__(self) -> int:
        return len(self.experiences)

    def __iter__(self):
        return iter(self.experiences)

    def manifest(self) -> list[dict[str, Any]]:
        """Per experience: name, classes or task, sample counts and a data hash."""
        rows = []
        for e in self.experiences:
            row = {"index": e.index, "name": e.name, "train": len(e.train), "test": len(e.test)}
            row.update({k: v for k, v in e.info.items() if _plain(v)})
            if isinstance(e.train, Samples):
                row["train_hash"] = e.train.digest()
            elif isinstance(e.train, list):  # text examples
                text = "\x00".join(f"{x.prompt}\x01{x.answer}" for x in e.train)
                row["train_hash"] = hashlib.sha1(text.encode()).hexdigest()[:16]
            rows.append(row)
        return rows

    def check_distinct(self) -> None:
        """Two experiences with identical training data mean a broken stream (Renate #339)."""
        seen: dict[str, str] = {}
        for row in self.manifest():
            digest = row.get("train_hash")
            if digest is None:
                continue
            if digest in seen:
                raise ValueError(
                    f"stream {self.name!r}: experiences {seen[digest]!r} and {row['name']!r} "
                    "carry the same training data"
                )
            seen[digest] = row["name"]


STREAMS: Registry = Registry("stream", "forgetless.streams")


def register_stream(name: str, kind: Kind = "classification"):
    """Register a factory `(config: SomeConfig, seed: int) -> Stream` under `name`.

    The annotation of `config` (a dataclass) declares the stream's parameters.
    """

    def add(factory):
        factory.kind = kind
        return STREAMS.register(name)(factory)

    return add


def _plain(value: Any) -> bool:
    """A number, a string or a list of them: what a manifest (JSON) records of `info`."""
    scalar = (int, float, str)
    return isinstance(value, scalar) or (
        isinstance(value, list) and all(isinstance(v, scalar) for v in value)
    )
